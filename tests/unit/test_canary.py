"""The canary verdict's statistics and the service's sticky assignment, without services."""

from __future__ import annotations

import secrets
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.chat.serving import canary_arm
from tasks.release.canary import Arm, Limits, judge, unseen
from tasks.release.canary_stats import compare, design_effects, difference, holm

LIMITS = Limits(min_messages=200, min_rated=50)


def test_difference_interval_is_newcombes_hybrid_score():
    # Newcombe (1998), Statistics in Medicine 17, table II, method 10, examples (a) to (d)
    for (k1, n1, k2, n2), (low, high) in {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                                          (6, 7, 2, 7): (0.0582, 0.8062), (5, 56, 0, 29): (-0.0381, 0.1926)}.items():
        d = difference(k1, n1, k2, n2, 0.0, 0.95)
        assert abs(d["diff"] - (k1 / n1 - k2 / n2)) < 1e-12
        assert abs(d["low"] - low) < 1e-4 and abs(d["high"] - high) < 1e-4


def test_the_p_value_is_one_sided_against_the_margin():
    """80% vs 60% (Newcombe's example (a), lower bound +5.24 points): worse beyond a 5-point margin at the 2.5% level
    of that bound, not beyond 10 points, and a difference equal to the margin is a coin flip."""
    p = {m: difference(56, 70, 48, 80, m, 0.95)["p_value"] for m in (0.0, 0.05, 0.10, 0.20)}
    assert p[0.0] < 0.005 and p[0.05] < 0.025 < p[0.10] and abs(p[0.20] - 0.5) < 1e-9
    assert difference(48, 80, 56, 70, 0.0, 0.95)["p_value"] > 0.99  # better, not worse


def test_the_conversation_is_the_unit():
    """35% vs 20% thumbs-down of 200 rated replies each. As 200 independent replies that is a regression; as 40
    conversations of 5 replies each rated alike (one user's mood, five times) it is 14 vs 8 users: noise."""
    alone = compare(np.r_[np.ones(70), np.zeros(130)], np.ones(200), np.r_[np.ones(40), np.zeros(160)], np.ones(200),
                    0.0, 0.95)
    fives = np.full(40, 5)
    clustered = compare(np.r_[np.full(14, 5), np.zeros(26)], fives, np.r_[np.full(8, 5), np.zeros(32)], fives, 0.0,
                        0.95)
    assert alone["diff"] == clustered["diff"] == pytest.approx(0.15)
    assert alone["p_value"] < 0.001 and clustered["p_value"] > 0.05
    assert clustered["design_effect"] == [pytest.approx(5 * 40 / 39, abs=1e-3)] * 2  # 1 + (5 - 1) x correlation 1
    assert max(alone["design_effect"]) < 1.01 and clustered["low"] < 0 < alone["low"]


def test_design_effect_is_1_without_clustering_or_events():
    ones = np.ones(300)
    rng = np.random.default_rng(0)
    assert max(design_effects(rng.binomial(1, 0.2, 300), ones, rng.binomial(1, 0.2, 300), ones)) < 1.01
    assert design_effects(np.zeros(30), np.full(30, 4), np.zeros(30), np.full(30, 4)) == (1.0, 1.0)
    assert design_effects([1], [3], [0, 1], [2, 2]) == (1.0, 1.0)  # one candidate conversation: nothing to estimate


def test_holm_steps_down_over_the_three_checks():
    """Each test at 2.5% (the lower bound of a 95% interval): three p-values of 2% are three chances at noise, not a
    regression; Holm rejects the smallest against 2.5%/3, then the next against 2.5%/2."""
    assert holm([0.02, 0.02, 0.02], 0.95)[0] == [False, False, False]
    assert holm([0.005, 0.02, 0.5], 0.95) == ([True, False, False], [0.015, 0.04, 0.5])
    assert holm([0.005, 0.011, 0.5], 0.95)[0] == [True, True, False]  # Bonferroni (2.5%/3 each) would stop at one


