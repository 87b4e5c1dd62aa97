"""Rated chat replies as data (data.include_feedback): thumbs-up pairs for training, thumbs-down ones for review and
for the held-out live eval set.

The chat service writes conversations / messages / feedback (tasks/chat/store.py). ``read_rated`` reads every rated
reply with the user turn it answered; ``shape`` (pure) decides where each one goes:

* thumbs-up (rating 1) -> a ChatML record (system prompt, user turn, reply; ``source: "feedback"``) appended to the
  TRAIN split only, unless it is unusable (reasons in ``SKIP_REASONS``) or its instruction is one of the raw data's
  (any split: a live copy of a test question must not be trained on) or a copy of an earlier feedback pair;
* thumbs-down (rating -1) -> ``review.jsonl`` (every one, as stored, for people) and, when usable, ``live.jsonl``: a
  ChatML record whose assistant turn is the *rejected* reply. The evaluate step asks each model these prompts again
  and measures how close its answers stay to what users rejected. Live prompts that are also raw-data or feedback
  training instructions are left out, so the live set stays held out.

Only first-turn replies are used for train and live: a later reply answers earlier turns too, which a
single-turn record would drop (it would teach answers to context the prompt does not show). Every row read is
counted exactly once, so the counts reconcile:
``rows_read == thumbs_up + thumbs_down + other_rating``, ``thumbs_up == added_to_train + sum(skipped_train)``,
``thumbs_down == to_review == to_live + sum(skipped_live)``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from tasks.config import DataConfig
from tasks.data import chatml

SOURCE = "feedback"
SKIP_REASONS = ("not_a_reply", "no_user_turn", "later_turn", "empty_field", "too_long", "control_token",
                "incomplete_reply", "in_raw_data", "in_train", "duplicate")


@dataclass
class Rated:
    """One feedback row with the reply it rates and the user turn right before that reply."""

    feedback_id: int
    rating: int
    message_id: int
    conversation_id: str
    role: str  # of the rated message: always "assistant" when written by the chat API
    reply: str
    finish_reason: str | None  # stop = complete; length / timeout / cancelled / error = cut off
    model_version: str | None
    user_text: str | None  # None when the message before the reply is not a user turn
    turn: int  # user turns up to the reply: 1 = it answers the conversation's first message
    rated_at: str  # ISO time of the rating


@dataclass
class FeedbackResult:
    train: list[dict] = field(default_factory=list)
    review: list[dict] = field(default_factory=list)
    live: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Of everything the snapshot gets from feedback (part of its id)."""
        h = hashlib.sha256()
        for part in (self.train, self.review, self.live):
            h.update(chatml.splits_to_jsonl(part) + b"\x00")
        return h.hexdigest()


def read_rated() -> list[Rated]:
    """Every rated message, oldest rating first, with the message before it (window functions, one query)."""
    from sqlalchemy import case, func, select

    from tasks.io import db, schema

    m, f = schema.messages, schema.feedback
    w = {"partition_by": m.c.conversation_id, "order_by": m.c.id}
    rated_conversations = select(m.c.conversation_id).join(f, f.c.message_id == m.c.id)
    turns = (select(m.c.id, m.c.conversation_id, m.c.role, m.c.content, m.c.finish_reason, m.c.model_version,
                    func.lag(m.c.role).over(**w).label("prev_role"),
                    func.lag(m.c.content).over(**w).label("prev_content"),
                    func.sum(case((m.c.role == "user", 1), else_=0)).over(**w).label("user_turns"))
             .where(m.c.conversation_id.in_(rated_conversations)).subquery())
    query = (select(f.c.id.label("feedback_id"), f.c.rating, f.c.model_version.label("rated_version"),
                    f.c.created_at.label("rated_at"), turns.c.id.label("message_id"), turns.c.conversation_id,
                    turns.c.role, turns.c.content, turns.c.finish_reason, turns.c.model_version, turns.c.prev_role,
                    turns.c.prev_content, turns.c.user_turns)
             .join(turns, turns.c.id == f.c.message_id).order_by(f.c.id))
    rows = db.transaction(lambda conn: conn.execute(query).mappings().all(), what="read the chat feedback")
    return [Rated(feedback_id=r["feedback_id"], rating=int(r["rating"]), message_id=r["message_id"],
                  conversation_id=r["conversation_id"], role=r["role"], reply=r["content"],
                  finish_reason=r["finish_reason"], model_version=r["rated_version"] or r["model_version"],
                  user_text=r["prev_content"] if r["prev_role"] == "user" else None, turn=int(r["user_turns"] or 0),
                  rated_at=r["rated_at"].isoformat()) for r in rows]


def raw_instruction_keys(splits: dict[str, list[dict]]) -> set[str]:
    """instruction_key of every user turn in the raw data's splits (train, validation and test)."""
    return {chatml.instruction_key(m["content"]) for records in splits.values() for r in records
            for m in r["messages"] if m["role"] == "user"}


