"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``, beside the page's own API.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)  # KEY: one of $ECB_CHAT_API_KEYS
    client.chat.completions.create(model="ecommerce-chatbot", messages=[{"role": "user", "content": "Hi"}])

Same engine, limits and storage as a page chat: the request's turns become a prompt through the same chat template
and context trimming (a ``system`` or ``developer`` message replaces ``data.system_prompt``), the reply is generated
by the same worker (batched with page chats), and each completion is a stored conversation (its last user message,
the reply, the model version, latency and tokens). A completion's ``id`` is ``chatcmpl-<conversation id>``: thumbs
go to ``POST /api/messages/<id>/feedback`` with the same API key.

``model``: ``champion``, ``candidate`` or a version the service has loaded picks that model; anything else the
service lists (the registered model's name, the default) follows the canary rule, and the answer's ``model`` then
echoes the request, so a client cannot tell its canary arm (it could steer the verdict with it). Decoding is greedy
unless ``temperature`` > 0; ``top_p``, ``seed``, ``stop`` and ``max_tokens`` / ``max_completion_tokens`` are honoured.
What the service cannot do (``n`` > 1, tools, logprobs, a JSON response format, audio, penalties, logit bias) is a
400 in OpenAI's error shape, never a silent difference.

Keys: ``$ECB_CHAT_API_KEYS`` (comma-separated; the Airflow connection ``ecb_chat_api``'s password on the Airflow
side), sent as ``Authorization: Bearer``, compared in constant time, separate from the page's client tokens and the
admin token; rate limits are per key. Without a key configured, ``chat.openai_keyless`` says whether the API is off
(403) or open to loopback clients only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from tasks import env
from tasks.chat import store
from tasks.chat.api import (
    COMPLETION_PREFIX,
    ApiError,
    TraceInfo,
    Turn,
    bearer_token,
    json_body,
    limiter,
    tracer,
    utf8_text,
)
from tasks.chat.engine import Job, QueueFull, Sampling
from tasks.chat.openai_errors import OpenAIError
from tasks.chat.prompting import PromptTooLong, build_prompt

bp = Blueprint("v1", __name__, url_prefix="/v1")
ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 256
MAX_STOP = 4
# Fields OpenAI defines that this service cannot honour: asked for, they are a 400 (a default value is fine).
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logprobs": False,
               "top_logprobs": None, "audio": None, "prediction": None, "logit_bias": None, "web_search_options": None,
               "presence_penalty": 0, "frequency_penalty": 0}


@dataclass
class Completion:
    """A validated /v1/chat/completions request."""

    model: str
    history: list[dict]  # user and assistant turns, oldest first, ending with a user message
    system: str | None  # the request's system / developer text, None: data.system_prompt
    max_tokens: int
    sampling: Sampling | None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _cfg():
    return current_app.extensions["ecb_model"].live_cfg


def _state():
    return current_app.extensions["ecb_model"]


def api_keys() -> list[str]:
    return [k.strip() for k in (env.get("ECB_CHAT_API_KEYS") or "").split(",") if k.strip()]


