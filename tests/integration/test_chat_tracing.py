"""Chat replies as MLflow traces and thumbs as MLflow feedback assessments, against the test stack's real MLflow
server (Postgres backend, S3 artifacts); and an MLflow outage, which loses traces, never chats."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from tasks.config import load_config

pytestmark = pytest.mark.integration
REPO_OUT = Path(__file__).resolve().parents[2] / "bench" / "out"


def make_app(model_dir, **chat):
    from tasks.chat import create_app

    cfg = load_config(overrides={"chat.model_uri": str(model_dir), "chat.max_new_tokens": 8,
                                 **{f"chat.{k}": v for k, v in chat.items()}})
    return create_app(cfg, wait_for_model=True)


@pytest.fixture(scope="module")
def traced(services, mlflow_server, tiny_base_model):
    experiment = f"chat-test-{uuid.uuid4().hex[:8]}"
    app = make_app(tiny_base_model, trace_experiment=experiment)
    return app, experiment


def chat(client, text: str, conversation=None) -> tuple[str, dict, dict]:
    if conversation is None:
        body = client.post("/api/conversations", json={}).get_json()
        conversation = body["conversation_id"], {"X-Client-Token": body["client_token"]}
    cid, auth = conversation
    r = client.post(f"/api/conversations/{cid}/messages", json={"content": text}, headers=auth)
    assert r.status_code == 200, r.get_json()
    return cid, auth, r.get_json()["message"]


def traces(experiment: str, session: str):
    import mlflow

    exp = mlflow.MlflowClient().get_experiment_by_name(experiment)
    found = mlflow.search_traces(locations=[exp.experiment_id], return_type="list", max_results=100)
    return [t for t in found if t.info.trace_metadata.get("mlflow.trace.session") == session]


def test_each_reply_is_a_trace_of_its_conversation_and_thumbs_are_feedback(traced, tiny_base_model):
    app, experiment = traced
    client, tracer = app.test_client(), app.extensions["ecb_tracer"]
    cid, auth, first = chat(client, "Where is my order?")
    _, _, second = chat(client, "And can I get a refund?", (cid, auth))
    assert client.post(f"/api/messages/{second['id']}/feedback", json={"rating": -1}, headers=auth).status_code == 200
    assert tracer.flush(60), tracer.stats
    assert tracer.stats["exported"] >= 2 and tracer.stats["failed"] == 0, tracer.stats

    found = sorted(traces(experiment, cid), key=lambda t: t.info.request_time)
    assert len(found) == 2  # one trace per reply, grouped by the conversation as the session
    for trace, message in zip(found, (first, second), strict=True):
        assert trace.info.tags["ecb.message_id"] == str(message["id"])
        spans = {s.name: s for s in trace.data.spans}
        assert set(spans) == {"chat", "prompt", "queue", "prefill", "decode"}
        root = spans["chat"]
        assert root.attributes["model_version"] == f"local:{tiny_base_model.name}"
        assert root.attributes["route"] == "page"
        assert (root.attributes["prompt_tokens"], root.attributes["completion_tokens"]) == (
            message["prompt_tokens"], message["completion_tokens"])
        assert root.outputs == {"reply": message["content"]}
        assert root.attributes["ttft_ms"] == pytest.approx(message["ttft_ms"], abs=1.0)
        for child in ("prompt", "queue", "prefill", "decode"):  # nested in the root, in order, inside its time
            span = spans[child]
            assert span.parent_id == root.span_id
            assert root.start_time_ns <= span.start_time_ns <= span.end_time_ns <= root.end_time_ns
        assert spans["prefill"].end_time_ns <= spans["decode"].start_time_ns
    feedback = [a for a in found[1].info.assessments if a.name == "user_thumbs"]
    assert [f.value for f in feedback] == [False] and feedback[0].source.source_type == "HUMAN"
    assert not [a for a in found[0].info.assessments if a.name == "user_thumbs"]  # that reply was not rated


def test_a_v1_completion_is_traced_with_its_route(traced, monkeypatch):
    from openai import OpenAI
    from werkzeug.serving import make_server

    from tasks.devstack import stack

    monkeypatch.setenv("ECB_CHAT_API_KEYS", "sk-trace-test")
    app, experiment = traced
    server = make_server("127.0.0.1", stack.free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="sk-trace-test", max_retries=0)
        done = api.chat.completions.create(model="champion", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4)
    finally:
        server.shutdown()
    assert app.extensions["ecb_tracer"].flush(60)
    [trace] = traces(experiment, done.id.removeprefix("chatcmpl-"))
    root = next(s for s in trace.data.spans if s.name == "chat")
    assert root.attributes["route"] == "v1" and root.inputs == {"message": "Hello"}
    assert root.attributes["completion_tokens"] == done.usage.completion_tokens


def test_an_mlflow_outage_loses_traces_not_chats(services, tiny_base_model, monkeypatch):
    """MLflow unreachable (a closed port): every chat and thumb answers 200 and is stored; the exporter keeps
    retrying its first trace, its queue of 3 fills, and later traces are dropped rather than waited for."""
    from tasks.devstack import stack

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{stack.free_port()}")
    app = make_app(tiny_base_model, trace_queue=3)
    client, tracer = app.test_client(), app.extensions["ecb_tracer"]
    started = time.monotonic()
    chats = [chat(client, f"Where is order {i}?") for i in range(6)]
    for _, auth, reply in chats:
        assert reply["completion_tokens"] > 0
        assert client.post(f"/api/messages/{reply['id']}/feedback", json={"rating": 1},
                           headers=auth).status_code == 200
    elapsed = time.monotonic() - started
    assert tracer.stats["exported"] == 0 and tracer.stats["feedback"] == 0
    assert tracer.stats["dropped"] + tracer.stats["failed"] >= 6, tracer.stats  # of 12 records, 3 fit the queue
    print(f"6 chats and 6 thumbs with MLflow down in {elapsed:.1f}s; tracer {tracer.stats}")


def test_tracing_off_makes_no_tracer(services, tiny_base_model):
    app = make_app(tiny_base_model, tracing="off")
    assert app.extensions["ecb_tracer"] is None
    _, auth, reply = chat(app.test_client(), "Where is my order?")
    assert reply["completion_tokens"] > 0
    assert app.test_client().post(f"/api/messages/{reply['id']}/feedback", json={"rating": 1},
                                  headers=auth).status_code == 200


@pytest.mark.browser
def test_the_mlflow_ui_shows_a_chat_trace_with_its_thumb(traced, mlflow_server):
    """The MLflow UI's traces view of the chat experiment (headless Chromium) lists a rated chat: its message and
    the user_thumbs assessment."""
    import mlflow

    from tests.conftest import chromium

    app, experiment = traced
    client, tracer = app.test_client(), app.extensions["ecb_tracer"]
    question = f"Where is my parcel number {uuid.uuid4().hex[:6]}?"
    _, auth, reply = chat(client, question)
    assert client.post(f"/api/messages/{reply['id']}/feedback", json={"rating": 1}, headers=auth).status_code == 200
    assert tracer.flush(60), tracer.stats
    exp = mlflow.MlflowClient().get_experiment_by_name(experiment)
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/traces")
        page.get_by_text(question, exact=False).first.wait_for(timeout=90_000)
        page.get_by_text("user_thumbs", exact=False).first.wait_for(timeout=30_000)
        REPO_OUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(REPO_OUT / "mlflow-chat-traces.png"), full_page=True)
