"""Scoring a model on a snapshot's eval sets with batched greedy generation; one stored evaluation per (model,
snapshot, split) in Postgres `evaluations`, outputs in S3, metrics and a sample table in MLflow.

* split ``test``: BLEU/ROUGE against the reference answers, the weighted score, per-intent scores (the gate's basis).
* split ``live`` (snapshots made with data.include_feedback): the prompts whose reply got a thumbs-down in the chat
  service, asked again. There is no right answer to compare with, only the rejected one, so it measures how close
  the model's answers stay to what users rejected: ``rejected_similarity`` (mean ROUGE-L F1 against the rejected
  reply, lower is better) and ``repeat_rate`` (share of answers that repeat it verbatim), overall and per model
  version that gave the rejected replies.

A stored evaluation is reused only when it was made with the same settings and the same model files: kept with
it as ``metrics.eval_settings`` (the example cap, max_new_tokens, device and dtype, attention kernel, quantization,
EVAL_VERSION; the gate also checks that candidate and champion share them) and ``metrics.model`` (base model,
revision, adapter); otherwise the model is evaluated again and its row overwritten (upsert on model_ref,
snapshot_id, split). Without that check a champion evaluated before, say,
eval.max_examples changed was reused with its old example count, and the gate blocked every candidate as unfairly
compared. The batch size is not a setting: left-padded batches give the same greedy outputs as one at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from tasks.context import StepContext
from tasks.data.snapshots import LIVE, read_live, read_split
from tasks.io import s3
from tasks.ml import models

log = logging.getLogger("tasks.ml.evaluation")
EVAL_VERSION = "1"  # bump when prompt rendering, decoding or scoring code changes what an evaluation gives
TEST = "test"


def _answer(model, tokenizer, records: list[dict], ecfg) -> tuple[list[dict], list[str], float]:
    """(records kept by eval.max_examples, greedy answers to their prompts, seconds the generation took)."""
    from tasks.ml import generation

    if ecfg.max_examples:
        records = records[:ecfg.max_examples]
    prompts = generation.render_prompts(tokenizer, [r["messages"] for r in records])
    t0 = time.monotonic()
    hyps = generation.generate_batched(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size)
    return records, hyps, time.monotonic() - t0


def score(model, tokenizer, records: list[dict], ecfg) -> dict:
    """Generate answers for records (ChatML dicts) and score them against the reference answers."""
    from tasks.ml import metrics

    records, hyps, elapsed = _answer(model, tokenizer, records, ecfg)
    refs = [r["messages"][-1]["content"] for r in records]
    scores = metrics.corpus_scores(hyps, refs)
    weighted = metrics.weighted_score(scores, ecfg.weights)
    intents = [r.get("intent", "") for r in records]
    return {"scores": scores, "weighted_score": weighted, "n": len(records), "seconds": elapsed,
            "examples_per_s": len(records) / max(elapsed, 1e-9),
            "per_intent": metrics.per_intent(hyps, refs, intents, ecfg.weights),
            "outputs": [{"prompt": r["messages"][-2]["content"], "reference": ref, "output": hyp, "intent": i}
                        for r, ref, hyp, i in zip(records, refs, hyps, intents, strict=True)]}


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def live_scores(outputs: list[str], rejected: list[str], versions: list[str]) -> dict:
    """rejected_similarity (mean ROUGE-L F1 of each output against the rejected reply) and repeat_rate (share of
    outputs equal to it, ignoring case and spacing), overall and per model version that gave the rejected reply."""
    from tasks.ml import metrics

    def part(idx: list[int]) -> dict:
        hyps, refs = [outputs[i] for i in idx], [rejected[i] for i in idx]
        repeats = sum(_same_text(h, r) for h, r in zip(hyps, refs, strict=True))
        return {"n": len(idx), "rejected_similarity": metrics.corpus_scores(hyps, refs)["rougeL_f1"],
                "repeat_rate": repeats / len(idx), "repeats": repeats}

    groups: dict[str, list[int]] = {}
    for i, v in enumerate(versions):
        groups.setdefault(v, []).append(i)
    return {**part(list(range(len(outputs)))), "per_version": {v: part(idx) for v, idx in sorted(groups.items())}}


def score_live(model, tokenizer, records: list[dict], ecfg) -> dict:
    """Ask the live set's prompts again (the rejected reply is the last turn of each record) and compare."""
    records, hyps, elapsed = _answer(model, tokenizer, records, ecfg)
    rejected = [r["messages"][-1]["content"] for r in records]
    versions = [str(r.get("model_version") or "unknown") for r in records]
    return {**live_scores(hyps, rejected, versions), "seconds": elapsed,
            "examples_per_s": len(records) / max(elapsed, 1e-9),
            "outputs": [{"prompt": r["messages"][-2]["content"], "rejected": rej, "output": hyp, "model_version": v,
                         "message_id": r.get("message_id"), "repeat": _same_text(hyp, rej)}
                        for r, rej, hyp, v in zip(records, rejected, hyps, versions, strict=True)]}


