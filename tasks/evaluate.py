"""Score a model (base, or base + LoRA adapter) on a snapshot split with batched greedy generation.

    python -m tasks evaluate --run-id R --input snapshot_uri=s3://.../snapshots/<id> [--input adapter_uri=s3://...]

The prompt is built by the tokenizer's chat template; decoding is greedy, so the same model and split always give
the same outputs and scores. The adapter is merged into the base weights before generation (faster, identical).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from tasks import s3
from tasks.runner import StepContext

log = logging.getLogger("tasks.evaluate")


def download_dir(uri: str, dest: Path) -> Path:
    for obj in s3.list_objects(uri.rstrip("/") + "/"):
        name = obj["key"].rsplit("/", 1)[-1]
        (dest / name).write_bytes(s3.get_bytes(f"s3://{s3.split_uri(uri)[0]}/{obj['key']}"))
    return dest


def load_for_inference(cfg, adapter_uri: str | None = None):
    """(tokenizer, model) on the best device; with an adapter, merged into the base for fast decoding."""
    from tasks import finetune, generation
    from tasks.training import device_and_dtype

    device, dtype = device_and_dtype(cfg.training)
    tokenizer, model = finetune.load_base(cfg, device, dtype)
    if adapter_uri:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as tmp:
            model = PeftModel.from_pretrained(model, str(download_dir(adapter_uri, Path(tmp))))
    model.config.use_cache = True
    return tokenizer, generation.merge_for_inference(model)


def score(model, tokenizer, records: list[dict], ecfg) -> dict:
    """Generate answers for records (ChatML dicts) and score them against the reference answers."""
    from tasks import generation, metrics

    if ecfg.max_examples:
        records = records[:ecfg.max_examples]
    prompts = generation.render_prompts(tokenizer, [r["messages"] for r in records])
    t0 = time.monotonic()
    hyps = generation.generate_batched(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size)
    elapsed = time.monotonic() - t0
    refs = [r["messages"][-1]["content"] for r in records]
    scores = metrics.corpus_scores(hyps, refs)
    weighted = metrics.weighted_score(scores, ecfg.weights)
    intents = [r.get("intent", "") for r in records]
    return {"scores": scores, "weighted_score": weighted, "n": len(records), "seconds": elapsed,
            "examples_per_s": len(records) / max(elapsed, 1e-9),
            "per_intent": metrics.per_intent(hyps, refs, intents, ecfg.weights),
            "outputs": [{"prompt": r["messages"][-2]["content"], "reference": ref, "output": hyp, "intent": i}
                        for r, ref, hyp, i in zip(records, refs, hyps, intents, strict=True)]}


def run(ctx: StepContext) -> dict:
    from tasks.finetune import read_split

    cfg = ctx.config
    records = read_split(ctx.require_input("snapshot_uri"), ctx.inputs.get("split", "test"))
    tokenizer, model = load_for_inference(cfg, ctx.inputs.get("adapter_uri"))
    result = score(model, tokenizer, records, cfg.eval)
    s = result["scores"]
    log.info("scored %d examples in %.1fs (%.2f examples/s): BLEU-1 %.4f BLEU-2 %.4f BLEU-3 %.4f BLEU-4 %.4f "
             "ROUGE-L P %.4f -> weighted %.4f", result["n"], result["seconds"], result["examples_per_s"],
             s["bleu1"], s["bleu2"], s["bleu3"], s["bleu4"], s["rougeL_precision"], result["weighted_score"])
    return {k: result[k] for k in ("scores", "weighted_score", "n", "examples_per_s")}
