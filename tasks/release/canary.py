"""The canary: a new release serves a share of new conversations beside the champion until a verdict on live signals.

Three parts, top to bottom:

1. Statistics (pure, unit-tested): per arm the error/timeout rate, the thumbs-down rate among rated replies, the rate
   of empty or over-length replies and the p95 latency. A rate counts against the candidate only when the whole
   interval of the difference (candidate - champion, Newcombe's hybrid score interval built from two Wilson
   intervals) lies above the configured margin: noise never rolls back, a real regression does. The p95 latency may
   be at most ``canary_max_latency_ratio`` times the champion's. Too few candidate replies by the time limit is a
   rollback: a canary that was not seen is not promoted.
2. Live signals from Postgres: the assistant replies (and their feedback) of both versions since the canary began.
3. Decisions on the registry (the aliases are the truth) and on the ``releases`` rows: promote (``previous`` keeps
   the old champion, ``champion`` moves to the candidate, ``candidate`` goes), roll back (``candidate`` goes, the
   row says ``rolled_back``), and the manual rollback of ``ecb release rollback``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

log = logging.getLogger("tasks.release.canary")
CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"
ERROR_REASONS = ("error", "timeout")  # finish_reason of a reply that failed (a client leaving is "cancelled")
MIN_LATENCY_REPLIES = 20  # a p95 of fewer replies is noise: the latency check waits for this many on both arms


# --- 1. statistics ------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    """Live signals of one version since the canary began."""

    version: str
    replies: int = 0
    errors: int = 0  # finish_reason error or timeout
    bad: int = 0  # empty, or cut at max_new_tokens
    rated: int = 0
    thumbs_down: int = 0
    latency_p95_ms: float | None = None


@dataclass(frozen=True)
class Limits:
    min_messages: int = 200
    confidence: float = 0.95
    max_error_increase: float = 0.0
    max_thumbs_down_increase: float = 0.0
    max_bad_reply_increase: float = 0.0
    max_latency_ratio: float = 1.5

    @classmethod
    def from_config(cls, release) -> Limits:
        return cls(release.canary_min_messages, release.canary_confidence, release.canary_max_error_increase,
                   release.canary_max_thumbs_down_increase, release.canary_max_bad_reply_increase,
                   release.canary_max_latency_ratio)


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


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (n > 0)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_interval(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float, float, float]:
    """(p1 - p2, low, high): Newcombe's hybrid score interval of a difference of proportions. With no replies on the
    second arm (a canary share of 1) its rate is taken as 0, so the interval is the first arm's Wilson interval."""
    p1 = k1 / n1
    l1, u1 = wilson(k1, n1, z)
    if n2 == 0:
        return p1, l1, u1
    p2 = k2 / n2
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


RATES = (  # (check name, what is counted, denominator, limit field, words in the sentence)
    ("errors", "errors", "replies", "max_error_increase", "errors"),
    ("thumbs_down", "thumbs_down", "rated", "max_thumbs_down_increase", "thumbs-down"),
    ("bad_replies", "bad", "replies", "max_bad_reply_increase", "empty/over-length"),
)


def _rate_check(cand: Arm, champ: Arm, count: str, total: str, limit: float, z: float) -> dict:
    k1, n1, k2, n2 = getattr(cand, count), getattr(cand, total), getattr(champ, count), getattr(champ, total)
    out = {"candidate": [k1, n1], "champion": [k2, n2], "limit": limit, "failed": False, "diff": None,
           "low": None, "high": None}
    if n1 == 0:
        return out  # nothing to judge (e.g. no reply was rated)
    d, low, high = diff_interval(k1, n1, k2, n2, z)
    out.update(diff=d, low=low, high=high, failed=low > limit + 1e-12)
    return out


def _latency_check(cand: Arm, champ: Arm, ratio: float) -> dict:
    c, p = cand.latency_p95_ms, champ.latency_p95_ms
    usable = (c is not None and p is not None and cand.replies >= MIN_LATENCY_REPLIES
              and champ.replies >= MIN_LATENCY_REPLIES)
    return {"candidate": c, "champion": p, "limit": ratio, "failed": bool(usable and c > p * ratio),
            "checked": usable}


def judge(cand: Arm, champ: Arm, limits: Limits) -> Verdict:
    """Promote or roll back the candidate, with the reasons and the one sentence the task log shows."""
    z = z_value(limits.confidence)
    checks = {name: _rate_check(cand, champ, count, total, getattr(limits, lim), z)
              for name, count, total, lim, _ in RATES}
    checks["latency_p95"] = _latency_check(cand, champ, limits.max_latency_ratio)
    reasons = []
    if cand.replies < limits.min_messages:
        reasons.append(f"only {cand.replies} of the {limits.min_messages} candidate replies needed")
    for name, _, _, _, words in RATES:
        if checks[name]["failed"]:
            reasons.append(f"the {words} rate is higher beyond the margin with {limits.confidence:.0%} confidence")
    if checks["latency_p95"]["failed"]:
        reasons.append(f"p95 latency above {limits.max_latency_ratio:g} x the champion's")
    decision = "rollback" if reasons else "promote"
    verdict = Verdict(decision, reasons, checks, "", asdict(cand), asdict(champ))
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
                     f"{_points(c['limit'])})")
    lat = checks["latency_p95"]
    ms = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    parts.append(f"p95 latency {ms(lat['candidate'])} vs {ms(lat['champion'])} ms (limit x{lat['limit']:g}"
                 f"{'' if lat['checked'] else ', too few replies to compare'})")
    outcome = ("promoted: no signal is worse beyond its margin" if decision == "promote"
               else "rolled back: " + "; ".join(reasons))
    return (f"Canary version {cand.version} vs champion {champ.version} on {cand.replies} vs {champ.replies} "
            f"replies: {', '.join(parts)}; {outcome}.")


