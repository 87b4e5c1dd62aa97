"""Conversations, messages and feedback in Postgres (the `platform` results database).

A conversation id is 192 random bits; the client token returned with it is stored only as a SHA-256 hash, and every
read or write needs both, so an id alone (in a log line, say) opens nothing. A wrong token reads exactly like an
unknown id: 404.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import insert, select

from tasks.io import db, schema

C, M, F = schema.conversations, schema.messages, schema.feedback


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_ids() -> tuple[str, str]:
    """A new conversation id and its client token."""
    return secrets.token_urlsafe(24), secrets.token_urlsafe(32)


def create_conversation(model_version: str | None, ids: tuple[str, str] | None = None) -> tuple[str, str]:
    """Store a conversation on ``model_version`` (its version for good: the canary is sticky per conversation)."""
    cid, token = ids or new_ids()
    with db.engine().begin() as conn:
        conn.execute(insert(C).values(id=cid, client_token_hash=token_hash(token), model_version=model_version))
    return cid, token


def owns(conversation_id: str, token: str | None) -> bool:
    """True when the conversation exists and the token is the one issued with it (constant-time compare)."""
    return owned(conversation_id, token) is not None


def plausible_id(conversation_id: str) -> bool:
    """Could be an id we issued: short printable ASCII (a NUL or a megabyte of text never reaches the database)."""
    return bool(conversation_id) and len(conversation_id) <= 64 and conversation_id.isascii() \
        and conversation_id.isprintable()


def owned(conversation_id: str, token: str | None) -> dict | None:
    """{"model_version": ...} of the conversation when the token is the one issued with it, else None."""
    if not token or not plausible_id(conversation_id):
        return None
    with db.engine().connect() as conn:
        row = conn.execute(select(C.c.client_token_hash, C.c.model_version).where(C.c.id == conversation_id)).first()
    if row is None or not hmac.compare_digest(row.client_token_hash, token_hash(token)):
        return None
    return {"model_version": row.model_version}


def conversation(conversation_id: str, reveal: bool = False) -> dict | None:
    """The conversation and its messages, None when there is none; ``reveal``: with the model version of each (the
    admin API only: a client that knows its canary arm can steer the verdict)."""
    with db.engine().connect() as conn:
        conv = conn.execute(select(C).where(C.c.id == conversation_id)).mappings().first()
        if conv is None:
            return None
        rows = conn.execute(select(M, F.c.rating).select_from(M.outerjoin(F, F.c.message_id == M.c.id))
                            .where(M.c.conversation_id == conversation_id).order_by(M.c.id)).mappings().all()
    out = {"id": conv["id"], "created_at": conv["created_at"].isoformat(),
           "messages": [message_json(r, reveal) for r in rows]}
    if reveal:
        out["model_version"] = conv["model_version"]
    return out


def message_json(r, reveal: bool = False) -> dict:
    """A message as the API shows it; the model version only with ``reveal`` (see ``conversation``)."""
    out = {"id": r["id"], "role": r["role"], "content": r["content"], "created_at": r["created_at"].isoformat()}
    if reveal:
        out["model_version"] = r["model_version"]
    if r["role"] == "assistant":
        out.update(latency_ms=r["latency_ms"], ttft_ms=r["ttft_ms"], prompt_tokens=r["prompt_tokens"],
                   completion_tokens=r["completion_tokens"], finish_reason=r["finish_reason"],
                   rating=r.get("rating"))
    return out


def history(conversation_id: str, limit: int | None = None) -> list[dict]:
    """The turns so far, oldest first, as chat-template messages; with ``limit``, only the latest ``limit`` messages,
    from a user message on (a prompt starts with one: ``prompting.cut_points``), so a long conversation costs each
    new message a bounded read. Every message takes at least one prompt token, so a limit above the prompt's token
    budget leaves out nothing the prompt could hold."""
    query = select(M.c.role, M.c.content).where(M.c.conversation_id == conversation_id)
    with db.engine().connect() as conn:
        if limit is None:
            rows = conn.execute(query.order_by(M.c.id)).all()
        else:
            rows = conn.execute(query.order_by(M.c.id.desc()).limit(limit)).all()[::-1]
    if limit is not None and len(rows) == limit:  # cut short: drop the reply of an exchange that began before
        first_user = next((i for i, row in enumerate(rows) if row.role == "user"), len(rows))
        rows = rows[first_user:]
    return [{"role": role, "content": content} for role, content in rows]


def add_message(conversation_id: str, role: str, content: str, **values) -> dict:
    with db.engine().begin() as conn:
        row = conn.execute(insert(M).values(conversation_id=conversation_id, role=role, content=content, **values)
                           .returning(M)).mappings().one()
    return message_json({**row, "rating": None})


def assistant_message(message_id: int, token: str | None) -> dict | None:
    """The assistant message with this id when the token owns its conversation, else None."""
    with db.engine().connect() as conn:
        row = conn.execute(select(M.c.id, M.c.model_version, M.c.role, C.c.client_token_hash)
                           .select_from(M.join(C, C.c.id == M.c.conversation_id))
                           .where(M.c.id == message_id)).mappings().first()
    if not row or row["role"] != "assistant" or not token:
        return None
    return dict(row) if hmac.compare_digest(row["client_token_hash"], token_hash(token)) else None


def last_reply(conversation_id: str, token: str | None) -> dict | None:
    """The latest assistant message of the conversation (an OpenAI-compatible completion has one) when the token
    owns the conversation, else None."""
    if owned(conversation_id, token) is None:
        return None
    with db.engine().connect() as conn:
        row = conn.execute(select(M.c.id, M.c.model_version).where(M.c.conversation_id == conversation_id,
                                                                   M.c.role == "assistant")
                           .order_by(M.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def rate(message_id: int, rating: int, model_version: str | None) -> None:
    with db.engine().begin() as conn:
        db.upsert(conn, F, {"message_id": message_id, "rating": rating, "model_version": model_version},
                  keys=("message_id",))
