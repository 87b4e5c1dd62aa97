"""Quality gate: decides whether a freshly trained candidate may replace the released champion.

Pure Python: the top level imports only the standard library and the config (the policy is ``cfg.gate``);
``tasks.ml.metrics`` (numpy, sacrebleu, rouge_score) is imported lazily, and only when a paired bootstrap runs.
``force_deploy`` is a per-run choice (the trigger form), not policy, so it is an argument of ``decide``.

The gate fails closed. Rules, in this order:

1. An unreachable model registry blocks, even with ``force_deploy``: nothing can be released into it.
2. A missing or unusable candidate evaluation blocks, even with ``force_deploy``: no evaluation, 0 examples, fewer
   than ``min_eval_examples`` examples, or a weighted metric (any key of ``weights``) or ``weighted_score`` that is
   missing, None, NaN or not a number.
3. ``force_deploy`` releases (``forced=True``); the decision the gate would have made otherwise is computed first
   and reported in the reasons and the summary.
4. No champion: the candidate is released as the first model -- unless the evaluate step also scored the untuned
   base model (``gate.first_release_vs_base``): then the candidate must beat the base under rules 5-9, exactly as it
   would have to beat a champion (the table and the reasons say "base model" where they say "champion").
5. A champion evaluated on another snapshot (or on a different number of examples, or with other evaluation
   settings such as max_new_tokens, when both evaluations record theirs) blocks: the caller must re-evaluate the
   champion on the candidate's snapshot and settings first (tasks/ml/evaluation.py does: it reuses a stored
   evaluation only when its settings match). A champion with missing / NaN metrics blocks.
6. The weighted improvement ``delta`` must be strictly above ``min_improvement_threshold`` (differences below
   ``EPS`` count as equal, so "+0.0010 vs threshold 0.0010" never releases because of float noise).
7. A paired bootstrap (``tasks.ml.metrics.paired_bootstrap``) gives the 95% CI of delta when both evaluations carry
   outputs and the same references; with ``require_significance`` a CI low end <= 0, or no CI at all, blocks. No CI
   at all never releases unchecked: ``missing_ci=block`` blocks, ``missing_ci=ask`` (the default) releases only
   through a person's approval (``ci_problem`` says why there is none; the Airflow side asks).
8. Per-intent guard: an intent present in both evaluations with at least ``min_intent_examples`` examples whose
   weighted score dropped by more than ``max_intent_regression`` blocks.
9. Live set (snapshots made with data.include_feedback: prompts whose chat reply got a thumbs-down): the table
   shows how close each model's answers stay to the rejected replies (``rejected_similarity``, lower is better)
   and how often they repeat them verbatim. With ``live_policy=report`` (the default) it is a note only; with
   ``block`` a candidate whose similarity rises by more than ``live_max_increase`` over the champion's, on a live
   set of at least ``live_min_examples`` prompts, is blocked.

Rules 1-2 and 5 are hard stops; among rules 6-9 every blocking reason is collected, so a person sees everything
wrong at once. Weighted scores are recomputed from ``scores`` with the gate's ``weights`` so both models are weighed
alike; a stored ``weighted_score`` that disagrees (evaluated under other weights) is reported as a note.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.config import GateConfig

EPS = 1e-9  # |delta - threshold| below this counts as "equal to the threshold" (not above it)
TOP_INTENTS = 5

@dataclass
class Evaluation:
    """One model's scores on one snapshot's test split."""

    model_ref: str
    snapshot_id: str
    n: int
    scores: dict  # bleu1..4, rougeL_precision, rougeL_recall, rougeL_f1 (0..1)
    weighted_score: float | None = None
    per_intent: dict[str, dict] = field(default_factory=dict)  # {intent: {"n", "weighted_score", metrics...}}
    outputs: list[str] | None = None  # hypotheses in example order (for the paired bootstrap)
    references: list[str] | None = None
    settings: dict | None = None  # the evaluation settings it was made with (None: not recorded)


@dataclass
class LiveEvaluation:
    """One model's answers to the live set, compared with the replies users rejected (lower is better)."""

    model_ref: str
    n: int
    rejected_similarity: float | None  # mean ROUGE-L F1 against the rejected reply, 0..1
    repeat_rate: float | None  # share of answers that repeat the rejected reply verbatim
    per_version: dict[str, dict] = field(default_factory=dict)  # {model version that was rated: {n, ...}}


