"""Metrics against values counted by hand (see the comments) and against sacrebleu's public API."""

from __future__ import annotations

import math
import random
import time

import pytest

from tasks.ml import metrics

WEIGHTS = {"bleu1": 0.10, "bleu2": 0.15, "bleu3": 0.25, "bleu4": 0.40, "rougeL_precision": 0.10}

# Two-sentence corpus. 13a tokenization = whitespace split here (lower-case words, no punctuation).
#
# hyp1 "the cat is on the mat"            (6 tokens)  ref1 "the cat sat on the mat"          (6 tokens)
#   1-grams: the x2, cat, is, on, mat -> 6, matched: the x2, cat, on, mat = 5
#   2-grams: the cat, cat is, is on, on the, the mat -> 5, matched: the cat, on the, the mat = 3
#   3-grams: the cat is, cat is on, is on the, on the mat -> 4, matched: on the mat = 1
#   4-grams: the cat is on, cat is on the, is on the mat -> 3, matched: 0
# hyp2 "a dog barked"                     (3 tokens)  ref2 "the dog barked loudly at night"  (6 tokens)
#   1-grams: a, dog, barked -> 3, matched: dog, barked = 2
#   2-grams: a dog, dog barked -> 2, matched: dog barked = 1
#   3-grams: a dog barked -> 1, matched: 0
#   4-grams: none
# Corpus: p1 = 7/9, p2 = 4/7, p3 = 1/5, 4-grams 0 matched of 3 -> exp smoothing (first zero order): 1/(2*3) = 1/6
#   c = 9, r = 12 -> BP = exp(1 - 12/9) = exp(-1/3)
#   BLEU-1 = BP * 7/9
#   BLEU-2 = BP * sqrt(7/9 * 4/7) = BP * 2/3
#   BLEU-3 = BP * (7/9 * 4/7 * 1/5)^(1/3) = BP * (4/45)^(1/3)
#   BLEU-4 = BP * (4/45 * 1/6)^(1/4) = BP * (2/135)^(1/4)
# ROUGE-L (LCS): pair 1 LCS = "the cat on the mat" = 5 -> P = 5/6, R = 5/6, F = 5/6
#                pair 2 LCS = "dog barked" = 2     -> P = 2/3, R = 2/6 = 1/3, F = 2PR/(P+R) = 4/9
#   mean P = 3/4, mean R = 7/12, mean F = (5/6 + 4/9)/2 = 23/36
HYPS = ["the cat is on the mat", "a dog barked"]
REFS = ["the cat sat on the mat", "the dog barked loudly at night"]
BP = math.exp(-1 / 3)


def test_identical_sentence_scores_one():
    s = metrics.corpus_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL_precision", "rougeL_recall", "rougeL_f1"):
        assert s[key] == pytest.approx(1.0, abs=1e-12), key
    assert s["n"] == 1
    (ex,) = metrics.per_example_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert ex == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0, "rougeL_precision": 1.0})


def test_corpus_bleu_hand_computed():
    s = metrics.corpus_scores(HYPS, REFS)
    assert s["bleu1"] == pytest.approx(BP * 7 / 9, abs=1e-6)
    assert s["bleu2"] == pytest.approx(BP * 2 / 3, abs=1e-6)
    assert s["bleu3"] == pytest.approx(BP * (4 / 45) ** (1 / 3), abs=1e-6)
    assert s["bleu4"] == pytest.approx(BP * (2 / 135) ** (1 / 4), abs=1e-6)  # documented exp smoothing
    assert s["n"] == 2


def test_corpus_bleu_matches_sacrebleu_public_api():
    from sacrebleu.metrics import BLEU

    rng = random.Random(3)
    words = "the a order refund my your ship please help track , . ? can I".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(3, 25))) for _ in range(40)]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 25))) for _ in range(40)]
    s = metrics.corpus_scores(hyps, refs)
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score / 100,
                                              abs=1e-12)
    per = metrics.per_example_scores(hyps, refs)
    for h, r, p in zip(hyps, refs, per, strict=True):
        for n in range(1, 5):
            expected = BLEU(max_ngram_order=n, effective_order=True).sentence_score(h, [r]).score / 100
            assert p[f"bleu{n}"] == pytest.approx(expected, abs=1e-12)


