"""The canary: a new release serves a share of new conversations beside the champion until a verdict on live signals.

Three parts, top to bottom:

1. Statistics (pure, unit-tested; the methods are in ``canary_stats``): per arm the error/timeout rate, the
   thumbs-down rate among rated replies, the rate of empty or over-length replies and the p95 latency. The
   conversation is the unit: each rate difference (candidate - champion) is tested one-sided against its margin on
   counts adjusted for the clustering of replies in conversations, and the three tests are Holm-corrected as one
   family, so a candidate no worse than the champion is rolled back at most ``1 - canary_confidence`` of the time
   and a real regression is caught. The p95 latency may be at most ``canary_max_latency_ratio`` times the
   champion's. A canary is judged only once seen enough (``unseen``: ``canary_min_messages`` candidate replies and
   ``canary_min_rated`` rated replies on each arm); one still short of that at the time limit is rolled back: a
   canary that was not seen is not promoted.
2. Live signals from Postgres: per conversation, the first ``canary_max_replies_per_conversation`` assistant replies
   (and their feedback) of both versions since the canary began.
3. Decisions on the registry (the aliases are the truth) and on the ``releases`` rows: promote (``previous`` keeps
   the old champion, ``champion`` moves to the candidate, ``candidate`` goes), roll back (``candidate`` goes, the
   row says ``rolled_back``), and the manual rollback of ``ecb release rollback``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from tasks.release import canary_stats

log = logging.getLogger("tasks.release.canary")
CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"
ERROR_REASONS = ("error", "timeout")  # finish_reason of a reply that failed (a client leaving is "cancelled")
MIN_LATENCY_REPLIES = 20  # a p95 of fewer replies is noise: the latency check waits for this many on both arms


# --- 1. statistics ------------------------------------------------------------------------------------------------
COUNTS = ("replies", "errors", "bad", "rated", "thumbs_down")  # Arm.counts' columns, one row per conversation


@dataclass
class Arm:
    """Live signals of one version since the canary began, per conversation (its first
    ``release.canary_max_replies_per_conversation`` replies): replies, errors (finish_reason error or timeout), bad
    replies (empty, or cut at max_new_tokens), rated replies and thumbs-down; and the p95 latency of those replies."""

    version: str
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, len(COUNTS)), dtype=np.int64))
    latency_p95_ms: float | None = None

    def __post_init__(self):
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1, len(COUNTS))

    def column(self, name: str) -> np.ndarray:
        return self.counts[:, COUNTS.index(name)]

    def total(self, name: str) -> int:
        return int(self.column(name).sum())

    @property
    def conversations(self) -> int:
        return len(self.counts)

    @property
    def replies(self) -> int:
        return self.total("replies")

    @property
    def rated(self) -> int:
        return self.total("rated")

    def summary(self) -> dict:
        """The totals (what the verdict stores and the steps report); the per-conversation rows stay out."""
        return {"version": self.version, "conversations": self.conversations,
                **{name: self.total(name) for name in COUNTS}, "latency_p95_ms": self.latency_p95_ms}


@dataclass(frozen=True)
class Limits:
    min_messages: int = 2000
    confidence: float = 0.95
    max_error_increase: float = 0.0
    max_thumbs_down_increase: float = 0.0
    max_bad_reply_increase: float = 0.0
    max_latency_ratio: float = 1.5
    min_rated: int = 200

    @classmethod
    def from_config(cls, release) -> Limits:
        return cls(release.canary_min_messages, release.canary_confidence, release.canary_max_error_increase,
                   release.canary_max_thumbs_down_increase, release.canary_max_bad_reply_increase,
                   release.canary_max_latency_ratio, release.canary_min_rated)


@dataclass
class Verdict:
    decision: str  # "promote" or "rollback"
    reasons: list[str]
    checks: dict
    sentence: str
    candidate: dict = field(default_factory=dict)
    champion: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


RATES = (  # (check name, what is counted, denominator, limit field, words in the sentence)
    ("errors", "errors", "replies", "max_error_increase", "errors"),
    ("thumbs_down", "thumbs_down", "rated", "max_thumbs_down_increase", "thumbs-down"),
    ("bad_replies", "bad", "replies", "max_bad_reply_increase", "empty/over-length"),
)


def unseen(cand: Arm, champ: Arm, limits: Limits) -> list[str]:
    """What the canary still lacks to be judged: candidate replies, and rated replies on either arm (a thumbs-down
    rate of a handful of ratings, or of none, proves nothing). Empty: it can be judged. The waiting task waits while
    this is not empty; a verdict given with something missing (the time limit) rolls back, never promotes."""
    missing = []
    if cand.replies < limits.min_messages:
        missing.append(f"only {cand.replies} of the {limits.min_messages} candidate replies needed")
    for arm, who in ((cand, "candidate"), (champ, "champion")):
        if arm.rated < limits.min_rated:
            missing.append(f"only {arm.rated} of the {limits.min_rated} rated {who} replies needed to judge the "
                           "thumbs-down rate")
    return missing


def _rate_checks(cand: Arm, champ: Arm, limits: Limits) -> dict:
    """The three rate differences, each with conversations as the unit, then Holm over the three as one family."""
    checks = {}
    for name, count, total, lim, _ in RATES:
        limit = getattr(limits, lim)
        result = canary_stats.compare(cand.column(count), cand.column(total), champ.column(count),
                                      champ.column(total), limit, limits.confidence)
        checks[name] = {"candidate": [cand.total(count), cand.total(total)],
                        "champion": [champ.total(count), champ.total(total)], "limit": limit, **result}
    failed, adjusted = canary_stats.holm([c["p_value"] for c in checks.values()], limits.confidence)
    for check, fail, p_holm in zip(checks.values(), failed, adjusted, strict=True):
        check.update(p_holm=p_holm, failed=fail)
    return checks


def _latency_check(cand: Arm, champ: Arm, ratio: float) -> dict:
    c, p = cand.latency_p95_ms, champ.latency_p95_ms
    usable = (c is not None and p is not None and cand.replies >= MIN_LATENCY_REPLIES
              and champ.replies >= MIN_LATENCY_REPLIES)
    return {"candidate": c, "champion": p, "limit": ratio, "failed": bool(usable and c > p * ratio),
            "checked": usable}


def judge(cand: Arm, champ: Arm, limits: Limits) -> Verdict:
    """Promote or roll back the candidate, with the reasons and the one sentence the task log shows. Promote only
    when it was seen enough (``unseen`` is empty) and no check failed."""
    checks = _rate_checks(cand, champ, limits)
    checks["latency_p95"] = _latency_check(cand, champ, limits.max_latency_ratio)
    reasons = unseen(cand, champ, limits)
    for name, _, _, _, words in RATES:
        if checks[name]["failed"]:
            reasons.append(f"the {words} rate is higher beyond the margin with {limits.confidence:.0%} confidence "
                           "(Holm-corrected)")
    if checks["latency_p95"]["failed"]:
        reasons.append(f"p95 latency above {limits.max_latency_ratio:g} x the champion's")
    decision = "rollback" if reasons else "promote"
    verdict = Verdict(decision, reasons, checks, "", cand.summary(), champ.summary())
    verdict.sentence = sentence(cand, champ, checks, limits, decision, reasons)
    return verdict


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "n/a"


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def sentence(cand: Arm, champ: Arm, checks: dict, limits: Limits, decision: str, reasons: list[str]) -> str:
    """One sentence: the numbers of every check and the decision with its reason."""
    parts = []
    for name, _, total, _, words in RATES:
        c = checks[name]
        (k1, n1), (k2, n2) = c["candidate"], c["champion"]
        of = f" of {n1} vs {n2} rated" if total == "rated" else ""
        parts.append(f"{words} {_pct(k1, n1)} vs {_pct(k2, n2)}{of} (difference {_points(c['diff'])} points, "
                     f"{limits.confidence:.0%} CI {_points(c['low'])}..{_points(c['high'])}, limit "
                     f"{_points(c['limit'])}, Holm p {c['p_holm']:.3g})")
    lat = checks["latency_p95"]
    ms = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    parts.append(f"p95 latency {ms(lat['candidate'])} vs {ms(lat['champion'])} ms (limit x{lat['limit']:g}"
                 f"{'' if lat['checked'] else ', too few replies to compare'})")
    outcome = ("promoted: no signal is worse beyond its margin" if decision == "promote"
               else "rolled back: " + "; ".join(reasons))
    return (f"Canary version {cand.version} vs champion {champ.version} on {cand.replies} vs {champ.replies} "
            f"replies in {cand.conversations} vs {champ.conversations} conversations: {', '.join(parts)}; "
            f"{outcome}.")


# --- 2. live signals ----------------------------------------------------------------------------------------------
def arm_stats(versions: list[str], since, per_conversation: int) -> dict[str, Arm]:
    """Signals of the assistant replies of ``versions`` created at or after ``since`` (a timestamp), one row per
    conversation, counting only the first ``per_conversation`` replies of each: one long conversation (one client)
    cannot make up the sample."""
    from sqlalchemy import and_, func, select

    from tasks.io import db, schema

    m, f = schema.messages, schema.feedback
    nth = func.row_number().over(partition_by=m.c.conversation_id, order_by=m.c.id).label("nth")
    r = (select(m.c.id, m.c.conversation_id, m.c.model_version, m.c.finish_reason, m.c.content, m.c.latency_ms, nth)
         .where(and_(m.c.role == "assistant", m.c.created_at >= since, m.c.model_version.in_(versions)))
         .subquery())
    counted = r.c.nth <= per_conversation
    per_conv = (select(r.c.model_version, func.count().label("replies"),
                       func.count().filter(r.c.finish_reason.in_(ERROR_REASONS)).label("errors"),
                       func.count().filter((func.btrim(r.c.content) == "") | (r.c.finish_reason == "length"))
                       .label("bad"),
                       func.count(f.c.id).label("rated"), func.count().filter(f.c.rating == -1).label("thumbs_down"))
                .select_from(r.outerjoin(f, f.c.message_id == r.c.id)).where(counted)
                .group_by(r.c.model_version, r.c.conversation_id))
    p95 = (select(r.c.model_version, func.percentile_cont(0.95).within_group(r.c.latency_ms).label("p95"))
           .where(counted).group_by(r.c.model_version))

    def read(conn):
        return conn.execute(per_conv).all(), dict(conn.execute(p95).all())

    rows, latency = db.transaction(read, what="read the canary's replies")
    out = {}
    for v in versions:
        counts = [row[1:] for row in rows if row[0] == v]
        out[v] = Arm(v, counts, None if latency.get(v) is None else float(latency[v]))
    return out


def release_row(name: str, version: str) -> dict | None:
    """The newest ``releases`` row of version ``version`` of registered model ``name`` (rows from before migration
    0006 have no model and match any), with the database's clock as ``now``."""
    from sqlalchemy import func, select

    from tasks.io import db, schema

    r = schema.releases
    query = (select(r, func.now().label("now")).where(r.c.registry_version == str(version))
             .where(r.c.registered_model.is_(None) | (r.c.registered_model == name))
             .where(~r.c.run_id.like("rollback-%")).order_by(r.c.id.desc()).limit(1))
    row = db.transaction(lambda conn: conn.execute(query).mappings().first(), what="read the release row")
    return dict(row) if row else None