@dataclass
class Decision:
    release: bool
    reasons: list[str]
    summary: str  # one sentence, with numbers
    forced: bool = False
    delta: float | None = None  # candidate - champion weighted score
    ci_low: float | None = None  # bootstrap 95% CI of delta
    ci_high: float | None = None
    threshold: float | None = None
    table: str = ""
    intents_moved: list[tuple[str, float, float, float]] = field(default_factory=list)  # (intent, cand, champ, d)
    # Outcome of every check that ran (True = holds); "significant" blocks only with require_significance.
    checks: dict[str, bool] = field(default_factory=dict)
    would_release: bool = False  # the decision without force_deploy
    candidate_score: float | None = None  # weighted scores recomputed with the gate's weights
    champion_score: float | None = None
    ci_problem: str | None = None  # why a comparison with a champion has no CI (a release then needs a person)
    p_value: float | None = None  # bootstrap share of resampled deltas <= 0
    n_resamples: int | None = None
    live: dict = field(default_factory=dict)  # the live set's numbers (rule 9), empty without a live evaluation
    versus: str = "champion"  # what the candidate was compared with: "champion", or "base model" (rule 4)

    def to_dict(self) -> dict:
        """JSON-serialisable (XCom, database rows)."""
        d = dataclasses.asdict(self)
        d["intents_moved"] = [list(t) for t in self.intents_moved]
        return d


# --------------------------------------------------------------------------------------------------------- helpers


