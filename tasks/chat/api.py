"""JSON API: conversations, messages (streamed as Server-Sent Events or whole), feedback, model info, health."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from tasks.chat import openai_errors, store
from tasks.chat.engine import Job, QueueFull
from tasks.chat.openapi import spec
from tasks.chat.prompting import PromptTooLong, build_prompt
from tasks.chat.tracing import Reply, Tracer

bp = Blueprint("api", __name__)
log = logging.getLogger("tasks.chat.api")
TOKEN_HEADER = "X-Client-Token"  # noqa: S105 - a header name, not a secret


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@bp.app_errorhandler(ApiError)
def _api_error(exc: ApiError):
    if openai_errors.is_v1():  # a shared helper (the rate limiter, Turn) failed a /v1 request
        code = "rate_limit_exceeded" if exc.status == 429 else None
        return openai_errors.response(exc.status, exc.message, code=code, headers=exc.headers)
    return jsonify(error=exc.message), exc.status, exc.headers


@bp.app_errorhandler(openai_errors.OpenAIError)
def _openai_error(exc: openai_errors.OpenAIError):
    return openai_errors.response(exc.status, exc.message, exc.param, exc.code, exc.headers)


class RateLimiter:
    """Sliding one-minute window per key (a client token hash or an address), in process memory."""

    def __init__(self):
        self.hits: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def check(self, key: str, per_minute: int) -> None:
        now = time.monotonic()
        with self.lock:
            hits = self.hits[key]
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= per_minute:
                raise ApiError(429, f"rate limit: at most {per_minute} requests per minute",
                               {"Retry-After": str(int(60 - (now - hits[0])) + 1)})
            hits.append(now)
            if len(self.hits) > 10000:  # forget idle keys so the table stays small
                for k in [k for k, v in self.hits.items() if not v or now - v[-1] > 60]:
                    del self.hits[k]


def _cfg():
    return current_app.extensions["ecb_model"].live_cfg


def _state():
    return current_app.extensions["ecb_model"]


def limiter() -> RateLimiter:
    return current_app.extensions.setdefault("ecb_rate", RateLimiter())


def json_body():
    """The request's JSON, None when it is not JSON. Nesting too deep for the parser (``[[[[...``) raises
    RecursionError, not ValueError, which get_json(silent=True) would let through as a 500."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def _body() -> dict:
    body = json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _owned(conversation_id: str) -> tuple[str, dict]:
    """(client token, the conversation's stored fields) or 404."""
    token = request.headers.get(TOKEN_HEADER, "")
    conv = store.owned(conversation_id, token)
    if conv is None:
        raise ApiError(404, "conversation not found")
    return token, conv


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    h = _state().handle
    if h is None:
        return jsonify(error="model not loaded yet", reload=_state().reload_state), 503
    return jsonify(status="ready", model_version=h.version)


@bp.get("/openapi.json")
def openapi():
    return jsonify(spec(_cfg().chat.max_message_chars))


@bp.get("/api/model")
def model_info():
    """The champion's fields at the top level; ``candidate`` is the canary beside it (with its share) or null."""
    state = _state()
    serving = state.serving  # one read: the champion and candidate of the same swap
    h = serving.champion
    body = {"ready": h is not None, "version": None, "reload": state.reload_state, "queued": state.generator.queued,
            "pinned": state.pinned, "candidate": None}
    if h is not None:
        body.update(_model_json(h, "champion"))
    if serving.candidate is not None:
        body["candidate"] = {**_model_json(serving.candidate, "candidate"), "share": serving.share}
    return jsonify(body)


def _model_json(h, arm: str) -> dict:
    i = h.info
    return {"version": h.version, "name": i.get("name"), "alias": arm if i.get("name") else i.get("alias"),
            "uri": i.get("uri"), "base_model": i.get("base_model"),
            "base_model_source": i.get("base_model_source"), "base_model_license": i.get("base_model_license"),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.loaded_at)),
            "lineage": {"dag_run_id": i.get("run_id"), "snapshot_id": i.get("snapshot_id"),
                        "gate_decision": i.get("gate_decision")}}


