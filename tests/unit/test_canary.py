"""The canary verdict's statistics and the service's sticky assignment, without services."""

from __future__ import annotations

import secrets
from collections import deque
from types import SimpleNamespace

import pytest

from tasks.chat.serving import canary_arm
from tasks.release.canary import Arm, Limits, diff_interval, judge, wilson, z_value

Z95 = z_value(0.95)


def test_z_of_95_percent():
    assert abs(Z95 - 1.959964) < 1e-5


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    lo, hi = wilson(k, n, Z95)
    assert abs(lo - low) < 1e-4 and abs(hi - high) < 1e-4


def test_difference_interval_is_newcombes_hybrid_score():
    # Newcombe (1998), Statistics in Medicine 17, table II, method 10, examples (a) to (d)
    for (k1, n1, k2, n2), (low, high) in {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                                          (6, 7, 2, 7): (0.0582, 0.8062), (5, 56, 0, 29): (-0.0381, 0.1926)}.items():
        d, lo, hi = diff_interval(k1, n1, k2, n2, Z95)
        assert abs(d - (k1 / n1 - k2 / n2)) < 1e-12 and abs(lo - low) < 1e-4 and abs(hi - high) < 1e-4
    # no champion replies (canary share 1): the candidate's own Wilson interval against a rate of 0
    assert diff_interval(3, 50, 0, 0, Z95) == (0.06, *wilson(3, 50, Z95))


def arms(cand_down=10, champ_down=10, rated=100, replies=200, cand_errors=0, champ_errors=0, cand_p95=500.0,
         champ_p95=500.0, cand_bad=0, champ_bad=0):
    return (Arm("2", replies, cand_errors, cand_bad, rated, cand_down, cand_p95),
            Arm("1", replies * 4, champ_errors, champ_bad, rated * 4, champ_down * 4, champ_p95))


def test_equal_signals_promote_and_the_sentence_has_every_number():
    cand, champ = arms()
    v = judge(cand, champ, Limits(min_messages=200))
    assert v.decision == "promote" and v.reasons == []
    assert not any(c["failed"] for c in v.checks.values())
    s = v.sentence
    assert s.startswith("Canary version 2 vs champion 1 on 200 vs 800 replies: ")
    assert "thumbs-down 10.0% vs 10.0% of 100 vs 400 rated" in s and "errors 0.0% vs 0.0%" in s
    assert "p95 latency 500 vs 500 ms (limit x1.5)" in s and s.endswith("promoted: no signal is worse beyond its "
                                                                         "margin.")
    assert "\n" not in s and s.count(". ") == 0  # one sentence


def test_more_thumbs_down_rolls_back_with_the_interval_in_the_sentence():
    cand, champ = arms(cand_down=40, champ_down=10)  # 40% vs 10% of rated replies
    v = judge(cand, champ, Limits(min_messages=200))
    td = v.checks["thumbs_down"]
    assert v.decision == "rollback" and td["failed"] and td["low"] > 0.2 and abs(td["diff"] - 0.3) < 1e-12
    assert v.reasons == ["the thumbs-down rate is higher beyond the margin with 95% confidence"]
    assert "(difference +30.0 points, 95% CI +" in v.sentence and "rolled back: the thumbs-down rate" in v.sentence


def test_noise_does_not_roll_back_but_a_margin_can_tolerate_a_real_difference():
    cand, champ = arms(cand_down=14, champ_down=10)  # 14% vs 10% of 100 rated: within noise
    assert judge(cand, champ, Limits(min_messages=200)).decision == "promote"
    cand, champ = arms(cand_down=30, champ_down=10)
    assert judge(cand, champ, Limits(min_messages=200)).decision == "rollback"
    # a 10-point margin: the lower bound (about +10.8) must clear it; a 15-point one accepts the candidate
    assert judge(cand, champ, Limits(min_messages=200, max_thumbs_down_increase=0.15)).decision == "promote"


