"""`python -m bench train`: fine-tune throughput of the seed recipe vs the fine-tune step's own code path.

Both run in this process on the same conversations (the Bitext sample rendered with the model's chat template,
assistant-only labels; every 10th conversation held out for the validation loss). The step path is the step's
functions, not a copy: ``models.load_base`` -> ``models.add_lora`` -> ``training.make_optimizer`` ->
``training.fit`` with the step's config (packing, bf16 and torch.compile per decoder layer on CUDA, no gradient
checkpointing). Rows: the seed recipe; the step's default config as it is (batch 16); on CUDA the same at batch 64
(~8 packed rows of 2048 tokens, like the issue's probes) and QLoRA NF4 at batch 64 (eager, with gradient
checkpointing: its peak memory is compared with LoRA's at the same tokens per step); the default config with
``training.packing=false`` (padded batches: fit does not compile those, each new width would recompile).

CPU: all recipes are built side by side and timed interleaved, one optimizer step each per round, after one
untimed step (other processes on a shared machine then slow every recipe alike). CUDA: one recipe after the
other, each in one run of `warmup + steps` optimizer steps (so the step path compiles), the first `warmup` untimed
(their seconds, compilation included, are the "first steps s" column). The JSON is rewritten after every recipe,
and a recipe that would not fit in what is left of ``--budget-s`` is skipped (said in its row), so a slow compile
costs the rows after it, never the suite's JSON.

Columns: real tokens/s (conversation tokens, not padding), slot tokens/s (everything computed, padding included),
padding waste, peak memory (CUDA: max allocated; CPU: rise of the process's peak RSS while the recipe was built and
took its first step), the training loss of the last step, and the validation loss after the run (same held-out
conversations, same function, every row).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.common import (
    VAL_BATCHES,
    Budget,
    PeakMemory,
    conversations,
    dynamo_graphs,
    free_memory,
    model_dir,
    now,
)

log = logging.getLogger("bench.train")
# seconds a CUDA recipe needs at least (model load + warm-up + timed steps + validation; compiled: + compilation)
NEED_S = {"seed": 20, "eager": 25, "compiled": 45}


def sizes(device: str, quick: bool, smoke: bool = False) -> dict:
    if device == "cuda":  # warmup + step_steps = 50 = training.COMPILE_MIN_STEPS: the compiled rows compile
        return {"seed_steps": 4 if quick else 10, "step_steps": 47, "eager_steps": 10, "warmup": 3, "big_batch": 64}
    if smoke:  # the rehearsal of bench/gpu.sh in the test suite: every recipe once, nothing to read in the figures
        return {"seed_steps": 1, "step_steps": 1, "warmup": 1, "conversations": 120}
    # CPU (quick): 3 interleaved rounds after 1 untimed step
    return {"seed_steps": 3, "step_steps": 3, "warmup": 1}


def step_config(base: str, overrides: dict):
    from tasks.config import load_config

    return load_config(None, overrides={"model.base_model": base, **overrides})


class StepTrain:
    """The fine-tune step's path; run_to(n) continues training to optimizer step n (training.fit resumes from
    its TrainState, as the step does after a checkpoint)."""

    def __init__(self, base: str, records: list[dict], val_records: list[dict], overrides: dict, *,
                 total_steps: int, device: str):
        from tasks.ml import models
        from tasks.ml.training import TrainState, device_and_dtype, encode_all, make_optimizer, plan_batching

        self.cfg = cfg = step_config(base, {**overrides, "training.max_steps": total_steps})
        self.dev, self.dtype = device_and_dtype(cfg.training)
        if self.dev != device:
            raise SystemExit(f"the step would train on {self.dev}, the benchmark asked for {device}")
        self.tokenizer, model = models.load_base(cfg, self.dev, self.dtype)
        self.train = encode_all(self.tokenizer, records, cfg.model.max_seq_len)
        self.val = encode_all(self.tokenizer, val_records, cfg.model.max_seq_len)
        self.model = models.add_lora(model, cfg, cfg.training.seed)
        self.opt, self.sched = make_optimizer(self.model, cfg.training, total_steps)
        self.state = TrainState()
        batching = plan_batching(self.train, cfg.training, self.dev)
        self.description = batching.describe()
        self.conversations_per_step = round(len(self.train) / max(1, len(batching.epoch(self.train, 0, 0))), 1)
        self.mark: tuple | None = None

    def run_to(self, step: int, mark_at: int | None = None) -> None:
        from tasks.ml.training import fit

        def on_step(st, losses) -> bool:
            if st.step == mark_at:  # now() waits for the device to finish the steps queued so far
                self.mark = (now(self.dev), st.tokens, st.slots)
            return False

        fit(self.model, self.train, self.cfg.training, step, self.state, self.opt, self.sched,
            pad_id=self.tokenizer.pad_token_id, device=self.dev, dtype=self.dtype, on_step=on_step)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def tokens(self) -> int:
        return self.state.tokens

    @property
    def slots(self) -> int:
        return self.state.slots

    @property
    def loss(self) -> float:
        return self.state.losses[-1][1]

    def val_loss(self) -> float:
        from tasks.ml.training import validation_loss

        return validation_loss(self.model, self.val, 8, VAL_BATCHES, self.tokenizer.pad_token_id, self.dev)


def measure_sequential(make, *, warmup: int, steps: int, device: str) -> dict:
    """Build, train warmup + steps in one run, time the last `steps` (CUDA)."""
    graphs = dynamo_graphs()
    with PeakMemory(device) as peak:
        run = make()
        t_start = now(device)
        if isinstance(run, StepTrain):
            run.run_to(warmup + steps, mark_at=warmup)
            t0, tokens0, slots0 = run.mark
        else:
            run.run_to(warmup)
            t0, tokens0, slots0 = now(device), run.tokens, run.slots
            run.run_to(warmup + steps)
        seconds = now(device) - t0
    result = {"real_tokens": run.tokens - tokens0, "slots": run.slots - slots0, "seconds": seconds,
              "warmup_s": t0 - t_start, "peak_gib": peak.gib, "loss_last": run.loss, "val_loss": run.val_loss(),
              "steps": steps, "batching": run.description, "conversations_per_step": run.conversations_per_step,
              "graphs_compiled": dynamo_graphs() - graphs}
    del run
    free_memory()
    return result


def measure_interleaved(makers: dict, *, warmup: int, rounds: int, device: str, save=None) -> dict:
    """Build every recipe (peak memory of build + warmup each), then `rounds` rounds of one step per recipe;
    ``save(out)`` after each build and at the end."""
    runs, out = {}, {}
    for name, make in makers.items():
        try:
            with PeakMemory(device) as peak:
                runs[name] = make()
                t0 = now(device)
                runs[name].run_to(warmup)
            out[name] = {"peak_gib": peak.gib, "warmup_s": now(device) - t0, "seconds": 0.0, "real_tokens": 0,
                         "slots": 0, "steps": 0, "graphs_compiled": 0}
        except Exception as exc:  # noqa: BLE001 -- one failing recipe must not hide the others
            log.exception("recipe %s failed", name)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if save:
            save(out)
    for _ in range(rounds):
        for name, run in runs.items():
            tokens, slots, t0 = run.tokens, run.slots, now(device)
            run.run_to(run.step + 1)
            r = out[name]
            r["seconds"] += now(device) - t0
            r["real_tokens"] += run.tokens - tokens
            r["slots"] += run.slots - slots
            r["steps"] += 1
    for name, run in runs.items():
        out[name].update(loss_last=run.loss, val_loss=run.val_loss(), batching=run.description,
                         conversations_per_step=run.conversations_per_step)
    runs.clear()
    free_memory()
    return out


def row(name: str, r: dict, seed: dict | None) -> dict:
    if "error" in r or "skipped" in r:
        return {"recipe": name, "real tok/s": "-", "x seed": "-", "note": r.get("error", r.get("skipped"))[:160]}
    if not r.get("seconds"):
        return {"recipe": name, "real tok/s": "-", "x seed": "-", "note": "built, not timed yet"}
    real_s, slot_s = r["real_tokens"] / r["seconds"], r["slots"] / r["seconds"]
    out = {"recipe": name, "real tok/s": real_s, "slot tok/s": slot_s,
           "x seed": real_s / (seed["real_tokens"] / seed["seconds"]) if seed else 1.0,
           "padding waste": 1 - r["real_tokens"] / max(r["slots"], 1), "peak GiB": r["peak_gib"],
           "conv/step": r["conversations_per_step"], "steps timed": r["steps"], "first steps s": r["warmup_s"],
           "graphs compiled": r.get("graphs_compiled", 0), "loss last step": r["loss_last"],
           "val loss after": r["val_loss"]}
    if seed:
        out["peak x seed"] = r["peak_gib"] / seed["peak_gib"] if seed["peak_gib"] > 0 else "-"
    return out


def recipes(device: str, quick: bool, big_batch: int | None) -> dict:
    """Row label -> config overrides of the step path. The default config's row overrides nothing."""
    cuda = device == "cuda"
    packed = "packed 2048-token rows, compiled per layer" if cuda else "packed 512-token rows, eager (CPU)"
    out = {f"step path: default config (LoRA, batch 16, {packed})": {}}
    if cuda:
        out[f"step path: batch {big_batch} (~8 x 2048 rows per step), compiled per layer"] = {
            "training.batch_size": big_batch}
        out[f"step path: QLoRA NF4, batch {big_batch}, gradient checkpointing, eager"] = {
            "training.batch_size": big_batch, "lora.quantization": "nf4", "training.compile": False,
            "training.gradient_checkpointing": True}
    if not (quick and cuda):  # padded batches: fit does not compile them (every batch has its own width)
        out["step path: default config, training.packing=false (length-grouped, padded per batch, eager)"] = {
            "training.packing": False}
    return out


