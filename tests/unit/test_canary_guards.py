"""What keeps one client, or too little data, from deciding a canary: the waiting task waits for rated replies on both
arms, the public API does not name a conversation's arm (only the admin API does), and ratings are rate-limited per
address. No services: the store and the canary's database reads are replaced by in-memory fakes."""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flask import Flask

from tasks.config import load_config
from tasks.release import canary

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def one_reply_conversations(n: int, rated: int = 0) -> np.ndarray:
    rows = np.zeros((n, 5), dtype=np.int64)
    rows[:, 0], rows[:rated, 3] = 1, 1
    return rows


@pytest.fixture
def status(monkeypatch):
    """canary_status.run on a canary of version 2 beside champion 1 whose arms the test sets."""
    from tasks.steps import canary_status

    cfg = load_config(overrides={"release.canary_min_messages": 100, "release.canary_min_rated": 20,
                                 "release.canary_timeout_s": 600})
    seen = {}

    def run(cand: canary.Arm, champ: canary.Arm, elapsed_s: float) -> dict:
        row = {"id": 1, "status": "canary", "canary_started_at": START,
               "now": START + dt.timedelta(seconds=elapsed_s)}
        monkeypatch.setattr(canary, "release_row", lambda name, version: row)
        monkeypatch.setattr(canary, "current_champion", lambda name: "1")
        monkeypatch.setattr(canary, "arm_stats", lambda versions, since, cap: seen.update(cap=cap) or
                            {"2": cand, "1": champ})
        return canary_status.run(SimpleNamespace(config=cfg, require_input=lambda key: "2"))

    run.cfg, run.seen = cfg, seen
    return run


def test_the_wait_goes_on_until_both_arms_have_rated_replies(status):
    """150 candidate replies are enough replies, but 5 ratings say nothing about thumbs: not ready, and the manifest
    says what is missing. Once both arms have 20 rated replies it is ready."""
    cand, champ = canary.Arm("2", one_reply_conversations(150, 5)), canary.Arm("1", one_reply_conversations(150, 40))
    out = status(cand, champ, elapsed_s=60)
    assert out["ready"] is False and out["timed_out"] is False
    assert out["missing"] == ["only 5 of the 20 rated candidate replies needed to judge the thumbs-down rate"]
    assert (out["candidate_replies"], out["candidate_rated"], out["champion_rated"]) == (150, 5, 40)
    assert status.seen["cap"] == status.cfg.release.canary_max_replies_per_conversation
    enough = status(canary.Arm("2", one_reply_conversations(150, 20)), champ, elapsed_s=60)
    assert enough["ready"] is True and enough["missing"] == [] and enough["timed_out"] is False


def test_at_the_time_limit_an_unrated_canary_is_judged_and_rolled_back(status):
    cand, champ = canary.Arm("2", one_reply_conversations(150, 5)), canary.Arm("1", one_reply_conversations(150, 40))
    out = status(cand, champ, elapsed_s=601)
    assert out["ready"] is True and out["timed_out"] is True
    verdict = canary.judge(cand, champ, canary.Limits.from_config(status.cfg.release))
    assert verdict.decision == "rollback" and verdict.reasons == out["missing"]


@pytest.fixture
def api_app(monkeypatch):
    """The chat API blueprint over a fake model state (every conversation lands on version 2) and a fake store."""
    from tasks.chat import api, store

    cfg = load_config(overrides={"chat.feedback_limit_per_minute": 3})
    app = Flask(__name__)
    app.register_blueprint(api.bp)
    handle = SimpleNamespace(version="2")
    app.extensions["ecb_model"] = SimpleNamespace(live_cfg=cfg, choose=lambda cid: handle)
    rated = []
    monkeypatch.setattr(store, "create_conversation", lambda version, ids: ids or ("c", "t"))
    monkeypatch.setattr(store, "assistant_message",
                        lambda mid, token: {"id": mid, "model_version": "2"} if token == "t" else None)
    monkeypatch.setattr(store, "rate", lambda mid, rating, version: rated.append((mid, rating, version)))
    app.rated, app.handle = rated, handle
    return app


