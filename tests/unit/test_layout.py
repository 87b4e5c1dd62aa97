"""The package layout the architecture promises: one module per CLI step, steps that never import each other, and the
dev tooling kept out of the images. (The layer order itself is import-linter's job: `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

from tasks import runner

REPO = Path(__file__).resolve().parents[2]
STEPS_DIR = REPO / "tasks" / "steps"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_every_cli_step_is_exactly_one_module_in_tasks_steps():
    modules = {p.stem for p in STEPS_DIR.glob("*.py") if p.stem != "__init__"}
    assert modules == set(runner.STEPS)
    for name in runner.STEPS:
        source = (STEPS_DIR / f"{name}.py").read_text()
        tree = ast.parse(source)
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), f"{name}: no run(ctx)"
        assert f"python -m tasks {name}" in (ast.get_docstring(tree) or ""), f"{name}: docstring lacks its command"


def test_no_step_imports_another_step():
    for path in STEPS_DIR.glob("*.py"):
        steps = {m for m in _imports(path) if m.startswith("tasks.steps")}
        assert not steps, f"{path.name} imports {sorted(steps)}"


def test_dev_tooling_is_not_sent_to_the_images():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "tasks/devstack" in ignored
    for path in (REPO / "tasks").rglob("*.py"):
        if "devstack" in path.parts:
            continue
        users = {m for m in _imports(path) if m.startswith("tasks.devstack")}
        assert not users, f"{path.relative_to(REPO)} imports the dev stack, which is not in the images: {users}"
    assert "tasks.devstack" not in (REPO / "docker" / "init.sh").read_text()