def test_rouge_l_hand_computed():
    s = metrics.corpus_scores(HYPS, REFS)
    assert s["rougeL_precision"] == pytest.approx(3 / 4, abs=1e-9)
    assert s["rougeL_recall"] == pytest.approx(7 / 12, abs=1e-9)
    assert s["rougeL_f1"] == pytest.approx(23 / 36, abs=1e-9)


def test_per_example_hand_computed():
    # Sentence 2 alone: c = 3, r = 6 -> BP = exp(1 - 2) = 1/e; p1 = 2/3, p2 = 1/2,
    # 3-grams 0 of 1 -> exp smoothing 1/(2*1) = 1/2; no 4-grams -> effective order 3, so BLEU-4 == BLEU-3.
    first, second = metrics.per_example_scores(HYPS, REFS)
    e = math.exp(-1)
    assert second["bleu1"] == pytest.approx(e * 2 / 3, abs=1e-6)
    assert second["bleu2"] == pytest.approx(e * math.sqrt(1 / 3), abs=1e-6)
    assert second["bleu3"] == pytest.approx(e * (1 / 6) ** (1 / 3), abs=1e-6)
    assert second["bleu4"] == pytest.approx(second["bleu3"], abs=1e-12)
    assert second["rougeL_precision"] == pytest.approx(2 / 3)
    # Sentence 1 alone: BP = 1; p1 = 5/6, p2 = 3/5, p3 = 1/4, 4-grams 0 of 3 -> 1/6.
    assert first["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert first["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert first["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert first["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** (1 / 4), abs=1e-6)
    assert first["rougeL_precision"] == pytest.approx(5 / 6)


def test_empty_hypothesis_scores_zero():
    s = metrics.corpus_scores([""], ["the dog barked"])
    assert s["bleu1"] == 0.0 and s["bleu4"] == 0.0 and s["rougeL_precision"] == 0.0


def test_empty_or_mismatched_input_raises():
    with pytest.raises(ValueError):
        metrics.corpus_scores([], [])
    with pytest.raises(ValueError):
        metrics.corpus_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.per_example_scores([], [])
    with pytest.raises(ValueError):
        metrics.per_intent(["a"], ["a"], ["x", "y"], WEIGHTS)


def test_weighted_score_arithmetic():
    scores = {"bleu1": 0.5, "bleu2": 0.4, "bleu3": 0.3, "bleu4": 0.2, "rougeL_precision": 0.9, "extra": 7.0}
    # 0.10*0.5 + 0.15*0.4 + 0.25*0.3 + 0.40*0.2 + 0.10*0.9 = 0.05 + 0.06 + 0.075 + 0.08 + 0.09 = 0.355
    assert metrics.weighted_score(scores, WEIGHTS) == pytest.approx(0.355, abs=1e-12)
    assert metrics.weighted_score(scores, {"bleu4": 1.0}) == pytest.approx(0.2)
    assert metrics.weighted_score(scores, {}) == 0.0


def test_weighted_score_missing_or_nan_names_metric():
    scores = {"bleu1": 0.5, "bleu2": 0.4, "bleu3": 0.3, "bleu4": 0.2}
    with pytest.raises(ValueError, match="rougeL_precision"):
        metrics.weighted_score(scores, WEIGHTS)
    with pytest.raises(ValueError, match="bleu3"):
        metrics.weighted_score({**scores, "rougeL_precision": 0.1, "bleu3": float("nan")}, WEIGHTS)
    with pytest.raises(ValueError, match="bleu2"):
        metrics.weighted_score({**scores, "rougeL_precision": 0.1, "bleu2": None}, WEIGHTS)


def test_per_intent():
    hyps = HYPS + ["the cat sat on the mat"]
    refs = REFS + ["the cat sat on the mat"]
    out = metrics.per_intent(hyps, refs, ["b", "b", "a"], WEIGHTS)
    assert list(out) == ["a", "b"]
    assert out["b"]["n"] == 2
    assert out["b"]["bleu2"] == pytest.approx(BP * 2 / 3, abs=1e-6)  # same corpus as the hand-computed one
    assert out["b"]["weighted_score"] == pytest.approx(metrics.weighted_score(out["b"], WEIGHTS))
    assert out["a"]["n"] == 1 and out["a"]["weighted_score"] == pytest.approx(1.0)


def _synthetic(n: int, seed: int):
    rng = random.Random(seed)
    words = "the a order refund shipping account please help you can we will your to track".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(8, 30))) for _ in range(n)]
    good = [" ".join(r.split()[:-2]) for r in refs]  # near copies
    bad = [" ".join(rng.choices(words, k=rng.randint(8, 30))) for _ in range(n)]
    return refs, good, bad