def conversations(n: int, errors: int = 0, bad: int = 0, rated: int = 0, down: int = 0) -> np.ndarray:
    """``n`` conversations of one reply each, the first ``errors`` of them failed, and so on."""
    rows = np.zeros((n, 5), dtype=np.int64)
    rows[:, 0] = 1
    for col, k in ((1, errors), (2, bad), (3, rated)):
        rows[:k, col] = 1
    rows[:down, 4] = 1
    return rows


def arms(cand_down=10, champ_down=10, rated=100, replies=200, cand_errors=0, champ_errors=0, cand_p95=500.0,
         champ_p95=500.0, cand_bad=0, champ_bad=0):
    return (Arm("2", conversations(replies, cand_errors, cand_bad, rated, cand_down), cand_p95),
            Arm("1", conversations(replies * 4, champ_errors, champ_bad, rated * 4, champ_down * 4), champ_p95))


def test_arm_totals_and_summary():
    arm = Arm("2", [[5, 1, 0, 2, 1], [3, 0, 1, 0, 0]], 120.0)
    assert (arm.conversations, arm.replies, arm.rated, arm.total("thumbs_down")) == (2, 8, 2, 1)
    assert arm.summary() == {"version": "2", "conversations": 2, "replies": 8, "errors": 1, "bad": 1, "rated": 2,
                             "thumbs_down": 1, "latency_p95_ms": 120.0}
    assert Arm("1").summary()["replies"] == 0


def test_equal_signals_promote_and_the_sentence_has_every_number():
    cand, champ = arms()
    v = judge(cand, champ, LIMITS)
    assert v.decision == "promote" and v.reasons == []
    assert not any(c["failed"] for c in v.checks.values())
    s = v.sentence
    assert s.startswith("Canary version 2 vs champion 1 on 200 vs 800 replies in 200 vs 800 conversations: ")
    assert "thumbs-down 10.0% vs 10.0% of 100 vs 400 rated" in s and "errors 0.0% vs 0.0%" in s
    assert "p95 latency 500 vs 500 ms (limit x1.5)" in s and s.endswith("promoted: no signal is worse beyond its "
                                                                         "margin.")
    assert "\n" not in s and s.count(". ") == 0  # one sentence


def test_more_thumbs_down_rolls_back_with_the_interval_in_the_sentence():
    cand, champ = arms(cand_down=40, champ_down=10)  # 40% vs 10% of rated replies
    v = judge(cand, champ, LIMITS)
    td = v.checks["thumbs_down"]
    assert v.decision == "rollback" and td["failed"] and td["low"] > 0.2 and abs(td["diff"] - 0.3) < 1e-12
    assert td["p_holm"] < 0.001 and v.checks["errors"]["p_holm"] == 1.0
    assert v.reasons == ["the thumbs-down rate is higher beyond the margin with 95% confidence (Holm-corrected)"]
    assert "(difference +30.0 points, 95% CI +" in v.sentence and "rolled back: the thumbs-down rate" in v.sentence


def test_noise_does_not_roll_back_but_a_margin_can_tolerate_a_real_difference():
    cand, champ = arms(cand_down=14, champ_down=10)  # 14% vs 10% of 100 rated: within noise
    assert judge(cand, champ, LIMITS).decision == "promote"
    cand, champ = arms(cand_down=30, champ_down=10)
    assert judge(cand, champ, LIMITS).decision == "rollback"
    # a 10-point margin: the lower bound (about +10.8) must clear it; a 15-point one accepts the candidate
    assert judge(cand, champ, Limits(min_messages=200, min_rated=50, max_thumbs_down_increase=0.15)).decision == \
        "promote"


