"""bench/gpu.sh -- the one script of a GPU device call -- rehearsed on CPU at the tiny model's size (``--smoke``):
every suite runs within its budget and writes the JSON the GPU figures are read from, so a broken GPU script is
caught here, before a device call. (``make bench`` runs the same script at the CPU sizes.)"""

import json
import os
import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.unit.test_bench import gpu_script_defaults

pytestmark = pytest.mark.integration


def test_the_gpu_script_runs_every_suite_on_cpu_and_writes_its_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ECB_CONFIG"}  # the platform's defaults, as on the GPU
    env.update(ECB_STATE_DIR=str(tmp_path / "state"), BENCH_WORK=str(tmp_path / "work"))  # its own Postgres
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu.sh", str(out), "--device", "cpu", "--smoke", "--static-cache", "on",
                        "--compile", "on"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    done, deadline = map(int, re.search(r"== done in (\d+)s \(deadline (\d+)s\)", r.stdout).groups())
    assert done < deadline and not re.search(r"^!! (train|eval|hpo|chat)", r.stdout, re.M), r.stdout[-6000:]
    budgets = gpu_script_defaults()
    results = {}
    for suite in ("train", "eval", "hpo", "chat"):
        results[suite] = res = json.loads((out / f"{suite}.json").read_text())
        assert res["complete"] is True and res["suite"] == suite and res["commit"] != "unknown"
        assert 0 < res["budget_s"] < budgets[f"{suite.upper()}_S"] and res["wall_s"] < res["budget_s"]

    train = {row["recipe"]: row for row in results["train"]["rows"]}
    assert len(train) == 3 and all(row["real tok/s"] > 0 for row in train.values())
    assert any(name.startswith("step path: default config (LoRA, batch 16") for name in train)
    assert results["train"]["overrides"]["step path: default config, training.packing=false (length-grouped, "
                                         "padded per batch, eager)"] == {"training.packing": False}
    assert {} in results["train"]["overrides"].values()  # the default config's row overrides nothing

    ev = results["eval"]
    assert [row["path"].split(":")[0] for row in ev["rows"]] == ["seed loop", "one at a time, greedy, merged, 16 new "
                                                                 "tokens (identity reference)", "evaluate step"]
    assert all(row["new tokens/s"] > 0 and row["examples/s"] > 0 for row in ev["rows"]) and ev["identical"] is True
    assert ev["warmup_s"] > 0 and ev["parts"]["seed"]["new_tokens"] == 16 * ev["parts"]["seed"]["examples"]

    hpo = {row["pruner"]: row for row in results["hpo"]["rows"]}
    median, none = hpo["median (the steps' pruner)"], hpo["none"]
    assert (median["complete"], median["pruned"], none["complete"], none["pruned"]) == (2, 1, 3, 0)
    assert median["steps trained"] < none["steps trained"] and results["hpo"]["diverging_trials_pruned"] is True

    chat = results["chat"]
    assert [lvl["clients"] for lvl in chat["levels"]] == [1, 4] and all(
        lvl["replies"] > 0 and lvl["errors"] == 0 for lvl in chat["levels"])
    step = chat["decode_step"]
    assert step["path"] == "static cache, compiled (CPU: no CUDA graphs)" and step["eager_fallbacks"] == 0
    assert step["compiled"] is True and step["as_configured"] is True and step["decode_steps"] > 0
    assert not (tmp_path / "state" / "postgres" / "postmaster.pid").exists()  # the suite stopped its Postgres
