"""Benchmarks: `python -m bench eval|dag|all [--quick]`. Each suite prints a Markdown table and writes JSON."""
