"""Answer-quality metrics: corpus BLEU-1..4, ROUGE-L, the weighted score, per-intent scores, paired bootstrap.

Pure Python + numpy + sacrebleu + rouge_score; no torch. All functions are deterministic.

How BLEU-n is computed (the same for every function in this module):

* sacrebleu's ``BLEU(max_ngram_order=n, tokenize="13a", lowercase=False, smooth_method="exp")``, i.e. the
  standard BLEU-n: geometric mean of the modified n-gram precisions p_1..p_n with *uniform* weights 1/n, times the
  brevity penalty BP = exp(1 - r/c) when the hypothesis length c is below the reference length r (1 otherwise).
  Scores are on a 0..1 scale (sacrebleu's score / 100).
* Corpus level (``corpus_scores``, ``per_intent``, ``paired_bootstrap``): counts are summed over the corpus before
  the precisions and BP are formed; ``effective_order=False``. Smoothing ``exp`` (NIST / mteval-v13a, Chen & Cherry
  method 3) only matters when an order has *no* match in the whole corpus: the k-th such order gets precision
  1 / (2^k * total_n) instead of 0.
* Sentence level (``per_example_scores``): the same settings plus ``effective_order=True`` (sacrebleu's
  ``sentence_bleu`` default): orders for which the hypothesis has no n-gram at all (hypothesis shorter than n
  tokens) are left out of the mean, so a 3-word answer gets BLEU-4 == BLEU-3 instead of a smoothed penalty.

Sufficient statistics (hypothesis length, reference length, matches and totals for orders 1..4) are extracted once
per sentence with the order-4 metric; the counts for orders 1..n are the same for the order-n metric, so BLEU-1..4
all come from one pass, and the bootstrap re-sums them per resample instead of re-tokenizing.

ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` (sentence-level LCS, lower-cased,
non-alphanumerics dropped, Porter stemmer), precision / recall / F1 averaged over examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

MAX_ORDER = 4
BLEU_KEYS = tuple(f"bleu{n}" for n in range(1, MAX_ORDER + 1))
TOKENIZE = "13a"
SMOOTH_METHOD = "exp"


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no examples to score (empty hypotheses and references)")
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        bad = [i for i, s in enumerate(seq) if not isinstance(s, str)]
        if bad:
            raise ValueError(f"{name}[{bad[0]}] is not a string")


def _bleu(n: int = MAX_ORDER, effective_order: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=n, tokenize=TOKENIZE, lowercase=False, smooth_method=SMOOTH_METHOD,
                effective_order=effective_order)


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics, shape (N, 2 + 2*4): [hyp_len, ref_len, correct1..4, total1..4]."""
    stats = _bleu()._extract_corpus_statistics(list(hypotheses), [list(references)])
    return np.asarray(stats, dtype=np.int64).reshape(len(hypotheses), 2 + 2 * MAX_ORDER)


def bleu_from_statistics(stats: Sequence[int] | np.ndarray, n: int, effective_order: bool = False) -> float:
    """BLEU-n (0..1) from summed statistics as returned (per sentence) by ``bleu_statistics``."""
    from sacrebleu.metrics import BLEU

    stats = [int(x) for x in stats]
    correct = stats[2:2 + n]
    total = stats[2 + MAX_ORDER:2 + MAX_ORDER + n]
    score = BLEU.compute_bleu(correct=correct, total=total, sys_len=stats[0], ref_len=stats[1],
                              smooth_method=SMOOTH_METHOD, effective_order=effective_order, max_ngram_order=n)
    return score.score / 100.0


def _rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L, shape (N, 3): precision, recall, F1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = np.empty((len(hypotheses), 3), dtype=np.float64)
    for i, (hyp, ref) in enumerate(zip(hypotheses, references, strict=True)):
        s = scorer.score(ref, hyp)["rougeL"]  # score(target, prediction)
        out[i] = (s.precision, s.recall, s.fmeasure)
    return out