def _num(x: Any) -> float | None:
    """A finite float, or None for missing / None / NaN / inf / non-numbers (bools are not numbers here)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.4f}"


def _sfmt(x: Any) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:+.4f}"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _value_problem(value: Any, present: bool) -> str | None:
    if not present:
        return "is missing"
    if value is None:
        return "is None"
    if isinstance(value, bool):
        return f"is not a number ({value!r})"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"is not a number ({_one_line(repr(value))[:60]})"
    if math.isnan(v):
        return "is NaN"
    if not math.isfinite(v):
        return f"is not finite ({v})"
    return None


def _metric_problems(ev: Evaluation, weights: Mapping, who: str) -> list[str]:
    scores = ev.scores if isinstance(ev.scores, Mapping) else {}
    problems = []
    for metric in weights:
        p = _value_problem(scores.get(metric), metric in scores)
        if p:
            problems.append(f"{who} metric '{metric}' {p}")
    p = _value_problem(ev.weighted_score, True)
    if p:
        problems.append(f"{who} metric 'weighted_score' {p}")
    return problems


def _weights_problem(weights: Any) -> str | None:
    if not isinstance(weights, Mapping) or not weights:
        return "no metric weights given"
    for metric, w in weights.items():
        if _num(w) is None:
            return f"weight of metric '{metric}' is not a finite number ({w!r})"
    return None


def _weighted(scores: Mapping | None, weights: Mapping) -> float | None:
    """sum(weight * score) over the weighted metrics, or None when one is missing / not finite."""
    if not isinstance(scores, Mapping):
        return None
    total = 0.0
    for metric, w in weights.items():
        v, wv = _num(scores.get(metric)), _num(w)
        if v is None or wv is None:
            return None
        total += wv * v
    return total


def _intent_score(entry: Any, weights: Mapping) -> float | None:
    if not isinstance(entry, Mapping):
        return None
    recomputed = _weighted(entry, weights)
    return recomputed if recomputed is not None else _num(entry.get("weighted_score"))


def _intent_n(entry: Any) -> int:
    v = _num(entry.get("n")) if isinstance(entry, Mapping) else None
    return int(v) if v is not None else 0


def _pairing_problem(cand: Evaluation, champ: Evaluation, versus: str = "champion") -> str | None:
    """Why the two evaluations cannot be bootstrapped as pairs (None when they can)."""
    for who, ev in (("candidate", cand), (versus, champ)):
        if ev.outputs is None:
            return f"the {who} evaluation has no stored outputs"
        if ev.references is None:
            return f"the {who} evaluation has no stored references"
    lengths = {len(cand.outputs), len(champ.outputs), len(cand.references), len(champ.references)}
    if len(lengths) != 1:
        return (f"outputs and references differ in length (candidate {len(cand.outputs)}/{len(cand.references)}, "
                f"{versus} {len(champ.outputs)}/{len(champ.references)})")
    if list(cand.references) != list(champ.references):
        return f"candidate and {versus} references differ (not the same examples in the same order)"
    return None


def _bootstrap(cand: Evaluation, champ: Evaluation, weights: Mapping,
               settings: GateConfig, versus: str = "champion") -> tuple[dict | None, str | None]:
    problem = _pairing_problem(cand, champ, versus)
    if problem:
        return None, problem
    try:
        from tasks.ml import metrics

        result = metrics.paired_bootstrap(list(cand.outputs), list(champ.outputs), list(cand.references),
                                          dict(weights), n_resamples=settings.bootstrap_resamples,
                                          seed=settings.bootstrap_seed)
    except Exception as exc:  # fail closed below when significance is required; never crash the gate
        return None, f"the bootstrap failed: {_one_line(exc)}"
    return result, None


# ----------------------------------------------------------------------------------------------------------- gate


@dataclass
class _Verdict:
    release: bool = False
    blocking: list[str] = field(default_factory=list)
    passing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hard_stop: bool = False  # blocked before any comparison (force_deploy cannot override rules 1-2)
    comparable: bool = False


def decide(candidate: Evaluation | None, champion: Evaluation | None, weights: Mapping,
           settings: GateConfig | None = None, registry_error: str | None = None,
           force_deploy: bool = False, candidate_live: LiveEvaluation | None = None,
           champion_live: LiveEvaluation | None = None, base: Evaluation | None = None) -> Decision:
    """Apply the gate rules (see the module docstring) and return the decision with its table. ``base``: the
    untuned base model's evaluation, the one to beat when there is no champion (rule 4)."""
    settings = settings or GateConfig()
    threshold = settings.min_improvement_threshold
    checks: dict[str, bool] = {}
    d = Decision(release=False, reasons=[], summary="", threshold=threshold, n_resamples=None)
    v = _Verdict()

    # Rules 1-2: hard stops that force_deploy cannot override.
    checks["registry_reachable"] = registry_error is None
    if registry_error is not None:
        v.blocking.append(f"model registry unreachable: {_one_line(registry_error) or 'no detail'}")
    wp = _weights_problem(weights)
    checks["weights_valid"] = wp is None
    if wp:
        v.blocking.append(wp)
        weights = weights if isinstance(weights, Mapping) else {}
    cand_problems: list[str] = []
    if candidate is None:
        cand_problems.append("no candidate evaluation")
    else:
        n = _num(candidate.n)
        if n is None or n <= 0:
            cand_problems.append(f"candidate evaluation is empty ({candidate.n!r} examples)")
        elif n < settings.min_eval_examples:
            cand_problems.append(f"candidate was evaluated on {int(n)} examples, below the minimum of "
                                 f"{settings.min_eval_examples} (min_eval_examples)")
        cand_problems += _metric_problems(candidate, weights, "candidate")
    checks["candidate_valid"] = not cand_problems
    v.blocking += cand_problems
    if candidate is not None and not wp:
        d.candidate_score = _weighted(candidate.scores, weights)
    d.live = _live_numbers(candidate_live, champion_live, settings)

    if v.blocking:
        v.hard_stop = True
    elif champion is None and base is not None:
        # Rule 4: no champion, but the base model it was fine-tuned from: beat that like a champion.
        checks["champion_present"] = False
        d.versus, champion = "base model", base
        _compare(candidate, champion, weights, settings, d, v, checks)
    elif champion is None:
        # Rule 4: nothing to beat.
        checks["champion_present"] = False
        v.release = True
        v.passing.append("first model: no champion to beat")
        _live_rule(d.live, settings, v, checks)  # a note only: no champion answers to compare with
    else:
        checks["champion_present"] = True
        _compare(candidate, champion, weights, settings, d, v, checks)
    if candidate is not None and not v.hard_stop:
        stored = _num(candidate.weighted_score)
        if d.candidate_score is not None and stored is not None and abs(stored - d.candidate_score) > 1e-6:
            v.notes.append(f"note: the candidate's stored weighted_score {stored:.4f} differs from "
                           f"{d.candidate_score:.4f} recomputed with the gate's weights (the gate uses the latter)")

    d.would_release = v.release
    d.checks = checks
    # Rule 3: force_deploy overrides everything but the hard stops.
    if force_deploy and not v.hard_stop:
        d.release, d.forced = True, True
        would = ("released it anyway: " + "; ".join(v.passing)) if v.release else \
            ("NOT released it: " + "; ".join(v.blocking))
        d.reasons = [f"forced: force_deploy=True released the candidate; without it the gate would have {would}"]
        d.reasons += v.blocking + v.passing + v.notes
    else:
        d.release = v.release
        d.reasons = (v.passing if v.release else v.blocking) + v.notes
        if force_deploy:
            why = ("force_deploy cannot release into an unreachable registry" if registry_error is not None
                   else "force_deploy cannot release a model whose evaluation is unusable")
            d.reasons.insert(0, f"force_deploy=True cannot override this: {why}")
    d.summary = _summary(candidate, d, v, force_deploy)
    d.table = render_table(candidate, champion, weights, d)
    return d


