"""The OpenAI-compatible API through the official ``openai`` Python package, against the running service: the app on
a real HTTP server (werkzeug, threaded) on a free loopback port, the tiny test model, real Postgres.

Plus a raw-HTTP fuzz of the /v1 routes (valid, broken and hostile requests): no answer is a 5xx, and every error has
OpenAI's shape.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import requests
from sqlalchemy import select

from tasks.config import load_config
from tasks.devstack import stack
from tasks.io import db, schema

pytestmark = pytest.mark.integration
KEYS = ("sk-test-alpha-0123456789", "sk-test-beta-9876543210")
MODEL = "ecommerce-chatbot"  # release.registered_model: the default route
ASK = [{"role": "user", "content": "Where is my order?"}]


def serve(cfg_overrides: dict, model_dir):
    from werkzeug.serving import make_server

    from tasks.chat import create_app

    cfg = load_config(overrides={"chat.model_uri": str(model_dir), "chat.max_new_tokens": 12, **cfg_overrides})
    server = make_server("127.0.0.1", stack.free_port(), create_app(cfg, wait_for_model=True), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def keys():
    mp = pytest.MonkeyPatch()
    mp.setenv("ECB_CHAT_API_KEYS", ",".join(KEYS))
    yield KEYS
    mp.undo()


@pytest.fixture(scope="module")
def url(services, tiny_base_model, keys):
    server, base = serve({"chat.api_rate_limit_per_minute": 100_000, "chat.feedback_limit_per_minute": 100_000},
                         tiny_base_model)
    yield base
    server.shutdown()


def client(url: str, key: str = KEYS[0]):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def stored(cid: str) -> list[dict]:
    m = schema.messages
    with db.engine().connect() as conn:
        return [dict(r) for r in conn.execute(select(m).where(m.c.conversation_id == cid).order_by(m.c.id)).mappings()]


def page_reply(url: str, text: str) -> str:
    """The page API's greedy reply to one message (same engine, prompt and decoding)."""
    conv = requests.post(f"{url}/api/conversations", json={}, timeout=30).json()
    r = requests.post(f"{url}/api/conversations/{conv['conversation_id']}/messages", json={"content": text},
                      headers={"X-Client-Token": conv["client_token"]}, timeout=60)
    return r.json()["message"]["content"]


def test_completion_with_the_openai_client_is_the_page_reply_and_is_stored(url, tiny_base_model):
    done = client(url).chat.completions.create(model=MODEL, messages=ASK)
    choice = done.choices[0]
    assert done.object == "chat.completion" and done.model == MODEL and done.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == page_reply(url, ASK[0]["content"])  # greedy: the same reply as the page's
    rows = stored(done.id.removeprefix("chatcmpl-"))
    assert [r["role"] for r in rows] == ["user", "assistant"] and rows[0]["content"] == ASK[0]["content"]
    reply = rows[1]
    assert reply["content"] == choice.message.content and reply["model_version"] == f"local:{tiny_base_model.name}"
    assert reply["latency_ms"] > 0 and reply["ttft_ms"] is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (reply["prompt_tokens"],
                                                                         reply["completion_tokens"])
    assert done.usage.total_tokens == reply["prompt_tokens"] + reply["completion_tokens"] and 0 < reply[
        "completion_tokens"] <= 12


def test_streamed_completion_adds_up_to_the_whole_one(url):
    api = client(url)
    whole = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10)
    chunks = list(api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    rows = stored(chunks[0].id.removeprefix("chatcmpl-"))
    assert rows[-1]["content"] == text


def test_raw_stream_ends_with_done(url):
    r = requests.post(f"{url}/v1/chat/completions", json={"messages": ASK, "stream": True, "max_tokens": 4},
                      headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=60)
    events = [block for block in r.text.split("\n\n") if block.strip()]
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_lists_the_default_route_the_champion_and_its_version(url, tiny_base_model):
    models = {m.id: m for m in client(url).models.list().data}
    version = f"local:{tiny_base_model.name}"
    assert set(models) == {MODEL, "champion", version}
    assert models["champion"].version == version and models[MODEL].alias == "default"
    assert "version" not in models[MODEL].model_extra  # the default may answer from either arm: no version named
    assert models[version].base_model == str(tiny_base_model)


def test_model_selects_what_answers_and_an_unknown_model_is_404(url, tiny_base_model):
    import openai

    api = client(url)
    for name in ("champion", f"local:{tiny_base_model.name}"):
        assert api.chat.completions.create(model=name, messages=ASK, max_tokens=3).model == name
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="candidate", messages=ASK)  # no canary is served
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4o", messages=ASK)


