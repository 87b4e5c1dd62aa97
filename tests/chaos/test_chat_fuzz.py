"""Schemathesis against the OpenAPI document the chat app serves: every generated request through the real app
(Flask WSGI, tiny model, real Postgres); zero 5xx and every response conforming to the document.

About half the cases are pointed at a real conversation with its client token, so the fuzzer reaches message
generation and feedback, not only the 404 for unknown ids.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings

from tasks.config import load_config

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


@pytest.fixture(scope="module")
def chat_app(services, tiny_base_model):
    from tasks.chat import create_app

    cfg = load_config(overrides={"chat.model_uri": str(tiny_base_model), "chat.max_new_tokens": 4,
                                 "chat.rate_limit_per_minute": 1_000_000, "chat.create_limit_per_minute": 1_000_000})
    app = create_app(cfg, wait_for_model=True)
    client = app.test_client()
    body = client.post("/api/conversations", json={}).get_json()
    reply = client.post(f"/api/conversations/{body['conversation_id']}/messages", json={"content": "hi"},
                        headers={"X-Client-Token": body["client_token"]}).get_json()
    app.config["FUZZ_CONVERSATION"] = (body["conversation_id"], body["client_token"], reply["message"]["id"])
    return app


def test_fuzz_chat_api(chat_app):
    import schemathesis
    from hypothesis import given

    schema = schemathesis.openapi.from_wsgi("/openapi.json", chat_app)
    cid, token, message_id = chat_app.config["FUZZ_CONVERSATION"]
    rng = random.Random(0)
    counts = {"requests": 0, "5xx": 0}
    operations = [result.ok() for result in schema.get_all_operations()]
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            if rng.random() < 0.5:  # aim at the real conversation so generation and feedback are reached
                params = case.path_parameters or {}
                if "conversation_id" in params:
                    params["conversation_id"] = cid
                if "message_id" in params:
                    params["message_id"] = message_id
                if case.headers is not None and "X-Client-Token" in case.headers:
                    case.headers["X-Client-Token"] = token
            response = case.call()
            counts["requests"] += 1
            counts["5xx"] += response.status_code >= 500
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            case.validate_response(response)

        check()
    print(f"schemathesis: {len(operations)} operations, {counts['requests']} requests, {counts['5xx']} 5xx")
    assert counts["requests"] >= 1000 and counts["5xx"] == 0
