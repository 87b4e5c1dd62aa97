"""A release as a canary, end to end on the real services: MLflow registry aliases, Postgres, the chat service under
gunicorn, simulated users rating replies through the real API, and the step commands as Airflow runs them.

Version 1 is released (no champion yet: straight to champion), version 2 is released with ``release.canary_share``
and served beside it. Simulated users rate by version (deterministic per seed): when version 2 gets many more
thumbs-down the verdict rolls it back, when both are rated alike it is promoted. Chats keep running while the
verdict switches the service: none fails. After a promotion, ``ecb release rollback`` brings version 1 back with one
reload, a restart of the service still serves it, and the rollback DAG rolls forward again.

The versions are real LoRA adapters of the tiny test model (freshly initialised, so both answer alike: what differs is
only how the simulated users rate them).
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from tasks.config import load_config
from tasks.io import db, s3, schema
from tests.conftest import SETTINGS, run_step, step_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]
MIN_REPLIES = 60


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_model, tmp_path_factory):
    """A LoRA adapter of the tiny model, as the fine-tune saves one (adapter + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base_model).save_pretrained(out)
    return out


@pytest.fixture
def release(services, mlflow_server, tiny_base_model, adapter_dir, uid):
    """A registered model of this test; ``release(n)`` registers and deploys version n with the step commands."""
    from mlflow.tracking import MlflowClient

    from tasks.devstack import stack

    stack.CHAT.stop(timeout=20)  # a service of another test runs another config (rate limits): start our own
    client, cfg = MlflowClient(), load_config()
    name = f"ecb-canary-{uid}"
    s3.ensure_bucket(cfg.storage.bucket)
    exp = client.get_experiment_by_name(cfg.pipeline.mlflow_experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.pipeline.mlflow_experiment)
    common = ["--set", f"release.registered_model={name}", "--set", f"model.base_model={tiny_base_model}",
              "--set", "release.canary_share=0.5", "--set", f"release.canary_min_messages={MIN_REPLIES}",
              "--set", "chat.create_limit_per_minute=100000", "--set", "chat.rate_limit_per_minute=100000",
              "--set", "chat.max_new_tokens=8", "--set", "chat.deploy_timeout_s=180",
              # a 2-core box shared with other test runs makes p95 latency noisy; the latency rule is unit-tested
              "--set", "release.canary_max_latency_ratio=4.0"]

    def release_version(n: int, deploy: bool = True, adapter=None) -> dict:
        """Register version n (from ``adapter``, default the fixture's) and, with ``deploy``, deploy it."""
        run_id = f"canary-{uid}-v{n}"
        adapter_uri = f"s3://{cfg.storage.bucket}/tests/canary-{uid}/v{n}/adapter"
        for path in (adapter or adapter_dir).iterdir():
            s3.put_bytes(f"{adapter_uri}/{path.name}", path.read_bytes())
        mlflow_run = client.create_run(exp_id, run_name=f"finetune-{run_id}").info.run_id
        reg = step_manifest("register_model", run_id, *common, "--input", f"adapter_uri={adapter_uri}",
                            "--input", f"mlflow_run_id={mlflow_run}", "--input", f"snapshot_id=snap-{uid}",
                            "--input", "decision_id=1")
        if not deploy:
            return {"run_id": run_id, "register": reg}
        dep = step_manifest("deploy_chat_service", run_id, *common, "--input", f"registry_version={reg['version']}")
        return {"run_id": run_id, "register": reg, "deploy": dep}

    release_version.name, release_version.common, release_version.client = name, common, client
    yield release_version
    stack.CHAT.stop(timeout=20)


def aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def release_row(run_id: str) -> dict:
    with db.engine().connect() as conn:
        return dict(conn.execute(select(schema.releases).where(schema.releases.c.run_id == run_id)).mappings().one())


def served(url: str) -> dict:
    import requests

    return requests.get(f"{url}/api/model", timeout=10).json()


def start_canary(release) -> tuple[str, dict]:
    first = release(1)
    assert first["register"]["alias"] == "champion" and first["deploy"]["canary"] is False  # nothing to compare to
    second = release(2)
    assert second["register"]["alias"] == "candidate"
    assert aliases(release.client, release.name) == {"champion": "1", "candidate": "2"}  # champion did not move
    dep = second["deploy"]
    assert dep["canary"] is True and (dep["version"], dep["champion_version"]) == ("2", "1")
    info = served(dep["service_url"])
    assert info["version"] == "1" and info["alias"] == "champion"
    assert info["candidate"]["version"] == "2" and info["candidate"]["share"] == 0.5
    row = release_row(second["run_id"])
    assert row["status"] == "canary" and row["canary_share"] == 0.5 and row["canary_started_at"] is not None
    assert "canary: version 2 serves 50% of new conversations beside champion 1" in row["detail"]
    status = step_manifest("canary_status", second["run_id"], *release.common, "--input", "registry_version=2")
    assert status["ready"] is False and status["canary"] is True and status["candidate_replies"] == 0
    return dep["service_url"], second