def run_row(run_id: str) -> dict | None:
    """{"id", "status"} of the ``releases`` row of pipeline run ``run_id`` (None: the run released nothing)."""
    from sqlalchemy import select

    from tasks.io import db, schema

    r = schema.releases
    row = db.transaction(lambda conn: conn.execute(select(r.c.id, r.c.status).where(r.c.run_id == run_id))
                         .mappings().first(), what="read the run's release row")
    return dict(row) if row else None


def update_row(row_id: int, detail: str | None = None, **values) -> None:
    """Update one release row; ``detail`` is appended to what earlier steps wrote there, once: a transaction run
    again after a lost commit reply (db.transaction retries) or a retried step finds its text there and adds none."""
    from sqlalchemy import case, func, literal, update

    from tasks.io import db, schema

    r = schema.releases
    if detail:
        values["detail"] = case((func.strpos(func.coalesce(r.c.detail, ""), literal(detail)) > 0, r.c.detail),
                                else_=func.concat_ws(literal(" | "), r.c.detail, literal(detail)))
    stmt = update(r).where(r.c.id == row_id).values(updated_at=func.now(), **values)
    db.transaction(lambda conn: conn.execute(stmt), what=f"update release row {row_id}")


# --- 3. decisions -------------------------------------------------------------------------------------------------
def promote(name: str, version: str) -> str | None:
    """Aliases of a promotion; returns the old champion. ``previous`` moves first and ``champion`` before the
    candidate alias goes, so a failure part-way leaves a state a rerun completes. Refused (CanaryError) when
    ``version`` is neither the candidate nor already the champion: the canary was ended by hand meanwhile, and a
    verdict judged before that must not bring it back."""
    from tasks.release import registry

    found = registry.aliases(name)
    if str(version) not in (found.get(CANDIDATE), found.get(CHAMPION)):
        raise CanaryEnded(f"version {version} of {name} is no longer the candidate (candidate: "
                          f"{found.get(CANDIDATE)}, champion: {found.get(CHAMPION)}): its canary was ended by hand "
                          "meanwhile, so it is not promoted")
    old = found.get(CHAMPION)
    if old and old != str(version):
        registry.set_alias(name, PREVIOUS, old)
    registry.set_alias(name, CHAMPION, str(version))
    if found.get(CANDIDATE) == str(version):
        registry.delete_alias(name, CANDIDATE)
    return old if old != str(version) else registry.aliases(name).get(PREVIOUS)