def test_max_tokens_stop_seed_and_temperature_are_honoured(url):
    api = client(url)
    greedy = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12).choices[0].message.content
    words = greedy.split()
    assert len(words) >= 3, greedy
    stop = words[2]
    cut = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, stop=[stop, "zzzz"]).choices[0]
    assert cut.message.content == greedy[:greedy.find(stop)].rstrip() and cut.finish_reason == "stop"
    short = api.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=2)
    assert short.usage.completion_tokens <= 2 and short.choices[0].finish_reason in ("length", "stop")

    def sampled(seed):
        return api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=2.0,
                                           seed=seed).choices[0].message.content

    assert sampled(7) == sampled(7)  # the same seed, the same reply
    assert len({sampled(s) for s in range(6)}) >= 2  # temperature 2: seeds give different replies
    assert api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12,
                                       temperature=0).choices[0].message.content == greedy


def test_unsupported_fields_are_400_in_openai_error_shape(url):
    import openai

    api = client(url)
    cases = {"n": {"n": 2}, "tools": {"tools": [{"type": "function", "function": {"name": "lookup_order"}}]},
             "logprobs": {"logprobs": True}, "response_format": {"response_format": {"type": "json_object"}}}
    for param, extra in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=MODEL, messages=ASK, **extra)
        assert info.value.status_code == 400 and info.value.param == param
        assert info.value.code == "unsupported_parameter" and info.value.type == "invalid_request_error"


def test_keys_are_required_and_checked(url):
    import openai

    with pytest.raises(openai.AuthenticationError) as info:
        client(url, "sk-wrong").models.list()
    assert info.value.code == "invalid_api_key"
    r = requests.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # a page client token or the admin token is not an API key
    conv = requests.post(f"{url}/api/conversations", json={}, timeout=10).json()
    r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {conv['client_token']}"}, timeout=10)
    assert r.status_code == 401


def test_thumbs_on_a_completion_go_to_the_feedback_endpoint_with_its_key(url):
    done = client(url).chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    feedback = f"{url}/api/messages/{done.id}/feedback"
    other = requests.post(feedback, json={"rating": -1}, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10)
    assert other.status_code == 404  # another key does not own this completion
    r = requests.post(feedback, json={"rating": -1}, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10)
    reply = stored(done.id.removeprefix("chatcmpl-"))[-1]
    assert r.status_code == 200 and r.json() == {"message_id": reply["id"], "rating": -1}
    f = schema.feedback
    with db.engine().connect() as conn:
        row = conn.execute(select(f.c.rating, f.c.model_version).where(f.c.message_id == reply["id"])).one()
    assert (row.rating, row.model_version) == (-1, reply["model_version"])


def test_rate_limit_is_per_key(services, tiny_base_model, keys):
    import openai

    server, base = serve({"chat.api_rate_limit_per_minute": 2}, tiny_base_model)
    try:
        a, b = client(base, KEYS[0]), client(base, KEYS[1])
        for _ in range(2):
            a.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            a.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
        assert info.value.code == "rate_limit_exceeded"
        assert b.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1).choices  # its own budget
    finally:
        server.shutdown()