def judge_under_traffic(release, url: str, second: dict, thumbs_down: dict) -> tuple[dict, dict, dict]:
    """200 rated chats, the status step (ready), then the verdict while 60 more chats run; returns the verdict
    manifest and both traffic summaries."""
    from tasks.demo import traffic

    rater = traffic.by_version(thumbs_down)
    before = traffic.drive(url, 200, rater, workers=4, seed=1)
    assert before["failed"] == 0, before["failures"]
    assert set(before["by_version"]) == {"1", "2"}
    status = step_manifest("canary_status", second["run_id"], *release.common, "--input", "registry_version=2")
    assert status["ready"] is True and status["candidate_replies"] >= MIN_REPLIES
    # the canary's clock starts once the deploy's smoke test passed: only the simulated users count
    assert status["candidate_replies"] + status["champion_replies"] == 200
    during: dict = {}
    chats = threading.Thread(target=lambda: during.update(traffic.drive(url, 60, rater, workers=3, seed=2)))
    chats.start()
    verdict = step_manifest("canary_verdict", second["run_id"], *release.common, "--input", "registry_version=2")
    chats.join()
    assert during["failed"] == 0, during["failures"]  # nothing fails while the service switches
    return verdict, before, during


def test_a_worse_canary_is_rolled_back(release):
    url, second = start_canary(release)
    verdict, before, _ = judge_under_traffic(release, url, second, {"2": 0.6, "1": 0.1})
    assert verdict["decision"] == "rollback" and verdict["champion_version"] == "1"
    assert any("thumbs-down" in r for r in verdict["reasons"])
    assert aliases(release.client, release.name) == {"champion": "1"}  # champion unchanged, candidate gone
    row = release_row(second["run_id"])
    assert row["status"] == "rolled_back" and row["decided_at"] is not None
    assert row["verdict"]["decision"] == "rollback" and row["verdict"]["candidate"]["replies"] >= MIN_REPLIES
    assert row["verdict"]["sentence"].startswith("Canary version 2 vs champion 1 on ")
    assert "canary verdict: rollback" in row["detail"]
    info = served(url)
    assert info["version"] == "1" and info["candidate"] is None
    from tasks.demo import traffic

    after = traffic.drive(url, 20, traffic.by_version({}), workers=2, seed=3)
    assert after["failed"] == 0 and set(after["by_version"]) == {"1"}  # every new chat on the champion
    # a retry of the verdict task applies nothing new: same decision, same aliases
    again = step_manifest("canary_verdict", second["run_id"], *release.common, "--input", "registry_version=2")
    assert again["decision"] == "rollback" and aliases(release.client, release.name) == {"champion": "1"}
    status = step_manifest("canary_status", second["run_id"], *release.common, "--input", "registry_version=2")
    assert status == {**status, "ready": True, "canary": False}


def test_a_good_canary_is_promoted_then_rolled_back_by_hand(release, airflow_db, dagbag):
    from tasks.devstack import cli, stack
    from tasks.release import deploy

    url, second = start_canary(release)
    verdict, _, _ = judge_under_traffic(release, url, second, {"2": 0.05, "1": 0.05})
    assert verdict["decision"] == "promote", verdict
    assert aliases(release.client, release.name) == {"champion": "2", "previous": "1"}
    row = release_row(second["run_id"])
    assert row["status"] == "deployed" and row["verdict"]["decision"] == "promote"
    assert served(url)["version"] == "2" and served(url)["candidate"] is None

    # `ecb release rollback`: back to the previous alias, with who and why; the service follows in one reload
    rc = cli.main(["release", "rollback", "--reason", "customers complain", "--by", "tester",
                   "--set", f"release.registered_model={release.name}"])
    assert rc == 0
    assert aliases(release.client, release.name) == {"champion": "1", "previous": "2"}
    info = served(url)
    assert info["version"] == "1" and info["candidate"] is None
    row = release_row(second["run_id"])
    assert (row["status"], row["actor"], row["reason"]) == ("rolled_back", "tester", "customers complain")
    with db.engine().connect() as conn:
        event = conn.execute(select(schema.releases).where(
            schema.releases.c.run_id.like("rollback-%"), schema.releases.c.actor == "tester",
            schema.releases.c.detail.like(f"rollback of {release.name}:%"))).mappings().one()
    assert event["registry_version"] == "1" and event["status"] == "deployed" and "from 2" in event["detail"]
    assert event["registered_model"] == release.name and row["registered_model"] == release.name

    # a restart serves what the aliases say: version 1, no canary
    stack.CHAT.stop(timeout=20)
    cfg = load_config()
    stack.CHAT.start(deploy.gunicorn_argv(cfg.chat.host, SETTINGS["chat_port"], 8),
                     {**stack.process_env(SETTINGS), "ECB_CONFIG": str(deploy.config_file())})
    assert deploy.wait_for_version(url, "1", 300, candidate=None)["version"] == "1"

    # the rollback DAG with its form: roll forward to version 2
    from airflow.utils.state import DagRunState

    run = dagbag.dags["ecommerce_chatbot_rollback"].test(
        run_conf={"version": "2", "reason": "fixed upstream", "release.registered_model": release.name})
    assert run.state == DagRunState.SUCCESS
    assert aliases(release.client, release.name) == {"champion": "2", "previous": "1"}
    assert served(url)["version"] == "2"
    with db.engine().connect() as conn:
        forward = conn.execute(select(schema.releases).where(
            schema.releases.c.reason == "fixed upstream", schema.releases.c.run_id.like("rollback-%"),
            schema.releases.c.detail.like(f"rollback of {release.name}:%"))).mappings().one()
    assert forward["registry_version"] == "2" and forward["actor"]  # the triggering user of the run

    # nothing to roll back to: a clear error, no alias moved
    r = run_step("rollback_release", "rb-bad", *release.common, "--input", "to=99", "--input", "reason=x",
                 check=False)
    assert r.returncode == 2 and "has no version 99" in r.stderr
    assert aliases(release.client, release.name) == {"champion": "2", "previous": "1"}