def end_canary(name: str, version: str) -> bool:
    """Rollback of a canary: the candidate alias goes (only when it still names ``version``); the champion stays."""
    from tasks.release import registry

    if registry.aliases(name).get(CANDIDATE) != str(version):
        return False
    return registry.delete_alias(name, CANDIDATE)


class CanaryError(ValueError):
    """A release decision that cannot be made as asked (no champion, no such version); the message says why."""


class RollbackError(CanaryError):
    """A manual rollback that cannot be done (no such version, nothing to roll back to)."""


class CanaryEnded(CanaryError):
    """The canary to act on is over already (ended by hand): nothing is moved."""


def rollback_event_id(run_id: str) -> str:
    """The ``releases`` row of one rollback: one per pipeline run, so every try of that run finds the same one."""
    return run_id if run_id.startswith("rollback-") else f"rollback-{run_id}"


def plan_rollback(name: str, to: str | None) -> dict:
    """Where the aliases go, worked out once from the aliases as they are before anything moves. Without ``to``:
    during a canary the champion stays (the canary ends), else the ``previous`` alias becomes the champion."""
    from tasks.release import registry

    found = registry.aliases(name)
    current, ended = found.get(CHAMPION), found.get(CANDIDATE)
    target = str(to or (current if ended else found.get(PREVIOUS)) or "")
    if not target:
        raise RollbackError(f"{name} has no 'previous' alias: say which version to roll back to (--to VERSION)")
    if registry.version_tags(name, target) is None:
        raise RollbackError(f"{name} has no version {target}")
    if target == current and not ended:
        raise RollbackError(f"version {target} already is the champion of {name} and no canary runs")
    return {"registered_model": name, "champion": target, "from_champion": current, "ended_canary": ended,
            "previous": current if current and current != target else found.get(PREVIOUS),
            "demoted": [v for v in dict.fromkeys([current, ended]) if v and v != target]}