def _corpus_from_parts(stats: np.ndarray, rouge: np.ndarray) -> dict:
    summed = stats.sum(axis=0)
    scores = {f"bleu{n}": bleu_from_statistics(summed, n) for n in range(1, MAX_ORDER + 1)}
    mean = rouge.mean(axis=0)
    scores.update(rougeL_precision=float(mean[0]), rougeL_recall=float(mean[1]), rougeL_f1=float(mean[2]),
                  n=int(stats.shape[0]))
    return scores


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU-1..4 (0..1), mean ROUGE-L precision / recall / F1 and the example count ``n``.

    One reference per hypothesis. Empty input or a length mismatch raises ValueError.
    """
    _check(hypotheses, references)
    return _corpus_from_parts(bleu_statistics(hypotheses, references), _rouge_l(hypotheses, references))


def weighted_score(scores: Mapping, weights: Mapping) -> float:
    """sum(weight * score) over the metrics named in ``weights``; a missing or NaN metric raises ValueError."""
    total = 0.0
    for metric, weight in weights.items():
        if metric not in scores or scores[metric] is None:
            raise ValueError(f"metric {metric!r} is missing from the scores (have: {sorted(scores)})")
        try:
            value = float(scores[metric])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {metric!r} is not a number: {scores[metric]!r}") from exc
        if math.isnan(value):
            raise ValueError(f"metric {metric!r} is NaN")
        w = float(weight)
        if math.isnan(w):
            raise ValueError(f"weight of metric {metric!r} is NaN")
        total += w * value
    return total


def per_example_scores(hyps: list[str], refs: list[str]) -> list[dict]:
    """Sentence-level bleu1..4 (0..1, effective order, exp smoothing) and rougeL_precision for each example."""
    _check(hyps, refs)
    stats = bleu_statistics(hyps, refs)
    rouge = _rouge_l(hyps, refs)
    out = []
    for row, r in zip(stats, rouge, strict=True):
        item = {f"bleu{n}": bleu_from_statistics(row, n, effective_order=True) for n in range(1, MAX_ORDER + 1)}
        item["rougeL_precision"] = float(r[0])
        out.append(item)
    return out


def per_intent(hyps: list[str], refs: list[str], intents: list[str], weights: Mapping) -> dict:
    """Corpus scores and weighted score per intent: {intent: {"n", "weighted_score", bleu1.., rougeL_..}}."""
    _check(hyps, refs)
    if len(intents) != len(hyps):
        raise ValueError(f"{len(intents)} intents but {len(hyps)} hypotheses")
    stats = bleu_statistics(hyps, refs)
    rouge = _rouge_l(hyps, refs)
    groups: dict[str, list[int]] = {}
    for i, intent in enumerate(intents):
        groups.setdefault(intent, []).append(i)
    out = {}
    for intent in sorted(groups, key=str):
        idx = np.asarray(groups[intent])
        scores = _corpus_from_parts(stats[idx], rouge[idx])
        out[intent] = {"n": scores["n"], "weighted_score": weighted_score(scores, weights), **scores}
    return out


ROUGE_KEYS = ("rougeL_precision", "rougeL_recall", "rougeL_f1")  # the columns of _rouge_l, in order
WEIGHTABLE = (*BLEU_KEYS, *ROUGE_KEYS)  # every metric a weighted score (and so the bootstrap) may use


def _weighted_from_sums(summed: np.ndarray, rouge_means: np.ndarray, weights: Mapping) -> float:
    scores = {f"bleu{n}": bleu_from_statistics(summed, n) for n in range(1, MAX_ORDER + 1)
              if f"bleu{n}" in weights}
    scores.update({k: float(rouge_means[i]) for i, k in enumerate(ROUGE_KEYS) if k in weights})
    return weighted_score(scores, weights)


def paired_bootstrap(cand_hyps: list[str], champ_hyps: list[str], refs: list[str], weights: Mapping,
                     n_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of the corpus-level weighted score: candidate minus champion.

    Each resample draws N example indices with replacement (numpy ``default_rng(seed)``), the *same* indices for
    both systems; the corpus BLEU statistics are re-summed over the drawn examples and the ROUGE-L means are
    re-averaged, then the weighted score is recomputed for each system. Returns ``delta`` (on the full test set),
    ``ci_low`` / ``ci_high`` (2.5th / 97.5th percentiles of the resampled deltas), ``p_value_le_0`` (share of
    resamples with delta <= 0), ``n`` and ``n_resamples``.
    """
    _check(cand_hyps, refs)
    _check(champ_hyps, refs)
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    unknown = sorted(set(weights) - set(WEIGHTABLE))
    if unknown:
        raise ValueError(f"metric {unknown[0]!r} cannot be bootstrapped (supported: {list(WEIGHTABLE)})")

    n = len(refs)
    parts = [(bleu_statistics(h, refs), _rouge_l(h, refs)) for h in (cand_hyps, champ_hyps)]
    full = [_weighted_from_sums(stats.sum(axis=0), rouge.mean(axis=0), weights) for stats, rouge in parts]
    delta = full[0] - full[1]

    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(1, n))  # bound memory of the index matrix
    done = 0
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(k, n))
        per_system = []
        for stats, rouge in parts:
            sums = stats[idx].sum(axis=1)  # (k, 10)
            rouge_means = rouge[idx].mean(axis=1)  # (k, 3)
            per_system.append([_weighted_from_sums(sums[j], rouge_means[j], weights) for j in range(k)])
        deltas[done:done + k] = np.asarray(per_system[0]) - np.asarray(per_system[1])
        done += k

    ci_low, ci_high = np.percentile(deltas, [2.5, 97.5])
    return {"delta": float(delta), "ci_low": float(ci_low), "ci_high": float(ci_high),
            "p_value_le_0": float(np.mean(deltas <= 0)), "n": n, "n_resamples": int(n_resamples)}