def test_errors_bad_replies_and_latency_each_roll_back():
    cand, champ = arms(cand_errors=12)
    v = judge(cand, champ, LIMITS)
    assert v.decision == "rollback" and v.checks["errors"]["failed"] and not v.checks["thumbs_down"]["failed"]
    cand, champ = arms(cand_bad=30, champ_bad=20)  # 15% vs 2.5%
    assert judge(cand, champ, LIMITS).checks["bad_replies"]["failed"]
    cand, champ = arms(cand_p95=900.0, champ_p95=500.0)
    v = judge(cand, champ, LIMITS)
    assert v.decision == "rollback" and v.reasons == ["p95 latency above 1.5 x the champion's"]
    assert judge(cand, champ, Limits(min_messages=200, min_rated=50, max_latency_ratio=2.0)).decision == "promote"


def test_three_borderline_rates_are_noise_not_a_regression():
    """Errors, thumbs-down and bad replies each about 2.1 standard errors worse (one-sided p about 2%): each 95%
    interval alone excludes 0, which rolled back 6% of identical candidates with three checks. Holm: promote."""
    cand, champ = arms(rated=200, replies=400, cand_down=30, champ_down=20, cand_errors=18, champ_errors=40,
                       cand_bad=31, champ_bad=80)  # 15% vs 10%, 4.5% vs 2.5%, 7.8% vs 5.0%
    v = judge(cand, champ, LIMITS)
    assert all(0.01 < v.checks[c]["p_value"] < 0.025 and v.checks[c]["low"] > 0 for c in
               ("errors", "thumbs_down", "bad_replies"))
    assert v.decision == "promote" and not any(c["failed"] for c in v.checks.values())


def test_too_few_candidate_replies_rolls_back_and_few_replies_skip_latency():
    cand, champ = arms(replies=50, rated=20)
    v = judge(cand, champ, Limits(min_messages=200, min_rated=20))
    assert v.decision == "rollback" and v.reasons == ["only 50 of the 200 candidate replies needed"]
    small = Arm("2", conversations(10, rated=10), latency_p95_ms=5000.0)
    v = judge(small, Arm("1", conversations(10, rated=10), latency_p95_ms=100.0), Limits(min_messages=10,
                                                                                           min_rated=10))
    assert v.checks["latency_p95"] == {"candidate": 5000.0, "champion": 100.0, "limit": 1.5, "failed": False,
                                       "checked": False}
    assert "too few replies to compare" in v.sentence and v.decision == "promote"


def test_an_unrated_candidate_is_never_promoted():
    """Thumbs can promote only with enough rated replies on both arms: a candidate nobody rated, or judged against
    a champion nobody rated, waits (``unseen``) and at the time limit is rolled back."""
    v = judge(Arm("2", conversations(300), 1.0), Arm("1", conversations(300, rated=300), 1.0), LIMITS)
    assert v.checks["thumbs_down"]["diff"] is None and not v.checks["thumbs_down"]["failed"] and "n/a" in v.sentence
    assert v.decision == "rollback"
    assert v.reasons == ["only 0 of the 50 rated candidate replies needed to judge the thumbs-down rate"]
    cand, champ = Arm("2", conversations(300, rated=49)), Arm("1", conversations(300, rated=12))
    assert unseen(cand, champ, LIMITS) == [
        "only 49 of the 50 rated candidate replies needed to judge the thumbs-down rate",
        "only 12 of the 50 rated champion replies needed to judge the thumbs-down rate"]
    assert judge(cand, champ, LIMITS).decision == "rollback"
    assert unseen(*arms(), LIMITS) == []


def test_no_champion_traffic_is_not_a_baseline():
    """A canary share of 1 gave the champion no replies and judged the candidate against a rate of 0."""
    v = judge(Arm("2", conversations(300, rated=100), latency_p95_ms=1.0), Arm("1"), LIMITS)
    assert v.decision == "rollback" and "rated champion replies" in v.reasons[0]
    assert v.checks["errors"]["diff"] is None


@pytest.mark.parametrize("share", [1.0, 0.95])
def test_a_canary_share_that_leaves_the_champion_no_baseline_is_refused(share):
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="release.canary_share.*above the maximum 0.9"):
        load_config(overrides={"release.canary_share": share})
    assert load_config(overrides={"release.canary_share": 0.9}).release.canary_share == 0.9