def manual_rollback(name: str, to: str | None, by: str, reason: str, run_id: str) -> dict:
    """``ecb release rollback`` and the rollback DAG: champion -> the target, previous -> the demoted champion, any
    canary ended; the demoted versions' release rows say ``rolled_back`` with who and why, and the run's
    ``rollback-...`` row records the event. Idempotent per ``run_id``: the first try stores its plan in that row
    before any alias moves, and a retry finishes that same plan instead of planning again from aliases it already
    moved (which would swap the champion back and forth)."""
    event = rollback_event_id(run_id)
    plan = _stored_plan(event)
    if plan is None:
        _store_plan(event, plan_rollback(name, to), by, reason)
        plan = _stored_plan(event)  # a concurrent try may have stored its plan first: follow that one
    else:
        log.info("Rollback %s was planned by an earlier try: champion -> version %s (from %s); finishing it.", event,
                 plan["champion"], plan["from_champion"])
    _move_aliases(name, plan)
    _record_rollback(name, plan, by, reason, event)
    return plan


def _move_aliases(name: str, plan: dict) -> None:
    """The plan's aliases; each call sets the same values, so running it again changes nothing."""
    from tasks.release import registry

    if plan["previous"] and plan["previous"] != plan["champion"]:
        registry.set_alias(name, PREVIOUS, plan["previous"])
    registry.set_alias(name, CHAMPION, plan["champion"])
    if plan["ended_canary"]:
        end_canary(name, plan["ended_canary"])


