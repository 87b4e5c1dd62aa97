"""Benchmarks of the platform's own code paths, each against a reference measured in the same process.

    python -m bench eval [--examples 64] [--model DIR]   # batched greedy evaluate vs one example at a time
    python -m bench dag                                   # DAG file parse time
    python -m bench quality --snapshot-uri S --adapter-uri A   # base vs fine-tuned BLEU on a test split
    python -m bench all                                   # eval + dag

Tables go to stdout (Markdown), results to bench/out/<suite>.json. Timings belong here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
BITEXT = REPO.parent / "shared" / "data" / "bitext_customer_support_sample.csv"


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def conversations(n: int) -> list[dict]:
    """Real Bitext rows when the sample is there (realistic lengths), else the demo generator; as ChatML."""
    import csv

    from tasks import datagen
    from tasks.config import Config

    rows = list(csv.DictReader(BITEXT.open(encoding="utf-8"))) if BITEXT.exists() else datagen.generate_rows(n, 0)
    system = Config().data.system_prompt
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}], "intent": r["intent"]}
            for r in rows[:n]]


def demo_model(model_dir: str | None):
    """The demo base model from a folder, or a freshly built small one (same builder as the demo)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import datagen
    from tasks import demo_model as dm

    if model_dir:
        return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    rows = datagen.generate_rows(800, seed=0)
    texts = [r["instruction"] for r in rows] + [r["response"] for r in rows]
    tokenizer = dm.build_tokenizer(texts, vocab_size=2048)
    model = dm.build_model(tokenizer, size="demo")
    dm.pretrain(model, tokenizer, texts, steps=40)
    return tokenizer, model


def suite_eval(args) -> dict:
    from tasks import generation

    tokenizer, model = demo_model(args.model)
    model.eval()
    records = conversations(args.examples)
    prompts = generation.render_prompts(tokenizer, [r["messages"] for r in records])
    t0 = time.perf_counter()
    single = generation.generate_one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = generation.generate_batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    t_batched = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(single, batched, strict=True))
    rows = [{"path": "one at a time (greedy, batch 1)", "examples": len(prompts), "seconds": t_single,
             "examples/s": len(prompts) / t_single, "x": 1.0, "identical outputs": "reference"},
            {"path": f"evaluate step (batched {args.batch_size}, left-padded, length-sorted)", "examples": len(prompts),
             "seconds": t_batched, "examples/s": len(prompts) / t_batched, "x": t_single / t_batched,
             "identical outputs": f"{same}/{len(prompts)}"}]
    return {"rows": rows, "identical": same == len(prompts), "max_new_tokens": args.max_new_tokens}


def suite_dag(args) -> dict:
    code = ("import time; t=time.perf_counter(); from airflow.dag_processing.dagbag import DagBag; "
            "t1=time.perf_counter(); b=DagBag(dag_folder='dags'); t2=time.perf_counter(); "
            "assert not b.import_errors, b.import_errors; print(t1-t, t2-t1)")
    env = {**__import__("os").environ, "AIRFLOW_HOME": str(REPO),
           "PYTHONPATH": f"{REPO}:{REPO / 'plugins'}"}
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append((float(out[-2]), float(out[-1])))
    parse = [r[1] for r in runs]
    rows = [{"what": "parse dags/ (DagBag fill, airflow already imported)", "median s": statistics.median(parse),
             "max s": max(parse), "runs": len(parse)}]
    return {"rows": rows}


def suite_quality(args) -> dict:
    """BLEU/ROUGE of the base model and of base + the fine-tuned adapter on the same test split (needs the stack's
    environment: `source .ecb/stack.env`)."""
    from tasks import evaluate
    from tasks.config import load_config
    from tasks.finetune import read_split

    if not (args.snapshot_uri and args.adapter_uri):
        raise SystemExit("quality needs --snapshot-uri and --adapter-uri (from a finished training run)")
    cfg = load_config()
    records = read_split(args.snapshot_uri, "test")
    rows = []
    for label, adapter in (("base model", None), ("fine-tuned (base + LoRA)", args.adapter_uri)):
        tokenizer, model = evaluate.load_for_inference(cfg, adapter)
        r = evaluate.score(model, tokenizer, records, cfg.eval)
        rows.append({"model": label, "examples": r["n"], **{k: r["scores"][k] for k in
                     ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL_precision")}, "weighted": r["weighted_score"]})
    return {"rows": rows, "snapshot_uri": args.snapshot_uri, "adapter_uri": args.adapter_uri}


SUITES = {"eval": suite_eval, "dag": suite_dag, "quality": suite_quality}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--snapshot-uri", default=None)
    p.add_argument("--adapter-uri", default=None)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default=None, help="a Hugging Face model folder (default: build the demo model)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("eval", "dag") if args.suite == "all" else [args.suite]:
        result = SUITES[name](args)
        print(f"\n### {name}\n\n{table(result['rows'])}\n", flush=True)
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
