"""Release safety on the real services (issue 21): a retried rollback finishes its first try's move, and a canary
whose deploy fails is withdrawn before the step fails.

The registry is a real MLflow server, the rows are in the stack's Postgres and the steps run as Airflow runs them
(``python -m tasks <step>``). The versions are LoRA adapters of the tiny test model (tests/integration/test_canary.py
builds them and the ``release`` fixture registers them).
"""

from __future__ import annotations

import pytest
import requests
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

from tasks.devstack import stack
from tasks.io import db, schema
from tests.conftest import run_step
from tests.integration.test_canary import adapter_dir, aliases, release, release_row  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def rollback_rows(run_id: str) -> list[dict]:
    with db.engine().connect() as conn:
        return [dict(r) for r in conn.execute(select(schema.releases).where(schema.releases.c.run_id == run_id))
                .mappings()]


def test_a_retried_rollback_ends_where_its_first_try_meant(release, uid):  # noqa: F811 - the fixture
    """Each try moves the aliases, then fails to reach the chat service (the step's docker mode points at a closed
    port): every retry of the same run leaves champion 1 / previous 2, as try 1 planned, instead of swapping them
    back (1 -> 2 -> 1) as planning again from the moved aliases did. One rollback row; a last try that reaches the
    service completes it."""
    release(1, deploy=False)
    release(2, deploy=False)
    client, name = release.client, release.name
    client.delete_registered_model_alias(name, "candidate")  # version 2 as the promoted champion, 1 before it
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "previous", "1")
    run_id = f"rb-retry-{uid}"
    unreachable = ["--set", "execution.mode=docker", "--set", f"execution.chat_url=http://127.0.0.1:{stack.free_port()}"]
    args = [*release.common, "--input", "reason=bad answers", "--input", "by=tester"]
    for attempt in range(3):
        r = run_step("rollback_release", run_id, *args, *unreachable, check=False)
        assert r.returncode == 2 and "the aliases say champion 1, but the chat service did not follow" in r.stderr
        assert aliases(client, name) == {"champion": "1", "previous": "2"}, f"after try {attempt + 1}"
        if attempt:
            assert "was planned by an earlier try: champion -> version 1 (from 2); finishing it" in r.stderr
        (event,) = rollback_rows(f"rollback-{run_id}")
        assert (event["registry_version"], event["status"], event["actor"]) == ("1", "deployed", "tester")
        assert event["verdict"]["rollback"]["demoted"] == ["2"]
    demoted = release_row(f"canary-{uid}-v2")
    assert demoted["status"] == "rolled_back" and demoted["detail"].count("rolled back to version 1 by tester") == 1

    stack.CHAT.stop(timeout=20)
    r = run_step("rollback_release", run_id, *args, check=False)  # the chat service is reachable again
    assert r.returncode == 0, r.stderr[-3000:]
    assert aliases(client, name) == {"champion": "1", "previous": "2"} and len(rollback_rows(f"rollback-{run_id}")) == 1
    url = f"http://127.0.0.1:{stack.load_settings()['chat_port']}"
    assert requests.get(f"{url}/api/model", timeout=10).json()["version"] == "1"


@pytest.fixture
def broken_adapter(adapter_dir, tmp_path):  # noqa: F811 - the fixture imported above
    """The test adapter with NaN LoRA weights: it loads and merges, and the merged model's logits are all NaN, so
    greedy decoding picks token 0 (<unk>) every step: replies with tokens but no text."""
    out = tmp_path / "nan-adapter"
    out.mkdir()
    for path in adapter_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v.fill_(float("nan")) for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def test_a_canary_that_fails_its_smoke_test_is_withdrawn(release, broken_adapter, uid):  # noqa: F811
    """Version 2 (NaN weights) is deployed as a canary beside champion 1: its smoke-test reply has no text, so before
    the step fails the candidate alias and the share tag go, the row says why, and the service gives every new
    conversation to the champion."""
    first = release(1)
    url = first["deploy"]["service_url"]
    second = release(2, deploy=False, adapter=broken_adapter)
    assert second["register"]["alias"] == "candidate"
    r = run_step("deploy_chat_service", second["run_id"], *release.common, "--input", "registry_version=2",
                 check=False)
    assert r.returncode == 2 and "canary version 2 withdrawn: candidate alias and share tag removed" in r.stderr
    assert "smoke-test chat failed: HTTP 200, 8 tokens, 0 characters of text" in r.stderr
    client, name = release.client, release.name
    assert aliases(client, name) == {"champion": "1"}
    assert "ecb.canary_share" not in client.get_model_version(name, "2").tags
    row = release_row(second["run_id"])
    assert row["status"] == "deploy_failed" and "withdrawn" in row["detail"]
    info = requests.get(f"{url}/api/model", timeout=10).json()
    assert info["version"] == "1" and info["candidate"] is None
    # An Airflow retry tries the canary again (not version 2 as a champion it never became), and withdraws it again
    r = run_step("deploy_chat_service", second["run_id"], *release.common, "--input", "registry_version=2",
                 check=False)
    assert r.returncode == 2 and "re-starting the canary of version 2 that an earlier try withdrew" in r.stderr
    assert "canary version 2 withdrawn" in r.stderr and aliases(client, name) == {"champion": "1"}
    with db.engine().connect() as conn:
        t0 = conn.execute(select(func.now())).scalar_one()
    for _ in range(12):
        assert requests.post(f"{url}/api/conversations", json={}, timeout=10).status_code == 201
    with db.engine().connect() as conn:  # every new conversation is on the champion
        c = schema.conversations
        by_version = dict(conn.execute(select(c.c.model_version, func.count()).where(c.c.created_at >= t0)
                                       .group_by(c.c.model_version)).all())
    assert by_version == {"1": 12}


def test_update_row_appends_a_detail_once(services, uid):
    """A transaction run again after a lost commit reply (db.transaction retries) or a retried step adds its text
    once; other text is still appended after what earlier steps wrote."""
    from sqlalchemy import insert

    from tasks.release import canary

    with db.engine().begin() as conn:
        row_id = conn.execute(insert(schema.releases).values(
            run_id=f"detail-{uid}", snapshot_id="s", config_hash="h", registry_version="4", status="canary",
            detail="hub push skipped: no token").returning(schema.releases.c.id)).scalar_one()
    for _ in range(3):
        canary.update_row(row_id, "canary verdict: rollback", status="rolled_back")
    canary.update_row(row_id, "rolled back to version 3 by ann: slow")
    with db.engine().connect() as conn:
        detail = conn.execute(select(schema.releases.c.detail).where(schema.releases.c.id == row_id)).scalar_one()
    assert detail == "hub push skipped: no token | canary verdict: rollback | rolled back to version 3 by ann: slow"