def _stored_plan(event: str) -> dict | None:
    from sqlalchemy import select

    from tasks.io import db, schema

    r = schema.releases
    row = db.transaction(lambda conn: conn.execute(select(r.c.verdict).where(r.c.run_id == event)).first(),
                         what="read the rollback's plan")
    return (row.verdict or {}).get("rollback") if row else None


def _store_plan(event: str, plan: dict, by: str, reason: str) -> None:
    """The run's rollback row with the plan, status ``rolling_back`` until the aliases moved; inserted once."""
    from sqlalchemy import func

    from tasks.io import db, schema

    name, target = plan["registered_model"], plan["champion"]
    base = release_row(name, target) or {}
    row = {"run_id": event, "snapshot_id": base.get("snapshot_id") or "unknown",
           "config_hash": base.get("config_hash") or "unknown", "registry_version": target, "registered_model": name,
           "service_url": base.get("service_url"), "status": "rolling_back", "actor": by, "reason": reason,
           "verdict": {"rollback": plan}, "decided_at": func.now(),
           "detail": f"rollback of {name}: champion -> version {target} (from {', '.join(plan['demoted']) or 'none'}) "
                     f"by {by}: {reason}"}
    db.transaction(lambda conn: db.upsert(conn, schema.releases, row, keys=("run_id",), update=()),
                   what="store the rollback's plan")


def _record_rollback(name: str, plan: dict, by: str, reason: str, event: str) -> None:
    """After the aliases moved: the demoted versions' rows say ``rolled_back``, the event row ``deployed``."""
    from sqlalchemy import func, update

    from tasks.io import db, schema

    target = plan["champion"]
    for version in plan["demoted"]:
        row = release_row(name, version)
        if row is not None:
            update_row(row["id"], f"rolled back to version {target} by {by}: {reason}", status="rolled_back",
                       decided_at=func.now(), actor=by, reason=reason)
    stmt = (update(schema.releases).where(schema.releases.c.run_id == event)
            .values(status="deployed", updated_at=func.now()))
    db.transaction(lambda conn: conn.execute(stmt), what="record the rollback")


def current_champion(name: str) -> str:
    from tasks.release import registry

    champion = registry.aliases(name).get(CHAMPION)
    if not champion:
        raise CanaryError(f"{name} has no champion alias")
    return champion