def collect(cfg: DataConfig, splits: dict[str, list[dict]]) -> FeedbackResult:
    """Read the rated replies and shape them against the raw data's splits."""
    return shape(read_rated(), raw_instruction_keys(splits), cfg)


def _usable(r: Rated, cfg: DataConfig, complete: bool) -> tuple[str | None, str, str]:
    """(skip reason or None, cleaned user text, cleaned reply); the same checks as raw rows get, plus the turn."""
    if r.role != "assistant":
        return "not_a_reply", "", ""
    if r.user_text is None:
        return "no_user_turn", "", ""
    if r.turn != 1:
        return "later_turn", "", ""
    user, reply = chatml.clean_text(r.user_text), chatml.clean_text(r.reply)
    if not user or not reply:
        return "empty_field", user, reply
    if len(user) > cfg.max_instruction_chars or len(reply) > cfg.max_response_chars:
        return "too_long", user, reply
    # A user can type "<|assistant|>" into the chat: trained on, it would forge a turn (see chatml.control_tokens).
    if chatml.control_tokens(user) or chatml.control_tokens(reply):
        return "control_token", user, reply
    if complete and r.finish_reason != "stop":  # cut off by the token budget, a timeout or the user
        return "incomplete_reply", user, reply
    return None, user, reply


def _record(r: Rated, user: str, reply: str, cfg: DataConfig) -> dict:
    return {"messages": [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply}],
            "intent": "", "category": "", "flags": "", "source": SOURCE, "row": r.feedback_id, "rating": r.rating,
            "conversation_id": r.conversation_id, "message_id": r.message_id, "model_version": r.model_version}


def review_item(r: Rated) -> dict:
    """What a person reviewing a rejected reply needs, as stored (not cleaned)."""
    return {"feedback_id": r.feedback_id, "conversation_id": r.conversation_id, "message_id": r.message_id,
            "model_version": r.model_version, "user_text": r.user_text, "reply": r.reply, "rated_at": r.rated_at,
            "finish_reason": r.finish_reason, "turn": r.turn}


def shape(rows: list[Rated], raw_keys: set[str], cfg: DataConfig) -> FeedbackResult:
    """Split rated replies into train records, review items and live records, with counts (module doc)."""
    out = FeedbackResult()
    ratings = Counter()
    skipped_train, skipped_live = Counter(), Counter()
    seen: set[tuple[str, str]] = set()
    rejected: list[Rated] = []
    for r in sorted(rows, key=lambda r: r.feedback_id):
        kind = {1: "thumbs_up", -1: "thumbs_down"}.get(r.rating, "other_rating")
        ratings[kind] += 1
        if kind == "thumbs_down":
            out.review.append(review_item(r))
            rejected.append(r)  # placed after every thumbs-up is known: a trained prompt is not held out
        if kind != "thumbs_up":
            continue
        reason, user, reply = _usable(r, cfg, complete=True)
        key = chatml.instruction_key(user)
        if reason is None:
            reason = "in_raw_data" if key in raw_keys else "duplicate" if (key, reply) in seen else None
        if reason:
            skipped_train[reason] += 1
            continue
        seen.add((key, reply))
        out.train.append(_record(r, user, reply, cfg))
    trained, live_keys = {k for k, _ in seen}, set()
    for r in rejected:
        reason, user, reply = _usable(r, cfg, complete=False)  # a cut-off reply can still be a rejected one
        key = chatml.instruction_key(user)
        if reason is None:
            reason = ("in_raw_data" if key in raw_keys else "in_train" if key in trained
                      else "duplicate" if key in live_keys else None)
        if reason:
            skipped_live[reason] += 1
            continue
        live_keys.add(key)
        out.live.append(_record(r, user, reply, cfg))
    out.counts = {"rows_read": len(rows), **{k: ratings[k] for k in ("thumbs_up", "thumbs_down", "other_rating")},
                  "added_to_train": len(out.train), "skipped_train": dict(sorted(skipped_train.items())),
                  "to_review": len(out.review), "to_live": len(out.live),
                  "skipped_live": dict(sorted(skipped_live.items()))}
    return out


def describe(counts: dict) -> str:
    """One log line with every count, e.g. for the prepare step's task log."""
    def why(skipped: dict) -> str:
        n = sum(skipped.values())
        return f", {n} skipped ({', '.join(f'{k}={v}' for k, v in skipped.items())})" if n else ""

    return (f"feedback: {counts['rows_read']} rated replies read ({counts['thumbs_up']} thumbs-up, "
            f"{counts['thumbs_down']} thumbs-down, {counts['other_rating']} other ratings); "
            f"{counts['added_to_train']} added to train{why(counts['skipped_train'])}; "
            f"{counts['to_review']} to review; {counts['to_live']} to the live eval set{why(counts['skipped_live'])}")