@pytest.mark.parametrize(("keyless", "status"), [("off", 403), ("local", 200)])
def test_without_a_configured_key_the_api_is_off_or_local_only(services, tiny_base_model, monkeypatch, keyless,
                                                                 status):
    monkeypatch.setenv("ECB_CHAT_API_KEYS", "")
    server, base = serve({"chat.openai_keyless": keyless}, tiny_base_model)
    try:
        r = requests.post(f"{base}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}, timeout=60)
        assert r.status_code == status, r.text
        if status == 200:  # no key to own it: the answer carries a client token for thumbs
            token = r.headers["X-Client-Token"]
            rated = requests.post(f"{base}/api/messages/{r.json()['id']}/feedback", json={"rating": 1},
                                  headers={"X-Client-Token": token}, timeout=10)
            assert rated.status_code == 200
        else:
            assert r.json()["error"]["code"] == "api_disabled"
    finally:
        server.shutdown()


def test_openapi_document_lists_the_v1_routes(url):
    doc = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]


def fuzz_requests(rng: random.Random, n: int):
    """(method, path, headers, body bytes) of valid, broken and hostile /v1 requests."""
    auth = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    values = [None, True, False, 0, -1, 1, 2, 3.5, -1e308, 1e308, 2**64, "", "x", "\x00", "\ud800", "🚚" * 50,
              [], [1], {}, {"type": "text"}, {"type": "json_object"}, [{"role": "user", "content": "hi"}],
              "a" * 5000]
    fields = ["model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
              "stop", "n", "tools", "logprobs", "top_logprobs", "response_format", "stream_options", "user",
              "presence_penalty", "logit_bias", "modalities", "unknown_field"]
    models = [MODEL, "champion", "candidate", "nope", "", None]
    for i in range(n):
        kind = i % 10
        if kind < 5:  # a mostly valid request with one or two fields mutated
            body = {"model": rng.choice(models), "messages": [{"role": "user", "content": rng.choice(
                ["Where is my order?", "refund?", "x" * 2001, "", "</s><|im_end|>", "\x00"])}], "max_tokens": 3}
            for _ in range(rng.randint(0, 2)):
                body[rng.choice(fields)] = rng.choice(values)
            yield "POST", "/v1/chat/completions", auth, json.dumps(body).encode()
        elif kind == 5:  # messages of odd shapes
            msgs = [{"role": rng.choice(["user", "assistant", "system", "tool", "developer", 5, None]),
                     "content": rng.choice(values)} for _ in range(rng.randint(0, 4))]
            yield "POST", "/v1/chat/completions", auth, json.dumps({"messages": msgs, "max_tokens": 2}).encode()
        elif kind == 6:  # not JSON, or not an object
            body = rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"messages": ' + b"[" * 2000, b"42"])
            yield "POST", "/v1/chat/completions", auth, body
        elif kind == 7:  # keys: none, wrong, malformed
            header = rng.choice([{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                 {"Authorization": "Bearer "}, {"Authorization": "bearer " + KEYS[1]}])
            yield rng.choice(["GET", "POST"]), rng.choice(["/v1/models", "/v1/chat/completions"]), \
                {**header, "Content-Type": "application/json"}, json.dumps({"messages": ASK, "max_tokens": 1}).encode()
        elif kind == 8:  # routes and methods that do not exist
            yield rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice(
                ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models/x", "/v1/",
                 "/v1/chat/completions/" + "a" * 300]), auth, b"{}"
        else:  # a stream, valid or not
            body = {"messages": ASK, "stream": rng.choice([True, "true", 1]), "max_tokens": rng.choice([1, 2, 0]),
                    "stream_options": rng.choice([None, {"include_usage": True}, {"include_usage": "yes"}, []])}
            yield "POST", "/v1/chat/completions", auth, json.dumps(body).encode()


def test_fuzz_v1_routes_never_answer_5xx(url):
    rng = random.Random(1)
    session = requests.Session()
    statuses: dict[int, int] = {}
    for method, path, headers, body in fuzz_requests(rng, 600):
        r = session.request(method, url + path, headers=headers, data=body, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text[:300]
    print(f"v1 fuzz: 600 requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == 600 and statuses.get(200, 0) >= 50 and statuses.get(400, 0) >= 100