def test_verdict_round_trips_as_json():
    import json

    v = judge(*arms(cand_down=40), LIMITS).to_dict()
    assert json.loads(json.dumps(v)) == v and v["candidate"]["version"] == "2" and v["champion"]["replies"] == 800
    assert v["candidate"]["conversations"] == 200 and "counts" not in v["candidate"]


def test_canary_arm_is_sticky_and_takes_its_share():
    ids = [secrets.token_urlsafe(24) for _ in range(20000)]
    assert not any(canary_arm(i, 0.0) for i in ids) and all(canary_arm(i, 1.0) for i in ids)
    share = sum(canary_arm(i, 0.2) for i in ids) / len(ids)
    assert abs(share - 0.2) < 0.015
    assert [canary_arm(i, 0.2) for i in ids[:100]] == [canary_arm(i, 0.2) for i in ids[:100]]


def test_limits_come_from_the_release_config():
    from tasks.config import ReleaseConfig, load_config

    cfg = load_config(overrides={"release.canary_min_messages": 50, "release.canary_confidence": 0.9,
                                 "release.canary_max_latency_ratio": 2.0, "release.canary_min_rated": 7})
    assert Limits.from_config(cfg.release) == Limits(50, 0.9, 0.0, 0.0, 0.0, 2.0, 7)
    assert Limits.from_config(ReleaseConfig()) == Limits()  # the dataclass defaults are the config's


def test_the_default_limits_need_a_sample_that_catches_a_doubled_thumbs_down_rate():
    from tasks.config import ReleaseConfig

    release = ReleaseConfig()  # tests/unit/test_canary_simulation.py measures what these defaults catch
    assert (release.canary_min_messages, release.canary_min_rated) == (2000, 200)
    assert release.canary_max_replies_per_conversation == 5


class FakeBatch:
    def __init__(self, handle, jobs):
        self.handle, self.jobs = handle, list(jobs)

    def add(self, jobs):  # one prefill pass of the jobs admitted together
        self.jobs += jobs


def test_worker_admits_in_arrival_order_across_two_models():
    """With a canary the worker batches one model at a time: once a request for the other model waits, later
    requests of the running batch's model wait behind it, so the batch drains and neither model starves."""
    from tasks.chat.engine import Generator, Job

    a, b = SimpleNamespace(decoder=None, version="1"), SimpleNamespace(decoder=None, version="2")
    worker = Generator.__new__(Generator)  # no worker thread: _admit alone
    worker.max_batch_size = 8
    a0, a1, b1, a2, b2 = (Job(h, [1, 2], 4) for h in (a, a, b, a, b))
    worker.pending = deque([a1, b1, a2, b2])
    batch = worker._admit(FakeBatch(a, [a0]))
    assert batch.jobs == [a0, a1] and list(worker.pending) == [b1, a2, b2]  # a2 waits behind b1
    batch.jobs.clear()  # the model-a batch drained: the next batch starts with the oldest waiting request
    worker.pending = deque([b2, a2])
    batch = worker._admit(FakeBatch(b, [b1]))
    assert batch.jobs == [b1, b2] and list(worker.pending) == [a2]


@pytest.fixture
def registry(monkeypatch):
    """The alias functions of tasks.release.registry on an in-memory registered model with versions 1..3."""
    from tasks.release import canary
    from tasks.release import registry as reg

    state = {"aliases": {}, "recorded": []}
    monkeypatch.setattr(reg, "aliases", lambda name: dict(state["aliases"]))
    monkeypatch.setattr(reg, "set_alias", lambda name, alias, v: state["aliases"].__setitem__(alias, str(v)))
    monkeypatch.setattr(reg, "delete_alias", lambda name, alias: state["aliases"].pop(alias, None) is not None)
    monkeypatch.setattr(reg, "version_tags", lambda name, v: {} if str(v) in ("1", "2", "3") else None)
    monkeypatch.setattr(canary, "_record_rollback", lambda name, plan, by, reason, event: state["recorded"].append(
        (name, plan["champion"], plan["demoted"], by, reason)))
    plans = {}  # the rollback rows' stored plans, by event id
    monkeypatch.setattr(canary, "_stored_plan", plans.get)
    monkeypatch.setattr(canary, "_store_plan", lambda event, plan, by, reason: plans.setdefault(event, plan))
    state["plans"] = plans
    return state


