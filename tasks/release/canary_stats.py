"""The canary verdict's statistics, pure: per-conversation counts in, differences, intervals and decisions out.

The conversation is the unit. The replies of one conversation share a user, a question and a model's mood, so they
are not independent: ten thumbs-down from one annoyed user are not ten pieces of evidence. Every rate is compared
with the conversations as clusters, following Rao & Scott (1992, "A simple method for the analysis of clustered
binary data", Biometrics 48): the design effect of each arm (its cluster-robust variance over the variance
independent replies would have) divides that arm's counts, and the usual two-proportion methods run on the
effective counts: the score test of ``candidate - champion <= margin`` and Newcombe's hybrid score interval. A
rate rolls back when the lower bound of its interval would lie above the margin, i.e. the one-sided test at level
(1 - confidence) / 2 rejects; the three rate checks are one family, and Holm's step-down correction keeps the chance
of rolling back a candidate that is no worse beyond any margin at that level too. Every method comes from
statsmodels; none is written out here.
"""

from __future__ import annotations

import warnings

import numpy as np
from statsmodels.regression.linear_model import WLS
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep


def design_effects(cand_k, cand_n, champ_k, champ_n) -> tuple[float, float]:
    """Design effect of each arm's rate sum(k) / sum(n) over conversations with per-conversation counts ``k`` of
    ``n`` (conversations with n = 0 say nothing and are left out).

    The rates come from one weighted regression of each conversation's rate on the arm (weights: its n); its
    conversation-clustered (sandwich) variance over the binomial variance p(1-p)/n is the arm's design effect. It is
    floored at 1: a chance under-dispersion never makes the verdict surer than independent replies would. An arm
    with fewer than two conversations, or a rate of 0 or 1, has nothing to estimate it from: 1."""
    k, n, arm = _rows(cand_k, cand_n, champ_k, champ_n)
    sizes = [(arm == a).sum() for a in (1, 0)]
    if min(sizes) < 2:
        return 1.0, 1.0
    design = np.column_stack([np.ones_like(n), arm])
    fit = WLS(k / n, design, weights=n).fit(cov_type="cluster", cov_kwds={"groups": np.arange(len(n))})
    cov = fit.cov_params()
    variances = (cov[0, 0] + 2 * cov[0, 1] + cov[1, 1], cov[0, 0])  # candidate = b0 + b1, champion = b0
    out = []
    for a, var in zip((1, 0), variances, strict=True):
        total, events = n[arm == a].sum(), k[arm == a].sum()
        p = events / total
        out.append(1.0 if p in (0.0, 1.0) else max(1.0, float(var) / (p * (1 - p) / total)))
    return out[0], out[1]


def _rows(cand_k, cand_n, champ_k, champ_n):
    k = np.concatenate([np.asarray(cand_k, float), np.asarray(champ_k, float)])
    n = np.concatenate([np.asarray(cand_n, float), np.asarray(champ_n, float)])
    arm = np.concatenate([np.ones(len(cand_n)), np.zeros(len(champ_n))])
    used = n > 0
    return k[used], n[used], arm[used]


def compare(cand_k, cand_n, champ_k, champ_n, margin: float, confidence: float) -> dict:
    """candidate - champion of a rate given per conversation (``k`` events of ``n``): ``difference`` of the totals
    with each arm's design effect. Without replies on an arm there is nothing to judge (p = 1, no interval)."""
    k1, n1, k2, n2 = (int(np.sum(x)) for x in (cand_k, cand_n, champ_k, champ_n))
    if n1 == 0 or n2 == 0:
        return {"diff": None, "low": None, "high": None, "p_value": 1.0, "design_effect": [1.0, 1.0]}
    return difference(k1, n1, k2, n2, margin, confidence, design_effects(cand_k, cand_n, champ_k, champ_n))


def difference(k1: int, n1: int, k2: int, n2: int, margin: float, confidence: float,
               design_effect: tuple[float, float] = (1.0, 1.0)) -> dict:
    """p1 - p2 of k1/n1 and k2/n2 (n1, n2 > 0), Newcombe's hybrid score interval at ``confidence`` and the one-sided
    score test's p-value of "p1 - p2 <= margin", both on the counts divided by each arm's design effect."""
    d1, d2 = design_effect
    e1, m1, e2, m2 = k1 / d1, n1 / d1, k2 / d2, n2 / d2
    with warnings.catch_warnings():  # both rates 0 or 1: the test statistic is 0/0 (nan), read as no evidence below
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = confint_proportions_2indep(e1, m1, e2, m2, method="newcomb", compare="diff",
                                               alpha=1 - confidence)
        p = test_proportions_2indep(e1, m1, e2, m2, value=margin, method="score", compare="diff",
                                    alternative="larger").pvalue
    return {"diff": k1 / n1 - k2 / n2, "low": float(low), "high": float(high),
            "p_value": 1.0 if np.isnan(p) else float(p),
            "design_effect": [round(float(d1), 4), round(float(d2), 4)]}


def holm(p_values: list[float], confidence: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction of one family of one-sided tests, each at the level of the lower bound of a
    two-sided ``confidence`` interval ((1 - confidence) / 2): (rejected, adjusted p-values). Without the correction
    three checks would roll back an identical candidate three times as often as one."""
    rejected, adjusted, _, _ = multipletests(p_values, alpha=(1 - confidence) / 2, method="holm")
    return [bool(r) for r in rejected], [float(p) for p in adjusted]