@bp.post("/api/conversations")
def create_conversation():
    limiter().check(f"addr:{request.remote_addr}", _cfg().chat.create_limit_per_minute)
    ids = store.new_ids()
    # The answer does not name the model the conversation landed on: a client that knows its canary arm can steer
    # the verdict (keep only the conversations on one arm, rate only those).
    return conversation_on(_state().choose(ids[0]), ids, reveal=False)


def conversation_on(h, ids: tuple[str, str] | None = None, reveal: bool = True):
    """Create a conversation that stays on model ``h`` (its version is stored with it); ``reveal``: the answer names
    that version (the admin API's pinned conversations, which choose it anyway)."""
    cid, token = store.create_conversation(h.version if h else None, ids)
    body = {"conversation_id": cid, "client_token": token}
    if reveal:
        body["model_version"] = h.version if h else None
    return jsonify(body), 201


@bp.get("/api/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    _owned(conversation_id)
    conv = store.conversation(conversation_id)
    if conv is None:  # deleted since _owned read it
        raise ApiError(404, "conversation not found")
    return jsonify(conv)


def _message_text(body: dict) -> str:
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(400, "'content' must be a string")
    if "\x00" in content or not utf8_text(content):
        raise ApiError(400, "'content' must be text (no NUL characters or unpaired surrogates)")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "'stream' must be true or false")
    if not content.strip():
        raise ApiError(400, "the message is empty")
    limit = _cfg().chat.max_message_chars
    if len(content) > limit:
        raise ApiError(413, f"the message has {len(content)} characters; the limit is {limit}")
    return content