def test_promotion_moves_previous_then_champion_and_ends_the_canary(registry):
    from tasks.release import canary

    registry["aliases"].update(champion="1", candidate="2")
    assert canary.promote("m", "2") == "1"
    assert registry["aliases"] == {"champion": "2", "previous": "1"}
    assert canary.promote("m", "2") == "1" and registry["aliases"] == {"champion": "2", "previous": "1"}  # a rerun


def test_a_canary_rollback_removes_only_its_own_candidate_alias(registry):
    from tasks.release import canary

    registry["aliases"].update(champion="1", candidate="3")
    assert canary.end_canary("m", "2") is False and registry["aliases"] == {"champion": "1", "candidate": "3"}
    assert canary.end_canary("m", "3") is True and registry["aliases"] == {"champion": "1"}


def test_manual_rollback_targets_and_refusals(registry):
    from tasks.release import canary

    registry["aliases"].update(champion="2", previous="1")
    out = canary.manual_rollback("m", None, "ann", "bad answers", "r1")
    assert registry["aliases"] == {"champion": "1", "previous": "2"} and out["demoted"] == ["2"]
    assert registry["recorded"] == [("m", "1", ["2"], "ann", "bad answers")]
    with pytest.raises(canary.RollbackError, match="no version 9"):
        canary.manual_rollback("m", "9", "ann", "x", "r2")
    with pytest.raises(canary.RollbackError, match="already is the champion"):
        canary.manual_rollback("m", "1", "ann", "x", "r3")
    # during a canary, a rollback without a version ends the canary and keeps the champion
    registry["aliases"].update(candidate="3")
    out = canary.manual_rollback("m", None, "bob", "stop the canary", "r4")
    assert registry["aliases"] == {"champion": "1", "previous": "2"} and out["demoted"] == ["3"]
    registry["aliases"].clear()
    with pytest.raises(canary.RollbackError, match="no 'previous' alias"):
        canary.manual_rollback("m", None, "ann", "x", "r5")


@pytest.mark.parametrize(("aliases", "to", "want"), [
    ({"champion": "3", "previous": "2"}, None, {"champion": "2", "previous": "3"}),
    ({"champion": "2", "previous": "1", "candidate": "3"}, None, {"champion": "2", "previous": "1"}),
    ({"champion": "3", "previous": "2"}, "1", {"champion": "1", "previous": "3"}),
], ids=["to-previous", "end-canary", "to-version"])
def test_a_retried_rollback_finishes_the_first_tries_move(registry, aliases, to, want):
    """Try 1 moved the aliases, then failed (reload timed out, worker killed): tries 2 and 3 of the same run end where
    try 1 meant to, instead of swapping champion and previous back (3 -> 2 -> 3) or demoting a healthy champion."""
    from tasks.release import canary

    registry["aliases"].update(aliases)
    first = canary.manual_rollback("m", to, "ann", "bad answers", "run-1")
    assert registry["aliases"] == want
    for _ in range(2):
        again = canary.manual_rollback("m", to, "ann", "bad answers", "run-1")
        assert registry["aliases"] == want and again == first
    assert len(registry["plans"]) == 1


def test_a_verdict_never_promotes_a_canary_ended_by_hand(registry):
    from tasks.release import canary

    registry["aliases"].update(champion="1", previous="0")  # the candidate alias (2) was removed by a rollback
    with pytest.raises(canary.CanaryEnded, match="no longer the candidate"):
        canary.promote("m", "2")
    assert registry["aliases"] == {"champion": "1", "previous": "0"}