# --- 2. live signals ----------------------------------------------------------------------------------------------
def arm_stats(versions: list[str], since) -> dict[str, Arm]:
    """Signals of the assistant replies of ``versions`` created at or after ``since`` (a timestamp)."""
    from sqlalchemy import and_, func, select

    from tasks.io import db, schema

    m, f = schema.messages, schema.feedback
    query = (select(m.c.model_version, func.count().label("replies"),
                    func.count().filter(m.c.finish_reason.in_(ERROR_REASONS)).label("errors"),
                    func.count().filter((func.btrim(m.c.content) == "") | (m.c.finish_reason == "length"))
                    .label("bad"),
                    func.count(f.c.id).label("rated"), func.count().filter(f.c.rating == -1).label("thumbs_down"),
                    func.percentile_cont(0.95).within_group(m.c.latency_ms).label("p95"))
             .select_from(m.outerjoin(f, f.c.message_id == m.c.id))
             .where(and_(m.c.role == "assistant", m.c.created_at >= since, m.c.model_version.in_(versions)))
             .group_by(m.c.model_version))
    rows = db.transaction(lambda conn: conn.execute(query).mappings().all(), what="read the canary's replies")
    out = {v: Arm(v) for v in versions}
    for r in rows:
        out[r["model_version"]] = Arm(r["model_version"], r["replies"], r["errors"], r["bad"], r["rated"],
                                      r["thumbs_down"], None if r["p95"] is None else float(r["p95"]))
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


def update_row(row_id: int, detail: str | None = None, **values) -> None:
    """Update one release row; ``detail`` is appended to what earlier steps wrote there."""
    from sqlalchemy import func, literal, update

    from tasks.io import db, schema

    r = schema.releases
    if detail:
        values["detail"] = func.concat_ws(literal(" | "), r.c.detail, literal(detail))
    stmt = update(r).where(r.c.id == row_id).values(updated_at=func.now(), **values)
    db.transaction(lambda conn: conn.execute(stmt), what=f"update release row {row_id}")


# --- 3. decisions -------------------------------------------------------------------------------------------------
def promote(name: str, version: str) -> str | None:
    """Aliases of a promotion; returns the old champion. ``previous`` moves first and ``champion`` before the
    candidate alias goes, so a failure part-way leaves a state a rerun completes."""
    from tasks.release import registry

    found = registry.aliases(name)
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


def manual_rollback(name: str, to: str | None, by: str, reason: str) -> dict:
    """``ecb release rollback``: champion -> ``to``, previous -> the demoted champion, any canary ended; the demoted
    version's release row says ``rolled_back`` with who and why, and a ``rollback-...`` row records the event for the
    target version. Without ``to``: during a canary the champion stays (the canary ends), else the ``previous``
    alias becomes the champion."""
    from tasks.release import registry

    found = registry.aliases(name)
    current = found.get(CHAMPION)
    target = str(to or (current if found.get(CANDIDATE) else found.get(PREVIOUS)) or "")
    if not target:
        raise RollbackError(f"{name} has no 'previous' alias: say which version to roll back to (--to VERSION)")
    if registry.version_tags(name, target) is None:
        raise RollbackError(f"{name} has no version {target}")
    if target == current and not found.get(CANDIDATE):
        raise RollbackError(f"version {target} already is the champion of {name} and no canary runs")
    if current and current != target:
        registry.set_alias(name, PREVIOUS, current)
    registry.set_alias(name, CHAMPION, target)
    ended = found.get(CANDIDATE)
    if ended:
        registry.delete_alias(name, CANDIDATE)
    demoted = [v for v in dict.fromkeys([current, ended]) if v and v != target]
    _record_rollback(name, target, demoted, by, reason)
    return {"champion": target, "demoted": demoted, "previous": current if current != target else found.get(PREVIOUS),
            "ended_canary": ended}


def _record_rollback(name: str, target: str, demoted: list[str], by: str, reason: str) -> None:
    import time

    from sqlalchemy import func, insert

    from tasks.io import db, schema

    for version in demoted:
        row = release_row(name, version)
        if row is not None:
            update_row(row["id"], f"rolled back to version {target} by {by}: {reason}", status="rolled_back",
                       decided_at=func.now(), actor=by, reason=reason)
    base = release_row(name, target) or {}
    event = {"run_id": f"rollback-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{target}-{time.time_ns() % 10**6}",
             "snapshot_id": base.get("snapshot_id") or "unknown", "config_hash": base.get("config_hash") or "unknown",
             "registry_version": target, "registered_model": name, "service_url": base.get("service_url"),
             "status": "deployed",
             "actor": by, "reason": reason, "decided_at": func.now(),
             "detail": f"rollback of {name}: champion -> version {target} (from {', '.join(demoted) or 'none'}) by "
                       f"{by}: {reason}"}
    db.transaction(lambda conn: conn.execute(insert(schema.releases).values(**event)), what="record the rollback")


def current_champion(name: str) -> str:
    from tasks.release import registry

    champion = registry.aliases(name).get(CHAMPION)
    if not champion:
        raise CanaryError(f"{name} has no champion alias")
    return champion