def authorize() -> str:
    """The caller's rate-limit key (a hash of its API key, or its loopback address), or an OpenAIError."""
    chat = _cfg().chat
    if chat.openai_api == "off":
        raise OpenAIError(404, "the OpenAI-compatible API is off on this service (chat.openai_api)",
                          code="not_found")
    keys, given = api_keys(), bearer_token()
    if given:
        if any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            return f"key:{store.token_hash(given)[:16]}"
        raise OpenAIError(401, "invalid API key", code="invalid_api_key",
                          headers={"WWW-Authenticate": 'Bearer realm="ecb-chat-v1"'})
    if keys:
        raise OpenAIError(401, "an API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                          headers={"WWW-Authenticate": 'Bearer realm="ecb-chat-v1"'})
    if chat.openai_keyless == "local" and _loopback(request.remote_addr):
        return f"local:{request.remote_addr}"
    raise OpenAIError(403, "the OpenAI-compatible API is off: no API key is configured on this service "
                           "(ECB_CHAT_API_KEYS)" + ("" if chat.openai_keyless == "off" else
                                                    "; without one it answers loopback clients only"),
                      code="api_disabled")


def _loopback(addr: str | None) -> bool:
    try:
        return ipaddress.ip_address(addr or "").is_loopback
    except ValueError:
        return False


@bp.get("/models")
def models():
    authorize()
    serving = _state().serving
    name = _cfg().release.registered_model
    data = []
    if serving.champion is not None:
        data.append(_model(name, serving.champion, "default", "the champion, or the canary for its share of requests"))
        data.append(_model("champion", serving.champion, "champion"))
    if serving.candidate is not None:
        data.append(_model("candidate", serving.candidate, "candidate"))
    for h in (serving.champion, serving.candidate):
        if h is not None and h.version:
            data.append(_model(str(h.version), h, "version"))
    return jsonify(object="list", data=data)


def _model(model_id: str, h, alias: str, description: str | None = None) -> dict:
    i = h.info
    out = {"id": model_id, "object": "model", "created": int(h.loaded_at), "owned_by": i.get("name") or "ecb",
           "alias": alias, "base_model": i.get("base_model")}
    if alias != "default":  # the default entry names no version: it may answer from either arm
        out["version"] = h.version
    if description:
        out["description"] = description
    return out


def resolve(model: str, conversation_id: str):
    """The handle that answers the request's ``model``: an alias or loaded version pins that model, anything else
    this service lists follows the canary rule."""
    state = _state()
    serving = state.serving
    if serving.champion is None:
        raise OpenAIError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})
    if model == "champion":
        return serving.champion
    if model == "candidate":
        if serving.candidate is None:
            raise OpenAIError(404, "no candidate (canary) model is being served", "model", "model_not_found")
        return serving.candidate
    for h in (serving.champion, serving.candidate):
        if h is not None and h.version and model == str(h.version):
            return h
    if model in ("", "default", _cfg().release.registered_model):
        return state.choose(conversation_id)
    raise OpenAIError(404, f"the model {model[:100]!r} is not served here (see GET /v1/models)", "model",
                      "model_not_found")