def eval_settings(cfg) -> dict:
    """What, besides the model and the snapshot, changes an evaluation's outputs or scores; candidate and champion
    must share it to be compared."""
    from tasks.ml.training import device_and_dtype

    device, dtype = device_and_dtype(cfg.training)  # bf16 on a GPU and fp32 on CPU can decode differently
    return {"max_examples": cfg.eval.max_examples, "max_new_tokens": cfg.eval.max_new_tokens, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "attn_implementation": cfg.model.attn_implementation,
            "quantization": cfg.lora.quantization, "version": EVAL_VERSION}


def model_files(cfg, adapter_uri: str | None) -> dict:
    """Which weights were evaluated: a re-run of the same run id may have trained another adapter."""
    return {"base_model": cfg.model.base_model, "revision": cfg.model.revision, "adapter_uri": adapter_uri or ""}


def settings_changes(stored_metrics: dict, wanted: dict) -> str:
    """What differs, for the log: 'max_examples 16 -> 12, max_new_tokens 24 -> 8'."""
    if not all(stored_metrics.get(part) for part in wanted):
        return "it has no settings recorded (made before they were)"
    return ", ".join(f"{k} {stored_metrics[part].get(k)!r} -> {v!r}" for part, values in wanted.items()
                     for k, v in values.items() if stored_metrics[part].get(k) != v)


def stored(model_refs: list[str], snapshot_id: str, split: str = TEST, settings: dict | None = None) -> dict | None:
    """A stored evaluation of the model under any of its names on this snapshot's split whose outputs are still
    in S3; with ``settings`` ({"eval_settings": ..., "model": ...}), only one made with exactly these."""
    from sqlalchemy import select

    from tasks.io import db, schema

    e = schema.evaluations
    query = select(e).where(e.c.model_ref.in_(model_refs), e.c.snapshot_id == snapshot_id,
                            e.c.split == split).order_by(e.c.id)
    rows = db.transaction(lambda conn: conn.execute(query).mappings().all(), what="look up stored evaluations")
    for row in rows:
        if settings is not None and any((row["metrics"] or {}).get(k) != v for k, v in settings.items()):
            continue
        if row["outputs_uri"] and s3.head(row["outputs_uri"]):
            return dict(row)
    return None


def evaluate_model(ctx: StepContext, model_ref: str, snapshot_uri: str, adapter_uri: str | None, base_model: str,
                   mlflow_run: str | None = None, aliases: tuple[str, ...] = (), with_live: bool = True) -> dict:
    """Evaluate one model on the snapshot's test split and, when the snapshot has one, its live set, reusing a
    stored evaluation made with the same settings (also one stored under another name of the same model, e.g. as
    the candidate of the run that released it). Returns {"test": row, "live": row or None}."""
    snapshot_id = snapshot_uri.rstrip("/").rsplit("/", 1)[-1]
    cfg = ctx.config_with({"model.base_model": base_model})
    wanted = {"eval_settings": eval_settings(cfg), "model": model_files(cfg, adapter_uri)}
    loaded: list = []

    def load():  # once per model, and only when some split has to be evaluated
        if not loaded:
            loaded.extend(models.load_for_inference(cfg, adapter_uri))
        return loaded

    job = {"ctx": ctx, "cfg": cfg, "model_ref": model_ref, "refs": [model_ref, *aliases], "snapshot_id": snapshot_id,
           "wanted": wanted, "load": load, "mlflow_run": mlflow_run}
    rows = {TEST: _evaluate(job, TEST, read_split(snapshot_uri, TEST)), LIVE: None}
    if not with_live:
        return rows
    live = read_live(snapshot_uri)
    if live:
        rows[LIVE] = _evaluate(job, LIVE, live)
    else:
        log.info("%s: snapshot %s has no live set (made without data.include_feedback, or no usable thumbs-down "
                 "replies)", model_ref, snapshot_id)
    return rows