def test_bootstrap_identical_systems():
    refs, good, _ = _synthetic(60, 1)
    out = metrics.paired_bootstrap(good, good, refs, WEIGHTS, n_resamples=200, seed=0)
    assert out["delta"] == 0.0
    assert out["ci_low"] <= 0.0 <= out["ci_high"]
    assert out["p_value_le_0"] == 1.0


def test_bootstrap_better_system_and_delta_matches_corpus_scores():
    refs, good, bad = _synthetic(60, 2)
    out = metrics.paired_bootstrap(good, bad, refs, WEIGHTS, n_resamples=300, seed=0)
    expected = (metrics.weighted_score(metrics.corpus_scores(good, refs), WEIGHTS)
                - metrics.weighted_score(metrics.corpus_scores(bad, refs), WEIGHTS))
    assert out["delta"] == pytest.approx(expected, abs=1e-12)
    assert out["ci_low"] > 0
    assert out["ci_low"] <= out["delta"] <= out["ci_high"]
    assert out["p_value_le_0"] == 0.0
    reverse = metrics.paired_bootstrap(bad, good, refs, WEIGHTS, n_resamples=300, seed=0)
    assert reverse["ci_high"] < 0 and reverse["p_value_le_0"] == 1.0


def test_bootstrap_deterministic_with_seed():
    refs, good, bad = _synthetic(40, 3)
    mixed = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad, strict=True))]
    a = metrics.paired_bootstrap(mixed, bad, refs, WEIGHTS, n_resamples=200, seed=11)
    b = metrics.paired_bootstrap(mixed, bad, refs, WEIGHTS, n_resamples=200, seed=11)
    c = metrics.paired_bootstrap(mixed, bad, refs, WEIGHTS, n_resamples=200, seed=12)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    assert a["delta"] == c["delta"]


def test_bootstrap_rejects_unknown_metric():
    with pytest.raises(ValueError, match="'meteor' cannot be bootstrapped"):
        metrics.paired_bootstrap(HYPS, HYPS, REFS, {"meteor": 1.0}, n_resamples=10)


@pytest.mark.parametrize("metric", ["rougeL_recall", "rougeL_f1", "rougeL_precision"])
def test_bootstrap_resamples_every_rouge_l_column(metric):
    """Each ROUGE-L metric the weights may name is bootstrapped on its own column: the full-set delta equals the
    difference of the corpus scores, and an answer that adds words moves recall and precision apart."""
    refs, good, bad = _synthetic(40, 3)
    longer = [g + " and some more words here" for g in good]
    out = metrics.paired_bootstrap(longer, bad, refs, {metric: 1.0}, n_resamples=200, seed=3)
    want = metrics.corpus_scores(longer, refs)[metric] - metrics.corpus_scores(bad, refs)[metric]
    assert out["delta"] == pytest.approx(want, abs=1e-12)
    assert out["ci_low"] <= out["delta"] <= out["ci_high"]


def test_every_weightable_metric_is_a_config_choice():
    from tasks.config import WEIGHT_METRICS

    assert set(metrics.WEIGHTABLE) == set(WEIGHT_METRICS)


def test_bootstrap_speed_500_examples_1000_resamples():
    refs, good, bad = _synthetic(500, 4)
    metrics.corpus_scores(good[:1], refs[:1])  # warm the imports (rouge_score pulls in nltk)
    t0 = time.perf_counter()
    out = metrics.paired_bootstrap(good, bad, refs, WEIGHTS, n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - t0
    assert out["n"] == 500 and out["n_resamples"] == 1000
    assert elapsed < 10, f"paired bootstrap took {elapsed:.1f}s"