def test_errors_bad_replies_and_latency_each_roll_back():
    cand, champ = arms(cand_errors=12)
    v = judge(cand, champ, Limits(min_messages=200))
    assert v.decision == "rollback" and v.checks["errors"]["failed"] and not v.checks["thumbs_down"]["failed"]
    cand, champ = arms(cand_bad=30, champ_bad=20)  # 15% vs 2.5%
    assert judge(cand, champ, Limits(min_messages=200)).checks["bad_replies"]["failed"]
    cand, champ = arms(cand_p95=900.0, champ_p95=500.0)
    v = judge(cand, champ, Limits(min_messages=200))
    assert v.decision == "rollback" and v.reasons == ["p95 latency above 1.5 x the champion's"]
    assert judge(cand, champ, Limits(min_messages=200, max_latency_ratio=2.0)).decision == "promote"


def test_too_few_candidate_replies_rolls_back_and_few_replies_skip_latency():
    cand, champ = arms(replies=50, rated=20)
    v = judge(cand, champ, Limits(min_messages=200))
    assert v.decision == "rollback" and v.reasons == ["only 50 of the 200 candidate replies needed"]
    small = Arm("2", 10, latency_p95_ms=5000.0)
    v = judge(small, Arm("1", 10, latency_p95_ms=100.0), Limits(min_messages=10))
    assert v.checks["latency_p95"] == {"candidate": 5000.0, "champion": 100.0, "limit": 1.5, "failed": False,
                                       "checked": False}
    assert "too few replies to compare" in v.sentence and v.decision == "promote"


def test_no_ratings_is_not_judged_and_no_champion_traffic_judges_the_candidate_alone():
    v = judge(Arm("2", 300, latency_p95_ms=1.0), Arm("1", 0), Limits(min_messages=200))
    assert v.checks["thumbs_down"]["diff"] is None and not v.checks["thumbs_down"]["failed"]
    assert v.decision == "promote" and "n/a" in v.sentence
    v = judge(Arm("2", 300, errors=6, latency_p95_ms=1.0), Arm("1", 0), Limits(min_messages=200))
    assert v.decision == "rollback" and v.checks["errors"]["failed"]  # 2% errors, no champion to say it is normal


def test_verdict_round_trips_as_json():
    import json

    v = judge(*arms(cand_down=40), Limits(min_messages=200)).to_dict()
    assert json.loads(json.dumps(v)) == v and v["candidate"]["version"] == "2" and v["champion"]["replies"] == 800


def test_canary_arm_is_sticky_and_takes_its_share():
    ids = [secrets.token_urlsafe(24) for _ in range(20000)]
    assert not any(canary_arm(i, 0.0) for i in ids) and all(canary_arm(i, 1.0) for i in ids)
    share = sum(canary_arm(i, 0.2) for i in ids) / len(ids)
    assert abs(share - 0.2) < 0.015
    assert [canary_arm(i, 0.2) for i in ids[:100]] == [canary_arm(i, 0.2) for i in ids[:100]]


def test_limits_come_from_the_release_config():
    from tasks.config import load_config

    cfg = load_config(overrides={"release.canary_min_messages": 50, "release.canary_confidence": 0.9,
                                 "release.canary_max_latency_ratio": 2.0})
    assert Limits.from_config(cfg.release) == Limits(50, 0.9, 0.0, 0.0, 0.0, 2.0)


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
    monkeypatch.setattr(canary, "_record_rollback", lambda *a: state["recorded"].append(a))
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
    out = canary.manual_rollback("m", None, "ann", "bad answers")
    assert registry["aliases"] == {"champion": "1", "previous": "2"} and out["demoted"] == ["2"]
    assert registry["recorded"] == [("m", "1", ["2"], "ann", "bad answers")]
    with pytest.raises(canary.RollbackError, match="no version 9"):
        canary.manual_rollback("m", "9", "ann", "x")
    with pytest.raises(canary.RollbackError, match="already is the champion"):
        canary.manual_rollback("m", "1", "ann", "x")
    # during a canary, a rollback without a version ends the canary and keeps the champion
    registry["aliases"].update(candidate="3")
    out = canary.manual_rollback("m", None, "bob", "stop the canary")
    assert registry["aliases"] == {"champion": "1", "previous": "2"} and out["demoted"] == ["3"]
    registry["aliases"].clear()
    with pytest.raises(canary.RollbackError, match="no 'previous' alias"):
        canary.manual_rollback("m", None, "ann", "x")


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