def _evaluate(job: dict, split: str, records: list[dict]) -> dict:
    model_ref, snapshot_id, wanted = job["model_ref"], job["snapshot_id"], job["wanted"]
    if row := stored(job["refs"], snapshot_id, split, wanted):
        log.info("%s: reusing its stored %s evaluation on snapshot %s (run %s, %d examples, same settings)",
                 model_ref, split, snapshot_id, row["run_id"], row["n_examples"])
        return row
    if old := stored(job["refs"], snapshot_id, split):
        log.info("%s: its stored %s evaluation on snapshot %s (%d examples) was made with other settings: %s; "
                 "evaluating again", model_ref, split, snapshot_id, old["n_examples"],
                 settings_changes(old["metrics"] or {}, wanted))
    tokenizer, model = job["load"]()
    make: Callable = _test_row if split == TEST else _live_row
    row, outputs = make(job, model, tokenizer, records)
    name = "outputs.jsonl" if split == TEST else f"{split}-outputs.jsonl"
    out_uri = s3.join(f"s3://{job['cfg'].storage.bucket}", "evaluations", s3.safe_key(model_ref), snapshot_id, name)
    s3.put_bytes(out_uri, "\n".join(json.dumps(o, ensure_ascii=False) for o in outputs).encode())
    row.update(run_id=job["ctx"].run_id, model_ref=model_ref, snapshot_id=snapshot_id, split=split,
               outputs_uri=out_uri)
    row["metrics"].update(wanted)

    from tasks.io import db, schema

    # Upsert on the natural key: an evaluation made with other settings is replaced, never kept beside this one.
    db.transaction(lambda conn: db.upsert(conn, schema.evaluations, row, keys=("model_ref", "snapshot_id", "split")),
                   what=f"store the {split} evaluation of {model_ref}")
    return stored([model_ref], snapshot_id, split, wanted)


def _test_row(job: dict, model, tokenizer, records: list[dict]) -> tuple[dict, list[dict]]:
    from tasks.io import tracking

    result = score(model, tokenizer, records, job["cfg"].eval)
    s_ = result["scores"]
    log.info("%s: %d examples in %.1fs (%.2f examples/s): BLEU-1 %.4f BLEU-2 %.4f BLEU-3 %.4f BLEU-4 %.4f "
             "ROUGE-L P %.4f -> weighted %.4f", job["model_ref"], result["n"], result["seconds"],
             result["examples_per_s"], s_["bleu1"], s_["bleu2"], s_["bleu3"], s_["bleu4"], s_["rougeL_precision"],
             result["weighted_score"])
    tracking.log_metrics(job["mlflow_run"], [(f"test_{k}", v, 0) for k, v in s_.items() if k != "n"]
                         + [("test_weighted_score", result["weighted_score"], 0)])
    log_samples(job["mlflow_run"], result["outputs"][:20])
    return ({"n_examples": result["n"], "metrics": {**s_, "examples_per_s": result["examples_per_s"]},
             "per_intent": result["per_intent"], "weighted_score": result["weighted_score"]}, result["outputs"])


def _live_row(job: dict, model, tokenizer, records: list[dict]) -> tuple[dict, list[dict]]:
    from tasks.io import tracking

    result = score_live(model, tokenizer, records, job["cfg"].eval)
    per_version = ", ".join(f"version {v}: {p['rejected_similarity']:.4f}, {p['repeats']}/{p['n']} repeated"
                            for v, p in result["per_version"].items())
    log.info("%s: live set of %d thumbs-down prompts in %.1fs: similarity to the rejected replies %.4f (ROUGE-L F1, "
             "lower is better), %d/%d repeated verbatim (%s)", job["model_ref"], result["n"], result["seconds"],
             result["rejected_similarity"], result["repeats"], result["n"], per_version)
    tracking.log_metrics(job["mlflow_run"], [("live_rejected_similarity", result["rejected_similarity"], 0),
                                             ("live_repeat_rate", result["repeat_rate"], 0)])
    metrics = {k: result[k] for k in ("n", "rejected_similarity", "repeat_rate", "repeats", "per_version",
                                      "examples_per_s")}
    return {"n_examples": result["n"], "metrics": metrics, "per_intent": None, "weighted_score": None}, \
        result["outputs"]


def log_samples(mlflow_run: str | None, outputs: list[dict]) -> None:
    """A sample table (prompt, reference, output) for people, as a Markdown artifact of the MLflow run."""
    if mlflow_run is None:
        return
    from mlflow.tracking import MlflowClient

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:400]

    lines = ["| intent | prompt | reference | output |", "|---|---|---|---|"]
    lines += [f"| {o['intent']} | {cell(o['prompt'])} | {cell(o['reference'])} | {cell(o['output'])} |"
              for o in outputs]
    MlflowClient().log_text(mlflow_run, "\n".join(lines), "evaluation/samples.md")


def summary(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"eval_id": row["id"], "model_ref": row["model_ref"], "weighted_score": row["weighted_score"],
            "n": row["n_examples"], "snapshot_id": row["snapshot_id"]}


def live_summary(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"eval_id": row["id"], "model_ref": row["model_ref"], "n": row["n_examples"],
            "snapshot_id": row["snapshot_id"], "rejected_similarity": row["metrics"]["rejected_similarity"],
            "repeat_rate": row["metrics"]["repeat_rate"]}