@bp.post("/api/conversations/<conversation_id>/messages")
def send_message(conversation_id: str):
    body = _body()
    token, conv = _owned(conversation_id)
    content = _message_text(body)
    limiter().check(f"client:{store.token_hash(token)}", _cfg().chat.rate_limit_per_minute)
    h = _state().for_version(conv["model_version"])  # sticky: the version it started on, while that one serves
    if h is None:
        raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
    cfg = _cfg().chat
    started = time.monotonic()
    history = [*store.history(conversation_id, limit=cfg.context_tokens or h.context_tokens),
               {"role": "user", "content": content}]
    budget = (cfg.context_tokens or h.context_tokens) - cfg.max_new_tokens
    try:
        prompt_ids, dropped = build_prompt(h.tokenizer, _cfg().data.system_prompt, history, budget)
    except PromptTooLong as exc:
        raise ApiError(413, str(exc)) from exc
    job = Job(h, prompt_ids, cfg.max_new_tokens)
    prompt_built = time.monotonic()
    try:
        _state().generator.submit(job)
    except QueueFull as exc:
        raise ApiError(503, "the service is busy; try again shortly", {"Retry-After": "2"}) from exc
    user = store.add_message(conversation_id, "user", content, model_version=h.version)
    turn = Turn(conversation_id, job, user, dropped, cfg.request_timeout_s,
                trace=TraceInfo(tracer(), "page", content, started, prompt_built))
    wants_stream = body.get("stream") is True or (
        "stream" not in body and request.accept_mimetypes.best == "text/event-stream")
    if wants_stream:
        return Response(stream_with_context(turn.sse()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    for _ in turn.events():
        pass
    return jsonify(user_message=user, message=turn.stored)


@dataclass
class TraceInfo:
    """What a reply's MLflow trace needs beyond the job: the tracer (None: tracing off), the route, the user's text
    and when the request began and its prompt was ready (monotonic seconds)."""

    tracer: Tracer | None
    route: str
    user_text: str
    started: float
    prompt_built: float


def tracer() -> Tracer | None:
    return current_app.extensions.get("ecb_tracer")


class Turn:
    """One assistant reply: reads the job's events, then stores the reply (also when cut off or abandoned) and hands
    it to the tracer."""

    def __init__(self, conversation_id: str, job: Job, user: dict, dropped: int, timeout_s: float,
                 trace: TraceInfo | None = None):
        self.conversation_id, self.job, self.user, self.dropped = conversation_id, job, user, dropped
        self.deadline = time.monotonic() + timeout_s
        self.stored: dict | None = None
        self.trace = trace

    def events(self):
        """Yield ("token", text) pieces; afterwards ``self.stored`` is the stored assistant message."""
        job, reason, error = self.job, "cancelled", None
        try:
            while True:
                try:
                    kind, value = job.events.get(timeout=max(0.01, self.deadline - time.monotonic()))
                except queue.Empty:
                    reason = "timeout"
                    break
                if kind == "token":
                    yield kind, value
                elif kind == "done":
                    reason = value["finish_reason"]
                    break
                else:
                    reason, error = "error", value
                    break
        finally:
            if reason != "stop" and reason != "length":
                job.cancelled.set()
            self._store(reason)
        if error:
            raise ApiError(500, error)

    def _store(self, reason: str) -> None:
        job = self.job
        now = time.monotonic()
        self.stored = store.add_message(
            self.conversation_id, "assistant", job.sent, model_version=job.handle.version,
            latency_ms=round((now - job.submitted) * 1000, 2), prompt_tokens=len(job.prompt_ids),
            ttft_ms=round((job.first_token_at - job.submitted) * 1000, 2) if job.first_token_at else None,
            completion_tokens=len(job.tokens), finish_reason=reason)
        log.info("reply in conversation %s...: %d prompt tokens (%d old turns dropped), %d new tokens, %.0f ms, %s, "
                 "model %s", self.conversation_id[:8], len(job.prompt_ids), self.dropped, len(job.tokens),
                 self.stored["latency_ms"], reason, job.handle.version)
        t = self.trace
        if t is not None and t.tracer is not None:
            t.tracer.record(Reply(
                conversation_id=self.conversation_id, message_id=self.stored["id"], model_version=job.handle.version,
                route=t.route, user_text=t.user_text, reply_text=job.sent, prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.tokens), finish_reason=reason, started=t.started,
                prompt_built=t.prompt_built, submitted=job.submitted, admitted=job.admitted_at,
                first_token=job.first_token_at, ended=now))

    def sse(self):
        # No model version here or in any public message: a client that knows its canary arm can steer the verdict.
        yield _event("start", {"user_message": self.user})
        try:
            for _, text in self.events():
                yield _event("token", {"text": text})
        except ApiError as exc:
            yield _event("error", {"error": exc.message})
            return
        yield _event("done", {"message": self.stored})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@bp.post("/api/messages/<message_ref>/feedback")
def feedback(message_ref: str):
    """Thumbs for an assistant message: its id with the conversation's ``X-Client-Token``, or the ``id`` of an
    OpenAI-compatible completion (``chatcmpl-...``) with the API key that made it (``Authorization: Bearer``)."""
    # Per address, not per token: every conversation has its own token, so one client rating from many
    # conversations would otherwise have no limit on the thumbs a canary is judged on.
    limiter().check(f"feedback:{request.remote_addr}", _cfg().chat.feedback_limit_per_minute)
    body = _body()
    rating = body.get("rating")
    if rating not in (1, -1) or isinstance(rating, bool):
        raise ApiError(400, "'rating' must be 1 (thumbs up) or -1 (thumbs down)")
    token = request.headers.get(TOKEN_HEADER, "") or bearer_token()
    if message_ref.startswith(COMPLETION_PREFIX):
        msg = store.last_reply(message_ref[len(COMPLETION_PREFIX):], token)
    elif message_ref.isdigit() and message_ref.isascii() and int(message_ref) <= 2**63 - 1:
        msg = store.assistant_message(int(message_ref), token)
    else:
        msg = None
    if msg is None:
        raise ApiError(404, "message not found")
    store.rate(msg["id"], rating, msg["model_version"])
    if (t := tracer()) is not None:
        t.thumb(msg["id"], rating)
    return jsonify(message_id=msg["id"], rating=rating)  # no model version: it would name the canary arm


COMPLETION_PREFIX = "chatcmpl-"  # an OpenAI-compatible completion's id: this prefix and its conversation's id


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