@bp.post("/chat/completions")
def chat_completions():
    limit_key = authorize()
    body = json_body()
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    req = parse(body, _cfg())
    # Over the limit: ApiError(429), which api's error handler answers in OpenAI's shape under /v1.
    limiter().check(f"v1:{limit_key}", _cfg().chat.api_rate_limit_per_minute)
    started = time.monotonic()
    cid, token = store.new_ids()
    h = resolve(req.model, cid)
    cfg = _cfg()
    window = cfg.chat.context_tokens or h.context_tokens
    system = cfg.data.system_prompt if req.system is None else req.system
    try:
        prompt_ids, dropped = build_prompt(h.tokenizer, system, req.history, window - req.max_tokens)
    except PromptTooLong as exc:
        raise OpenAIError(400, str(exc), "messages", "context_length_exceeded") from exc
    except Exception as exc:  # noqa: BLE001 -- a chat template that rejects the turns' order (jinja raises)
        raise OpenAIError(400, f"the messages do not fit the model's chat template: {str(exc)[:200]}",
                          "messages") from exc
    job = Job(h, prompt_ids, req.max_tokens, sampling=req.sampling, stop=req.stop)
    prompt_built = time.monotonic()
    try:
        _state().generator.submit(job)
    except QueueFull as exc:
        raise OpenAIError(503, "the service is busy; try again shortly", code="overloaded",
                          headers={"Retry-After": "2"}) from exc
    # The key owns its completions (feedback with the same Bearer key); keyless local calls get a token of their own.
    key = bearer_token()
    store.create_conversation(h.version, (cid, key or token))
    user = store.add_message(cid, "user", req.history[-1]["content"], model_version=h.version)
    turn = Turn(cid, job, user, dropped, cfg.chat.request_timeout_s,
                trace=TraceInfo(tracer(), "v1", req.history[-1]["content"], started, prompt_built))
    headers = {} if key else {"X-Client-Token": token}
    head = {"id": COMPLETION_PREFIX + cid, "created": int(time.time()),
            "model": req.model or cfg.release.registered_model, "system_fingerprint": None}
    if req.stream:
        return Response(stream_with_context(_chunks(turn, head, req.include_usage)), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        for _ in turn.events():
            pass
    except ApiError as exc:
        raise OpenAIError(500, exc.message, code="generation_failed") from exc
    msg = turn.stored
    return jsonify(**head, object="chat.completion",
                   choices=[{"index": 0, "message": {"role": "assistant", "content": msg["content"], "refusal": None},
                             "finish_reason": finish_reason(msg["finish_reason"]), "logprobs": None}],
                   usage=usage(msg)), 200, headers


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: a reply cut by the time-out or the token budget is "length"."""
    return "stop" if reason == "stop" else "length"


def usage(msg: dict) -> dict:
    prompt, completion = msg["prompt_tokens"] or 0, msg["completion_tokens"] or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunks(turn: Turn, head: dict, include_usage: bool):
    """The SSE frames of a streamed completion; ``head``: the id, created, model fields every chunk repeats."""

    def frame(body: dict) -> str:
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def chunk(delta: dict, reason: str | None = None) -> str:
        return frame({**head, "object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        for _, text in turn.events():
            yield chunk({"content": text})
    except ApiError as exc:
        yield frame({"error": {"message": exc.message, "type": "server_error", "param": None,
                               "code": "generation_failed"}})
        yield "data: [DONE]\n\n"
        return
    msg = turn.stored
    yield chunk({}, finish_reason(msg["finish_reason"]))
    if include_usage:
        yield frame({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(msg)})
    yield "data: [DONE]\n\n"


# --- request validation ------------------------------------------------------------------------------------------
def parse(body: dict, cfg) -> Completion:
    """The request as a Completion, or an OpenAIError naming the offending field."""
    for name, default in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != default and value != [] and value != {}:
            raise OpenAIError(400, f"'{name}' is not supported by this service", name, "unsupported_parameter")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise OpenAIError(400, "only n=1 is supported", "n", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise OpenAIError(400, "only response_format {'type': 'text'} is supported", "response_format",
                          "unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise OpenAIError(400, "only the 'text' modality is supported", "modalities", "unsupported_parameter")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise OpenAIError(400, "'model' must be a string", "model")
    system, history = _messages(body.get("messages"), cfg.chat.max_message_chars)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                                                bool)):
        raise OpenAIError(400, "'stream_options' must be an object like {'include_usage': true}", "stream_options")
    return Completion(model=model, history=history, system=system, max_tokens=_max_tokens(body, cfg.chat),
                      sampling=_sampling(body), stop=_stop(body.get("stop")), stream=bool(stream),
                      include_usage=bool(stream and options and options.get("include_usage")))


def _messages(messages, max_chars: int) -> tuple[str | None, list[dict]]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty array", "messages")
    if len(messages) > MAX_MESSAGES:
        raise OpenAIError(400, f"at most {MAX_MESSAGES} messages per request", "messages")
    system, history = [], []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise OpenAIError(400, f"{param} must be an object", param)
        role = m.get("role")
        if role not in ROLES:
            raise OpenAIError(400, f"{param}.role must be one of {', '.join(ROLES)} (tool messages are not "
                                   "supported)", f"{param}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise OpenAIError(400, "tool calls are not supported", f"{param}.tool_calls", "unsupported_parameter")
        text = _content(m.get("content"), f"{param}.content", max_chars)
        if role in ("system", "developer"):
            system.append(text)
        else:
            history.append({"role": role, "content": text})
    if not history or history[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must be the user's (the service answers it)", "messages")
    if not history[-1]["content"].strip():
        raise OpenAIError(400, "the last user message is empty", "messages")
    return ("\n\n".join(system) if system else None), history


def _content(content, param: str, max_chars: int) -> str:
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, f"{param}: only text content parts are supported", param,
                                  "unsupported_parameter")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise OpenAIError(400, f"{param} must be a string or an array of text parts", param)
    if "\x00" in content or not utf8_text(content):
        raise OpenAIError(400, f"{param} must be text (no NUL characters or unpaired surrogates)", param)
    if len(content) > max_chars:
        raise OpenAIError(400, f"{param} has {len(content)} characters; the limit is {max_chars}", param,
                          "string_above_max_length")
    return content


def _max_tokens(body: dict, chat) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise OpenAIError(400, f"'{name}' must be a positive integer", name)
        if value > chat.api_max_tokens:
            raise OpenAIError(400, f"'{name}' is {value}; this service allows at most {chat.api_max_tokens}", name)
        return value
    return chat.max_new_tokens


def _sampling(body: dict) -> Sampling | None:
    temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise OpenAIError(400, "'temperature' must be a number from 0 to 2", "temperature")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise OpenAIError(400, "'top_p' must be a number above 0 and at most 1", "top_p")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        raise OpenAIError(400, "'seed' must be a 64-bit integer", "seed")
    if not temperature:  # absent or 0: greedy, as the page's chat and the evaluate step decode
        return None
    return Sampling(float(temperature), float(1.0 if top_p is None else top_p),
                    None if seed is None else seed % 2**64)


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= 256
                                                                         for s in stops):
        raise OpenAIError(400, f"'stop' must be a string or up to {MAX_STOP} non-empty strings", "stop")
    return tuple(stops)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
