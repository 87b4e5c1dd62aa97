"""Scoring a model on a snapshot's test split: batched greedy generation, BLEU/ROUGE, per-intent scores; one stored
evaluation per (model, snapshot) in Postgres `evaluations`, outputs in S3, metrics and a sample table in MLflow."""

from __future__ import annotations

import json
import logging
import time

from tasks.context import StepContext
from tasks.data.snapshots import read_split
from tasks.io import s3
from tasks.ml import models

log = logging.getLogger("tasks.ml.evaluation")


def score(model, tokenizer, records: list[dict], ecfg) -> dict:
    """Generate answers for records (ChatML dicts) and score them against the reference answers."""
    from tasks.ml import generation, metrics

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


def stored(model_refs: list[str], snapshot_id: str) -> dict | None:
    """A stored evaluation of the model under any of its names on this snapshot's test split."""
    from sqlalchemy import select

    from tasks.io import db, schema

    e = schema.evaluations
    with db.engine().connect() as conn:
        row = conn.execute(select(e).where(e.c.model_ref.in_(model_refs), e.c.snapshot_id == snapshot_id,
                                           e.c.split == "test").order_by(e.c.id)).mappings().first()
    return dict(row) if row and row["outputs_uri"] and s3.head(row["outputs_uri"]) else None


def evaluate_model(ctx: StepContext, model_ref: str, snapshot_uri: str, adapter_uri: str | None, base_model: str,
                   mlflow_run: str | None = None, aliases: tuple[str, ...] = ()) -> dict:
    """Evaluate one model on the snapshot's test split (or reuse its stored evaluation, also one stored under
    another name of the same model, e.g. as the candidate of the run that released it); returns the DB row."""
    from tasks.io import db, schema, tracking

    snapshot_id = snapshot_uri.rstrip("/").rsplit("/", 1)[-1]
    if row := stored([model_ref, *aliases], snapshot_id):
        log.info("%s: reusing its stored evaluation on snapshot %s (run %s, weighted %.4f)", model_ref, snapshot_id,
                 row["run_id"], row["weighted_score"])
        return row
    cfg = ctx.config_with({"model.base_model": base_model})
    tokenizer, model = models.load_for_inference(cfg, adapter_uri)
    result = score(model, tokenizer, read_split(snapshot_uri, "test"), cfg.eval)
    s_ = result["scores"]
    log.info("%s: %d examples in %.1fs (%.2f examples/s): BLEU-1 %.4f BLEU-2 %.4f BLEU-3 %.4f BLEU-4 %.4f "
             "ROUGE-L P %.4f -> weighted %.4f", model_ref, result["n"], result["seconds"], result["examples_per_s"],
             s_["bleu1"], s_["bleu2"], s_["bleu3"], s_["bleu4"], s_["rougeL_precision"], result["weighted_score"])
    out_uri = s3.join(f"s3://{cfg.storage.bucket}", "evaluations", s3.safe_key(model_ref), snapshot_id,
                      "outputs.jsonl")
    s3.put_bytes(out_uri, "\n".join(json.dumps(o, ensure_ascii=False) for o in result["outputs"]).encode())
    row = {"run_id": ctx.run_id, "model_ref": model_ref, "snapshot_id": snapshot_id, "split": "test",
           "n_examples": result["n"], "metrics": {**s_, "examples_per_s": result["examples_per_s"]},
           "per_intent": result["per_intent"], "weighted_score": result["weighted_score"], "outputs_uri": out_uri}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.evaluations, row, keys=("model_ref", "snapshot_id", "split"))
    tracking.log_metrics(mlflow_run, [(f"test_{k}", v, 0) for k, v in s_.items() if k != "n"]
                         + [("test_weighted_score", result["weighted_score"], 0)])
    log_samples(mlflow_run, result["outputs"][:20])
    return stored([model_ref], snapshot_id)


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