def test_simulated_users_rate_by_version_deterministically():
    import random

    from tasks.demo import traffic

    rate = traffic.by_version({"2": 0.9}, default=0.0, rated=1.0)
    down = sum(rate(random.Random(f"0:{i}"), {"model_version": "2"}, "") == -1 for i in range(500))
    assert 420 <= down <= 480 and all(rate(random.Random(i), {"model_version": "1"}, "") == 1 for i in range(50))
    assert [rate(random.Random(f"0:{i}"), {"model_version": "2"}, "") for i in range(20)] == \
        [rate(random.Random(f"0:{i}"), {"model_version": "2"}, "") for i in range(20)]
    ref = traffic.by_reference(min_overlap=0.5, rated=1.0)
    good = {"content": "I can help you track your order number", "finish_reason": "stop"}
    assert ref(random.Random(0), good, "help track your order") == 1
    assert ref(random.Random(0), {**good, "content": ""}, "help track your order") == -1
    assert ref(random.Random(0), {**good, "finish_reason": "error"}, "help track your order") == -1
    assert ref(random.Random(0), {**good, "content": "something unrelated entirely"}, "help track your order") == -1


def fake_chat_service(monkeypatch) -> list[tuple[str, str]]:
    """``traffic.Client.call`` against an in-memory chat service: conversation n lands on version 1 + n % 2, which
    only ``GET /admin/conversations/<id>`` with the bearer token "adm" tells (the public answers do not, as the real
    service's). Returns the (method, path) of every call."""
    import urllib.error

    from tasks.demo import traffic

    calls: list[tuple[str, str]] = []

    def call(self, path, body, token=None, method="POST", headers=None):
        calls.append((method, path))
        n = len([c for c in calls if c == ("POST", "/api/conversations")]) - 1
        if path == "/api/conversations":
            return {"conversation_id": f"c{n}", "client_token": "t"}
        if path.endswith("/messages"):
            return {"user_message": {}, "message": {"id": n, "content": "track your order", "finish_reason": "stop"}}
        if path.startswith("/admin/conversations/"):
            if (headers or {}).get("Authorization") != "Bearer adm":
                raise urllib.error.HTTPError(path, 401, "admin token required", None, None)
            return {"model_version": str(1 + int(path.rsplit("/c", 1)[1]) % 2), "messages": []}
        return {}

    monkeypatch.setattr(traffic.Client, "call", call)
    return calls


def test_simulated_users_learn_a_chats_version_only_through_the_admin_api(monkeypatch):
    from tasks.demo import traffic

    calls, qs = fake_chat_service(monkeypatch), [("where is my order", "track your order")]
    monkeypatch.setenv("ECB_CHAT_ADMIN_TOKEN", "adm")  # the default token
    summary = traffic.drive("http://chat", 4, traffic.by_version({"2": 1.0}, default=0.0), workers=1, qs=qs)
    assert summary["failed"] == 0, summary["failures"]
    assert summary["by_version"] == {"1": {"chats": 2, "up": 2, "down": 0}, "2": {"chats": 2, "up": 0, "down": 2}}
    assert [p for m, p in calls if m == "GET"] == [f"/admin/conversations/c{n}" for n in range(4)]  # once per chat
    calls.clear()
    with pytest.raises(LookupError, match="admin token"):  # refused before the first chat, not 4 failed chats
        traffic.drive("http://chat", 4, traffic.by_version({}), admin_token="", qs=qs)
    assert calls == []
    plain = traffic.drive("http://chat", 2, traffic.by_reference(rated=1.0), workers=1, admin_token="", qs=qs)
    assert plain["failed"] == 0 and plain["by_version"] == {"unknown": {"chats": 2, "up": 2, "down": 0}}
    assert not any(m == "GET" for m, _ in calls)