def test_release_rows_of_two_models_with_the_same_version_number_stay_apart(services, uid):
    """release.registered_model can be set per run, and each registered model counts its versions from 1: the canary
    and rollback steps must find model A's version 1, not model B's newer row with the same number."""
    from sqlalchemy import insert

    from tasks.release import canary

    a, b = f"model-a-{uid}", f"model-b-{uid}"
    rows = [{"run_id": f"{name}-run", "snapshot_id": "s", "config_hash": "h", "registry_version": "1",
             "registered_model": name, "status": status} for name, status in ((a, "canary"), (b, "deployed"))]
    with db.engine().begin() as conn:
        conn.execute(insert(schema.releases), rows)
    assert (canary.release_row(a, "1")["run_id"], canary.release_row(a, "1")["status"]) == (f"{a}-run", "canary")
    assert (canary.release_row(b, "1")["run_id"], canary.release_row(b, "1")["status"]) == (f"{b}-run", "deployed")
    assert canary.release_row(f"model-c-{uid}", "1") is None or canary.release_row(
        f"model-c-{uid}", "1")["registered_model"] is None  # only rows from before migration 0006 match any model


def test_one_conversation_counts_with_its_first_replies_only(services, uid):
    """One client cannot make up a canary alone: of a conversation's 50 replies (all rated thumbs-down, the later
    ones failed) the verdict counts the first ``per_conversation`` and their ratings; each conversation is one row."""
    from sqlalchemy import func, insert

    from tasks.release import canary

    cand, champ = f"cap-2-{uid}", f"cap-1-{uid}"
    with db.engine().connect() as conn:
        since = conn.execute(select(func.now())).scalar()
    convs = [(f"long-{uid}", cand, 50), *((f"short-{uid}-{i}", cand, 2) for i in range(3)), (f"champ-{uid}", champ, 4)]
    with db.engine().begin() as conn:
        conn.execute(insert(schema.conversations), [{"id": c, "client_token_hash": "x", "model_version": v}
                                                    for c, v, _ in convs])
        for cid, version, n in convs:
            ids = conn.execute(insert(schema.messages).returning(schema.messages.c.id), [
                {"conversation_id": cid, "role": "assistant", "content": "ok", "model_version": version,
                 "latency_ms": 100.0 if i < 5 else 9000.0,
                 "finish_reason": "length" if version == champ else "stop" if i < 5 else "error"}
                for i in range(n)]).scalars().all()
            rated = ids if cid.startswith("long") else ids[:1] if cid.startswith("short") else []
            if rated:
                conn.execute(insert(schema.feedback), [{"message_id": m, "rating": -1 if cid.startswith("long") else 1,
                                                        "model_version": version} for m in rated])
    arms = canary.arm_stats([cand, champ], since, 5)
    assert sorted(map(tuple, arms[cand].counts.tolist())) == [(2, 0, 0, 1, 0)] * 3 + [(5, 0, 0, 5, 5)]
    assert arms[cand].summary() == {"version": cand, "conversations": 4, "replies": 11, "errors": 0, "bad": 0,
                                    "rated": 8, "thumbs_down": 5, "latency_p95_ms": 100.0}
    assert arms[champ].counts.tolist() == [[4, 0, 4, 0, 0]]
    assert canary.arm_stats([cand, champ], since, 100)[cand].summary()["replies"] == 56  # without the cap: all