def _compare(cand: Evaluation, champ: Evaluation, weights: Mapping, settings: GateConfig, d: Decision,
             v: _Verdict, checks: dict[str, bool]) -> None:
    # Rule 5: a fair comparison needs the same examples and a usable champion evaluation.
    who = d.versus
    hard: list[str] = []
    same_snapshot = champ.snapshot_id == cand.snapshot_id
    checks["same_snapshot"] = same_snapshot
    if not same_snapshot:
        hard.append(f"unfair comparison: the {who} was evaluated on snapshot '{champ.snapshot_id}', the candidate "
                    f"on '{cand.snapshot_id}'; re-evaluate the {who} on the candidate's snapshot first")
    elif champ.n != cand.n:
        checks["same_examples"] = False
        hard.append(f"unfair comparison: the {who} was evaluated on {champ.n} examples, the candidate on "
                    f"{cand.n}; re-evaluate the {who} on the same examples first")
    else:
        checks["same_examples"] = True
        if changed := _settings_diff(cand.settings, champ.settings, who):
            checks["same_settings"] = False
            hard.append(f"unfair comparison: the {who} was evaluated with other settings ({changed}); "
                        f"re-evaluate the {who} with the candidate's settings first")
    champ_problems = _metric_problems(champ, weights, who)
    checks["champion_valid"] = not champ_problems
    hard += [p + " (fail closed)" for p in champ_problems]
    if not champ_problems:
        d.champion_score = _weighted(champ.scores, weights)
    if hard:
        v.blocking += hard
        return
    v.comparable = True

    # Rule 6: strict improvement over the threshold.
    delta = d.candidate_score - d.champion_score
    d.delta = delta
    threshold = settings.min_improvement_threshold
    above = delta - threshold > EPS
    checks["above_threshold"] = above
    over = "" if who == "champion" else f" over the {who}"
    msg = f"improvement {delta:+.4f}{over} is {'' if above else 'not '}above the threshold {threshold:.4f}"
    (v.passing if above else v.blocking).append(msg)

    # Rule 7: paired bootstrap CI.
    result, problem = _bootstrap(cand, champ, weights, settings, who)
    if result is not None:
        d.ci_low, d.ci_high = result["ci_low"], result["ci_high"]
        d.p_value, d.n_resamples = result["p_value_le_0"], result["n_resamples"]
        ci = f"95% CI [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        significant = d.ci_low > 0
        checks["significant"] = significant
        if significant:
            v.passing.append(f"the improvement is significant: {ci} lies above 0")
        elif settings.require_significance:
            v.blocking.append(f"the improvement is not significant: {ci} does not lie above 0 "
                              f"(require_significance)")
        else:
            v.notes.append(f"note: {ci} does not lie above 0 (significance not required)")
        if abs(result["delta"] - delta) > 1e-6:
            v.notes.append(f"note: the bootstrap's delta {result['delta']:+.4f} on the stored outputs differs from "
                           f"the delta {delta:+.4f} of the stored scores")
    else:
        _missing_ci(problem, settings, d, v, checks)

    # Rule 8: per-intent regression guard.
    moved, regressions = [], []
    cand_pi = cand.per_intent if isinstance(cand.per_intent, Mapping) else {}
    champ_pi = champ.per_intent if isinstance(champ.per_intent, Mapping) else {}
    for intent in sorted(set(cand_pi) & set(champ_pi), key=str):
        cs, hs = _intent_score(cand_pi[intent], weights), _intent_score(champ_pi[intent], weights)
        n = min(_intent_n(cand_pi[intent]), _intent_n(champ_pi[intent]))
        guarded = n >= settings.min_intent_examples
        if cs is None or hs is None:
            if cs is None and hs is not None and guarded:
                regressions.append((intent, math.inf, None, hs, n))
            continue
        moved.append((str(intent), cs, hs, cs - hs))
        if guarded and hs - cs - settings.max_intent_regression > EPS:
            regressions.append((intent, hs - cs, cs, hs, n))
    moved.sort(key=lambda t: (-abs(t[3]), t[0]))
    d.intents_moved = moved[:TOP_INTENTS]
    if not cand_pi or not champ_pi:
        v.notes.append("note: per-intent guard skipped: "
                       + ("the candidate" if not cand_pi else f"the {who}") + " has no per-intent scores")
    else:
        checks["no_intent_regression"] = not regressions
        if regressions:
            regressions.sort(key=lambda r: (-r[1], str(r[0])))
            parts = [f"'{i}' has no candidate score ({who} {hs:.4f}, n={n})" if cs is None
                     else f"'{i}' dropped by {drop:.4f} ({hs:.4f} -> {cs:.4f}, n={n})"
                     for i, drop, cs, hs, n in regressions]
            v.blocking.append(f"per-intent regression beyond the allowed {settings.max_intent_regression:.4f}: "
                              + ", ".join(parts))
    _live_rule(d.live, settings, v, checks)
    v.release = not v.blocking