def _kind(name: str, overrides: dict, device: str) -> str:
    if device == "cuda" and overrides.get("training.packing", True) and overrides.get("training.compile", True):
        return "compiled"
    return "eager"


def main(args) -> dict:
    from transformers import AutoTokenizer

    from bench.seed import SeedTrain
    from tasks.ml.training import encode_all

    device, quick, smoke = args.device, args.quick, getattr(args, "smoke", False)
    budget, save = getattr(args, "budget", None) or Budget(0), getattr(args, "save", None) or (lambda result: None)
    n = sizes(device, quick, smoke)
    base, model_desc = model_dir(device, Path(args.work), smoke)
    records, source = conversations(n.get("conversations"))
    val_records, train_records = records[::10], [r for i, r in enumerate(records) if i % 10]
    tokenizer = AutoTokenizer.from_pretrained(base)
    max_len = step_config(base, {}).model.max_seq_len
    train_ex, val_ex = encode_all(tokenizer, train_records, max_len), encode_all(tokenizer, val_records, max_len)
    lengths = [len(e.input_ids) for e in train_ex]
    total = n["warmup"] + max(n["seed_steps"], n["step_steps"])
    seed_name = ("seed recipe: fp32" + (" + fp16 autocast/GradScaler" if device == "cuda" else "")
                 + ", grad. checkpointing, 4 x 512 padded")
    makers = {seed_name: lambda: SeedTrain(base, train_ex, val_ex, device=device, pad_id=tokenizer.pad_token_id,
                                           total_steps=total)}
    variants = recipes(device, quick, n.get("big_batch"))
    for name, overrides in variants.items():
        makers[name] = (lambda o=overrides: StepTrain(base, train_records, val_records, o, total_steps=total,
                                                        device=device))
    info = {"model": model_desc, "data": source, "train_conversations": len(train_ex),
            "val_conversations": len(val_ex), "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "sizes": n, "overrides": {k: v for k, v in variants.items()},
            "timing": "sequential" if device == "cuda" else "interleaved rounds"}
    t0 = time.perf_counter()

    def result(results: dict) -> dict:
        seed = results.get(seed_name)
        seed = seed if seed and "error" not in seed and "skipped" not in seed and seed.get("seconds") else None
        rows = [row(name, results[name], seed) for name in makers if name in results]
        return {"rows": rows, "raw": results, **info, "seconds_total": time.perf_counter() - t0}

    if device == "cuda":
        results = {}
        for name, make in makers.items():
            kind = "seed" if name == seed_name else _kind(name, variants.get(name, {}), device)
            steps = {"seed": n["seed_steps"], "eager": n["eager_steps"], "compiled": n["step_steps"]}[kind]
            if not budget.allows(NEED_S[kind]):
                results[name] = budget.skipped(f"{kind} recipe", NEED_S[kind])
                log.warning("recipe %s skipped: %s", name, results[name]["skipped"])
            else:
                try:
                    results[name] = measure_sequential(make, warmup=n["warmup"], steps=steps, device=device)
                except Exception as exc:  # noqa: BLE001 -- e.g. no bitsandbytes for QLoRA: report, go on
                    log.exception("recipe %s failed", name)
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    free_memory()
            save(result(results))  # the rows so far, in case the time limit strikes during the next recipe
    else:
        results = measure_interleaved(makers, warmup=n["warmup"], rounds=n["step_steps"], device=device,
                                      save=lambda out: save(result(out)))
    return result(results)