def streamed_reply(monkeypatch) -> list[tuple[str, dict]]:
    """The events of one streamed reply by version 2 (``api.Turn.sse``), its messages stored through the real
    ``store.message_json``."""
    from tasks.chat import api, store

    def add_message(cid, role, content, **values):
        return store.message_json({"id": 8 if role == "user" else 9, "role": role, "content": content,
                                   "created_at": START, "rating": None, **values})

    monkeypatch.setattr(store, "add_message", add_message)
    now = time.monotonic()
    job = SimpleNamespace(events=queue.Queue(), cancelled=threading.Event(), sent="Hello", tokens=[4],
                          handle=SimpleNamespace(version="2"), submitted=now, first_token_at=now, prompt_ids=[1, 2])
    job.events.put(("token", "Hello"))
    job.events.put(("done", {"finish_reason": "stop"}))
    user = store.add_message("c", "user", "hi", model_version="2")
    text = "".join(api.Turn("c", job, user, 0, timeout_s=5).sse())
    return [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\ndata: ")[1]))
            for block in text.split("\n\n") if block]


def test_a_client_is_not_told_which_arm_its_conversation_is_on(api_app, monkeypatch):
    from tasks.chat import api, store

    client = api_app.test_client()
    body = client.post("/api/conversations", json={}).get_json()
    assert set(body) == {"conversation_id", "client_token"}
    events = streamed_reply(monkeypatch)  # the stream's start and done events carry the user message and the reply
    assert [name for name, _ in events] == ["start", "token", "done"]
    assert events[0][1] == {"user_message": {"id": 8, "role": "user", "content": "hi", "created_at": START.isoformat()}}
    assert events[2][1]["message"]["content"] == "Hello" and events[2][1]["message"]["finish_reason"] == "stop"
    assert "model_version" not in json.dumps(events)
    row = {"id": 9, "role": "assistant", "content": "ok", "created_at": START, "model_version": "2", "latency_ms": 1.0,
           "ttft_ms": 1.0, "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "stop", "rating": -1}
    assert "model_version" not in store.message_json(row)  # the non-stream reply and the history use this too
    assert store.message_json(row, reveal=True) == {**store.message_json(row), "model_version": "2"}  # admin only
    r = client.post("/api/messages/7/feedback", json={"rating": -1}, headers={"X-Client-Token": "t"})
    assert r.status_code == 200 and r.get_json() == {"message_id": 7, "rating": -1}
    assert api_app.rated == [(7, -1, "2")]  # the version is still stored with the rating
    with api_app.test_request_context():  # the admin API's pinned conversation (deploy smoke test) names it
        response, code = api.conversation_on(api_app.handle, ("c2", "t2"))
    assert code == 201 and response.get_json()["model_version"] == "2"


def test_only_the_admin_api_names_a_conversations_version(api_app, monkeypatch):
    """GET /admin/conversations/<id>: the admin token, then the conversation as the store reveals it; 404 for an id
    the store does not know or could never have issued."""
    from tasks.chat import admin, store

    api_app.register_blueprint(admin.bp)
    monkeypatch.setenv("ECB_CHAT_ADMIN_TOKEN", "admin-token")
    asked = []
    monkeypatch.setattr(store, "conversation", lambda cid, reveal=False: asked.append((cid, reveal)) or (
        {"id": cid, "model_version": "2", "messages": []} if cid == "c" else None))
    client, auth = api_app.test_client(), {"Authorization": "Bearer admin-token"}
    assert client.get("/admin/conversations/c").status_code == 401
    assert client.get("/admin/conversations/c", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/admin/conversations/c", headers=auth)
    assert r.status_code == 200 and r.get_json() == {"id": "c", "model_version": "2", "messages": []}
    assert client.get("/admin/conversations/other", headers=auth).status_code == 404
    assert client.get(f"/admin/conversations/{'x' * 65}", headers=auth).status_code == 404
    assert asked == [("c", True), ("other", True)]  # nothing asked before the token; the 65-character id never


def test_ratings_are_rate_limited_per_address(api_app):
    client = api_app.test_client()
    for mid in range(3):
        assert client.post(f"/api/messages/{mid}/feedback", json={"rating": -1},
                           headers={"X-Client-Token": "t"}).status_code == 200
    r = client.post("/api/messages/3/feedback", json={"rating": -1}, headers={"X-Client-Token": "t"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and len(api_app.rated) == 3
    other = client.post("/api/messages/3/feedback", json={"rating": 1}, headers={"X-Client-Token": "t"},
                        environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert other.status_code == 200 and len(api_app.rated) == 4
