"""bench/quality.py's pure parts: the verdict on the 2x target, the ratio rows and the replies shown side by side.
(The suite itself runs in tests/integration/test_bench_rehearsal.py, through bench/gpu.sh --smoke.)"""

import pytest

from bench import quality


def test_the_target_is_met_only_with_twice_the_base_score_and_a_ci_above_zero():
    met = quality.verdict(base=0.05, tuned=0.12, ci_low=0.03, ci_high=0.09)
    assert met["met"] and met["ratio"] == pytest.approx(2.4) and met["score_short"] == 0 and met["ci_short"] == 0
    assert met["text"].startswith("target (>= 2x base and CI low > 0) MET: fine-tuned 0.1200 = 2.40x base 0.0500")

    exactly = quality.verdict(base=0.05, tuned=0.10, ci_low=0.01)  # >= 2x: equal counts
    assert exactly["ratio_met"] and exactly["met"]

    short = quality.verdict(base=0.06, tuned=0.09, ci_low=0.01, ci_high=0.05)
    assert not short["met"] and short["ci_met"] and not short["ratio_met"]
    assert short["score_short"] == pytest.approx(0.03) and short["needed"] == pytest.approx(0.12)
    assert "MISSED" in short["text"] and "1.50x" in short["text"] and "0.0300 below 2x base (0.1200)" in short["text"]

    unsure = quality.verdict(base=0.05, tuned=0.15, ci_low=-0.002, ci_high=0.2)
    assert unsure["ratio_met"] and not unsure["ci_met"] and not unsure["met"]
    assert unsure["ci_short"] == pytest.approx(0.002) and "low <= 0, short by 0.0020" in unsure["text"]

    assert not quality.verdict(base=0.05, tuned=0.2, ci_low=None)["met"]  # no interval: not met


def test_a_ci_end_just_above_zero_is_above_zero_as_the_gate_reads_it_and_does_not_print_as_zero():
    v = quality.verdict(base=0.01, tuned=0.03, ci_low=1e-11, ci_high=0.02)
    assert v["met"] and "+1.0e-11" in v["text"] and "+0.0000" not in v["text"]
    assert quality.signed(0.01234) == "+0.0123" and quality.signed(0.0) == "+0.0000"


def test_a_base_that_scores_zero_gives_no_ratio():
    assert quality.ratio(0.1, 0.0) is None and quality.ratio(0.3, 0.1) == pytest.approx(3.0)
    v = quality.verdict(base=0.0, tuned=0.02, ci_low=0.01, ci_high=0.03)
    assert v["ratio"] is None and v["met"] and "n/a (base scored 0)" in v["text"]
    nothing = quality.verdict(base=0.0, tuned=0.0, ci_low=0.0, ci_high=0.0)
    assert not nothing["ratio_met"] and not nothing["met"] and "both scored 0" in nothing["text"]


def _result(weighted: float, bleu4: float, outputs: list[str]) -> dict:
    scores = {k: 0.5 for k in quality.METRICS} | {"bleu4": bleu4}
    return {"n": len(outputs), "scores": scores, "weighted_score": weighted,
            "outputs": [{"output": o} for o in outputs]}


def test_the_overall_rows_are_base_fine_tuned_and_their_ratio():
    rows = quality.overall_rows(_result(0.05, 0.0, ["a b", "c d e f"]), _result(0.15, 0.2, ["a b c", "d e f"]))
    assert [r["model"] for r in rows] == ["base", "fine-tuned (merged LoRA)", "fine-tuned / base"]
    assert rows[0]["words/answer"] == 3.0 and rows[1]["weighted"] == 0.15
    assert rows[2]["weighted"] == pytest.approx(3.0) and rows[2]["bleu1"] == pytest.approx(1.0)
    assert rows[2]["bleu4"] == "-"  # the base's 0: no ratio


def test_side_by_side_shows_one_reply_per_intent_spread_over_the_test_split():
    intents = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h", "i", "j"]
    picked = quality.pick_examples(intents, 5)
    assert len(picked) == 5 and len({intents[i] for i in picked}) == 5 and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] > 8  # spread: not the first five intents
    assert quality.pick_examples(["a", "a", "b", "b"], 3) == [0, 1, 2]  # fewer intents than wanted: filled up
    assert quality.pick_examples(["a"], 5) == [0] and quality.pick_examples([], 5) == []


def test_replies_are_cut_to_one_markdown_safe_line():
    base = [{"intent": "x", "prompt": "where\nis | my order", "reference": "r" * 300, "output": "  b  "}]
    tuned = [{"output": "t\n\nt"}]
    row = quality.side_by_side(base, tuned, k=5, width=50)[0]
    assert row["prompt"] == "where is \\| my order" and row["base"] == "b" and row["fine-tuned"] == "t t"
    assert len(row["reference"]) == 50 and row["reference"].endswith("…")


def test_the_smoke_size_is_the_smallest_and_a_budget_shrinks_the_cpu_run():
    smoke, full = quality.sizes("cpu", smoke=True, budgeted=True), quality.sizes("cpu", smoke=False, budgeted=False)
    budgeted = quality.sizes("cpu", smoke=False, budgeted=True)
    assert smoke["steps"] == 1 and smoke["examples"] > 0
    assert smoke["steps"] < budgeted["steps"] < full["steps"] and full["examples"] == 0  # 0 = the whole test split
    assert quality.sizes("cuda", smoke=False, budgeted=True)["steps"] < quality.sizes("cuda", False, False)["steps"]