def _missing_ci(problem: str, settings: GateConfig, d: Decision, v: _Verdict, checks: dict[str, bool]) -> None:
    """Rule 7 without an interval: an improvement nobody could check is blocked or put to a person, never released
    as if it were significant."""
    d.ci_problem = problem
    checks["significant"] = False
    if settings.require_significance:
        v.blocking.append(f"significance is required but there is no confidence interval: {problem}")
    elif settings.missing_ci == "block":
        v.blocking.append(f"no confidence interval of the delta against the {d.versus}: {problem} "
                          f"(gate.missing_ci=block)")
    else:
        v.notes.append(f"note: no confidence interval of the delta against the {d.versus}: {problem}; a release "
                       f"needs a person's approval (gate.missing_ci=ask)")


def _settings_diff(cand: Mapping | None, champ: Mapping | None, who: str = "champion") -> str:
    """'max_new_tokens: champion 24, candidate 8' for every differing setting; '' when equal or not recorded."""
    if not isinstance(cand, Mapping) or not isinstance(champ, Mapping):
        return ""
    return ", ".join(f"{k}: {who} {champ.get(k)!r}, candidate {cand.get(k)!r}"
                     for k in sorted(set(cand) | set(champ), key=str) if cand.get(k) != champ.get(k))


def _live_numbers(cand: LiveEvaluation | None, champ: LiveEvaluation | None, settings: GateConfig) -> dict:
    if cand is None:
        return {}
    c, h = _num(cand.rejected_similarity), _num(champ.rejected_similarity) if champ is not None else None
    comparable = champ is not None and champ.n == cand.n and c is not None and h is not None
    return {"n": cand.n, "policy": settings.live_policy, "candidate": c, "champion": h,
            "candidate_repeat_rate": _num(cand.repeat_rate),
            "champion_repeat_rate": _num(champ.repeat_rate) if champ is not None else None,
            "champion_n": champ.n if champ is not None else None, "delta": c - h if comparable else None}


