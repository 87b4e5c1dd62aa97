"""Admin endpoints: hot reload of the served models, conversations pinned to one of them (the deploy step's smoke
test of a canary), and a conversation with the model version of each message (the public API never names it).
Bearer token from $ECB_CHAT_ADMIN_TOKEN (read per request), compared in constant time; without a configured token
every admin call is refused."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, current_app, jsonify, request

from tasks import env
from tasks.chat import store
from tasks.chat.api import ApiError, conversation_on, json_body

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger("tasks.chat.admin")


def require_admin() -> None:
    expected = env.get("ECB_CHAT_ADMIN_TOKEN")
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "admin token required", {"WWW-Authenticate": 'Bearer realm="ecb-chat-admin"'})


def _json_body() -> dict:
    body = json_body() if request.data else {}
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@bp.post("/reload")
def reload():
    """Load what the registry's aliases say (champion, and candidate when it is a canary) in the background; requests
    keep running on the current models. ``model_uri`` serves that one model only, in this process: a development
    override that a restart forgets (the aliases are what a restart serves)."""
    require_admin()
    uri = _json_body().get("model_uri")
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise ApiError(400, "'model_uri' must be a non-empty string")
    state = current_app.extensions["ecb_model"]
    started = state.reload(uri)
    current = state.handle.version if state.handle else None
    log.info("admin reload %s (serving %s)", "started" if started else "already running", current)
    return jsonify(status="loading", started=started, serving_version=current, reload=state.reload_state), 202


@bp.post("/conversations")
def pinned_conversation():
    """A conversation on ``arm`` ("champion" or "candidate"): lets the deploy step smoke-test a canary for sure."""
    require_admin()
    arm = _json_body().get("arm", "champion")
    state = current_app.extensions["ecb_model"]
    if arm not in ("champion", "candidate"):
        raise ApiError(400, "'arm' must be 'champion' or 'candidate'")
    handle = state.candidate if arm == "candidate" else state.handle
    if handle is None:
        raise ApiError(409, f"no {arm} model is being served")
    return conversation_on(handle)


@bp.get("/conversations/<conversation_id>")
def conversation(conversation_id: str):
    """Any conversation with its model version and each message's: for people and simulated users that need to know
    which canary arm served a reply (the public API keeps that from clients, who could steer the verdict with it)."""
    require_admin()
    conv = store.conversation(conversation_id, reveal=True) if store.plausible_id(conversation_id) else None
    if conv is None:
        raise ApiError(404, "conversation not found")
    return jsonify(conv)
