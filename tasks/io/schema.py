"""Results schema of the platform database (SQLAlchemy Core). Alembic migrations in tasks/migrations create it.

Every table has a natural key (run id, snapshot id, study + trial number...) so steps upsert instead of insert:
a retried or re-run step overwrites its row rather than adding a second one.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()


def _ts(name: str = "created_at") -> Column:
    return Column(name, DateTime(timezone=True), nullable=False, server_default=func.now())


pipeline_runs = Table(
    "pipeline_runs", metadata,
    Column("run_id", String(250), primary_key=True),
    Column("dag_id", String(250)),
    Column("status", String(32), nullable=False, server_default="running"),
    Column("config", JSONB),
    Column("config_hash", String(64)),
    Column("snapshot_id", String(64)),
    Column("hpo", JSONB),  # study name, trial counts, best trial and its parameters
    _ts(), _ts("updated_at"),
)

raw_manifests = Table(
    "raw_manifests", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, unique=True),
    Column("source", Text, nullable=False),
    Column("manifest_uri", Text, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("n_objects", Integer, nullable=False),
    Column("n_bytes", BigInteger, nullable=False),
    Column("n_copied", Integer, nullable=False),
    Column("objects", JSONB, nullable=False),
    _ts(),
)

snapshots = Table(
    "snapshots", metadata,
    Column("snapshot_id", String(64), primary_key=True),
    Column("raw_digest", String(64), nullable=False),
    Column("prep_config_hash", String(64), nullable=False),
    Column("uri", Text, nullable=False),
    Column("rows_in", Integer, nullable=False),
    Column("rows_kept", Integer, nullable=False),
    Column("rows_quarantined", Integer, nullable=False),
    Column("rows_sampled_out", Integer, nullable=False, server_default="0"),
    Column("n_train", Integer, nullable=False),
    Column("n_validation", Integer, nullable=False),
    Column("n_test", Integer, nullable=False),
    Column("quarantine_reasons", JSONB, nullable=False),
    Column("created_by_run", String(250)),
    _ts(),
)

hpo_trials = Table(
    "hpo_trials", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("study_name", String(250), nullable=False),
    Column("trial_number", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("params", JSONB),
    Column("value", Float),
    Column("error", Text),
    Column("mlflow_run_id", String(64)),
    _ts(), _ts("updated_at"),
    UniqueConstraint("study_name", "trial_number", name="uq_hpo_trials_study_trial"),
)

training_runs = Table(
    "training_runs", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("kind", String(16), nullable=False, server_default="final"),
    Column("snapshot_id", String(64), nullable=False),
    Column("base_model", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("adapter_uri", Text),
    Column("mlflow_run_id", String(64)),
    Column("params", JSONB),
    Column("metrics", JSONB),
    Column("last_step", Integer),
    _ts(), _ts("updated_at"),
    UniqueConstraint("run_id", "kind", name="uq_training_runs_run_kind"),
)

evaluations = Table(
    "evaluations", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("model_ref", Text, nullable=False),
    Column("snapshot_id", String(64), nullable=False),
    Column("split", String(16), nullable=False),
    Column("n_examples", Integer, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Column("per_intent", JSONB),
    Column("weighted_score", Float),
    Column("outputs_uri", Text),
    _ts(),
    UniqueConstraint("model_ref", "snapshot_id", "split", name="uq_evaluations_model_snapshot_split"),
)

gate_decisions = Table(
    "gate_decisions", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, unique=True),
    Column("candidate_eval_id", BigInteger, ForeignKey("evaluations.id")),
    Column("champion_eval_id", BigInteger, ForeignKey("evaluations.id")),
    Column("release", Boolean, nullable=False),
    Column("forced", Boolean, nullable=False, server_default="false"),
    Column("score_delta", Float),
    Column("ci_low", Float),
    Column("ci_high", Float),
    Column("threshold", Float),
    Column("reasons", JSONB, nullable=False),
    Column("summary", Text, nullable=False),
    # a person's answer (0005), written by record_approval: approved / rejected / timed_out, NULL = nobody asked
    Column("approval_status", String(16)),
    Column("approval_reason", Text),
    Column("approval_by", String(250)),
    Column("approval_comment", Text),
    Column("approval_at", DateTime(timezone=True)),
    _ts(),
)

releases = Table(
    "releases", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, unique=True),
    Column("snapshot_id", String(64), nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("registry_version", String(32)),
    # (0006) the version's registered model: release.registered_model is per run, each model counts from 1
    Column("registered_model", String(250)),
    Column("hub_repo", Text),
    Column("hub_revision", String(64)),
    Column("service_url", Text),
    Column("status", String(32), nullable=False),
    Column("detail", Text),
    # canary (0004): the share it got, when the service first served it, and the verdict; who/why of a rollback
    Column("canary_share", Float),
    Column("canary_started_at", DateTime(timezone=True)),
    Column("decided_at", DateTime(timezone=True)),
    Column("verdict", JSONB),
    Column("actor", String(128)),
    Column("reason", Text),
    _ts(), _ts("updated_at"),
    Index("ix_releases_model_version", "registered_model", "registry_version"),
)

conversations = Table(
    "conversations", metadata,
    Column("id", String(64), primary_key=True),
    Column("client_token_hash", String(128), nullable=False),
    Column("model_version", String(128)),
    _ts(),
)

messages = Table(
    "messages", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("conversation_id", String(64), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("model_version", String(128)),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("finish_reason", String(16)),
    _ts(),
    Index("ix_messages_created_at", "created_at"),  # the canary verdict reads the replies since the canary began
)

feedback = Table(
    "feedback", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("message_id", BigInteger, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("rating", SmallInteger, nullable=False),
    Column("model_version", String(128)),
    _ts(),
)