def _live_rule(live: dict, settings: GateConfig, v: _Verdict, checks: dict[str, bool]) -> None:
    """Rule 9. Report-only by default, on purpose: the live set is small and self-selected (only replies someone
    rated, first turns only), and closeness to a rejected reply is a proxy -- a right answer can share most words
    with one rejected for a single wrong detail. Let it block (live_policy=block) once its numbers have been seen
    to follow real quality."""
    if not live:
        return
    where = f"live set ({live['n']} prompts whose chat reply got a thumbs-down)"
    if live["candidate"] is None:
        v.notes.append(f"note: {where}: the candidate's live evaluation has no similarity score")
        return
    mine = (f"candidate similarity to the rejected replies {live['candidate']:.4f}, "
            f"{_pct(live['candidate_repeat_rate'])} repeated verbatim")
    if live["delta"] is None:
        why = ("no champion live evaluation to compare with" if live["champion_n"] is None
               else f"not compared with the champion's live evaluation ({live['champion_n']} prompts, similarity "
                    f"{_fmt(live['champion'])})")
        v.notes.append(f"note: {where}: {mine}; {why}")
        return
    delta, allowed = live["delta"], settings.live_max_increase
    rises = delta - allowed > EPS
    checks["live_no_regression"] = not rises
    text = (f"{where}: similarity to the rejected replies {live['candidate']:.4f} vs champion {live['champion']:.4f} "
            f"({delta:+.4f}), repeated verbatim {_pct(live['candidate_repeat_rate'])} vs "
            f"{_pct(live['champion_repeat_rate'])}")
    if rises and settings.live_policy == "block" and live["n"] >= settings.live_min_examples:
        v.blocking.append(f"{text}: rises by more than the allowed {allowed:.4f} (gate.live_policy=block)")
        return
    if settings.live_policy == "report":
        why = "reported only (gate.live_policy=report)"
    elif live["n"] < settings.live_min_examples:
        why = f"not checked: fewer than {settings.live_min_examples} prompts (live_min_examples)"
    else:
        why = f"within the allowed rise of {allowed:.4f}"
    v.notes.append(f"note: {text}; {why}")


def _pct(x: Any) -> str:
    value = _num(x)
    return "n/a" if value is None else f"{value:.0%}"


def _summary(cand: Evaluation | None, d: Decision, v: _Verdict, force_deploy: bool) -> str:
    ref = _one_line(cand.model_ref) if cand is not None else "no candidate"
    ci = f", 95% CI [{d.ci_low:+.4f}, {d.ci_high:+.4f}]" if d.ci_low is not None and d.ci_high is not None else ""
    if v.comparable:
        numbers = (f"weighted score {d.candidate_score:.4f} vs {d.versus} {d.champion_score:.4f}, "
                   f"delta {d.delta:+.4f}{ci}")
    elif d.candidate_score is not None:
        numbers = f"candidate weighted score {d.candidate_score:.4f} on {cand.n} examples"
    elif cand is not None:
        numbers = f"candidate evaluated on {cand.n!r} examples"
    else:
        numbers = ""
    numbers = f" ({numbers})" if numbers else ""
    if d.forced:
        would = "released it anyway" if v.release else "blocked it: " + "; ".join(v.blocking)
        text = f"Force-released {ref} because force_deploy=True; the gate alone would have {would}{numbers}."
    elif d.release and not v.comparable:
        text = (f"Released {ref} as the first model (no champion to beat) with weighted score "
                f"{d.candidate_score:.4f} on {cand.n} examples.")
    elif d.release:
        text = (f"Released {ref}{' as the first model' if d.versus != 'champion' else ''}: weighted score "
                f"{d.candidate_score:.4f} vs {d.versus} {d.champion_score:.4f}, "
                f"improvement {d.delta:+.4f} above the threshold {d.threshold:.4f}{ci}.")
    else:
        forced = " (force_deploy cannot override this)" if force_deploy else ""
        text = f"Not released {ref}: {'; '.join(v.blocking)}{forced}{numbers}."
    return _one_line(text)


# ---------------------------------------------------------------------------------------------------------- table


def render_table(candidate: Evaluation | None, champion: Evaluation | None, weights: Mapping,
                 decision: Decision) -> str:
    """Fixed-width text table of the comparison for the Airflow task log, ending with the DECISION line."""
    weights = weights if isinstance(weights, Mapping) else {}
    cand_scores = candidate.scores if candidate is not None and isinstance(candidate.scores, Mapping) else {}
    champ_scores = champion.scores if champion is not None and isinstance(champion.scores, Mapping) else {}
    # Deltas only where the comparison is fair (same snapshot, same examples).
    comparable = champion is not None and decision.checks.get("same_snapshot", True) \
        and decision.checks.get("same_examples", True)

    header = ["metric", "weight", "candidate", decision.versus, "delta", "weighted contribution"]
    rows = []
    for metric, w in weights.items():
        c, h, wv = _num(cand_scores.get(metric)), _num(champ_scores.get(metric)), _num(w)
        delta = c - h if comparable and c is not None and h is not None else None
        if champion is None:
            contrib = _fmt(wv * c) if wv is not None and c is not None else "n/a"
        else:
            contrib = _sfmt(wv * delta) if wv is not None and delta is not None else "n/a"
        rows.append([str(metric), _fmt(wv), _fmt(c), _fmt(h), _sfmt(delta), contrib])
    c_tot = _weighted(cand_scores, weights) if weights else None
    h_tot = _weighted(champ_scores, weights) if weights and champion is not None else None
    t_delta = c_tot - h_tot if comparable and c_tot is not None and h_tot is not None else None
    w_tot = sum(_num(w) or 0.0 for w in weights.values())
    rows.append(["TOTAL", _fmt(w_tot), _fmt(c_tot), _fmt(h_tot), _sfmt(t_delta),
                 _fmt(c_tot) if champion is None else _sfmt(t_delta)])
    live_rows = _live_rows(decision.live)

    widths = [max(len(r[i]) for r in [header, *rows, *live_rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return " | ".join([first, *(c.rjust(wd) for c, wd in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    out = [line(header), "-+-".join("-" * wd for wd in widths)]
    out += [line(r) for r in rows[:-1]]
    out += ["-+-".join("-" * wd for wd in widths), line(rows[-1])]
    if live_rows:
        out += ["-+-".join("-" * wd for wd in widths), *(line(r) for r in live_rows)]
        out.append(f"live set: {decision.live['n']} prompts whose chat reply got a thumbs-down; lower = further from "
                   f"the rejected replies (gate.live_policy={decision.live['policy']})")
    out.append("")

    if decision.ci_low is not None and decision.ci_high is not None:
        out.append(f"delta 95% CI [{decision.ci_low:+.4f}, {decision.ci_high:+.4f}] "
                   f"(bootstrap, {decision.n_resamples} resamples)")
    else:
        out.append("delta 95% CI [n/a, n/a] (bootstrap not run)")
    out.append(f"threshold {_sfmt(decision.threshold)}")
    out.append("intents that moved most:")
    if decision.intents_moved:
        iw = max(len("intent"), *(len(str(t[0])) for t in decision.intents_moved))
        out.append(f"  {'intent'.ljust(iw)}  {'candidate':>9}  {decision.versus:>9}  {'delta':>8}")
        for intent, c, h, dl in decision.intents_moved:
            out.append(f"  {str(intent).ljust(iw)}  {_fmt(c):>9}  {_fmt(h):>9}  {_sfmt(dl):>8}")
    else:
        out.append("  (none)")
    out.append(f"DECISION: {decision.summary}")
    return "\n".join(out)


def _live_rows(live: dict) -> list[list[str]]:
    """The live set's two table rows (rule 9): similarity to the rejected replies and the verbatim repeat rate."""
    if not live:
        return []
    c_rep, h_rep = live["candidate_repeat_rate"], live["champion_repeat_rate"]
    rep_delta = c_rep - h_rep if live["delta"] is not None and c_rep is not None and h_rep is not None else None
    return [["live similarity", live["policy"], _fmt(live["candidate"]), _fmt(live["champion"]), _sfmt(live["delta"]),
             "n/a"],
            ["live repeats", "report", _fmt(c_rep), _fmt(h_rep), _sfmt(rep_delta), "n/a"]]
