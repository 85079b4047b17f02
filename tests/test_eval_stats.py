"""The evaluation's statistics against hand computations: bootstrap intervals (and their coverage
on known distributions), MT-Bench's both-order tie rule, the win rate, and the length-controlled
win rate on a toy where length alone drives the preference."""

import numpy as np
import pytest

from vpref.eval import stats


def test_mean_and_ratio_point_values_are_the_hand_computed_ones():
    e = stats.mean([4, 2, np.nan, 3])  # NaN: an item without a value (a failed rating) is left out
    assert e.value == pytest.approx(3.0) and e.n == 3
    assert e.lo <= 3.0 <= e.hi
    # accuracy = yes / (yes + no); the third item said neither and is excluded from both counts
    yes, decided = [1, 0, 0, 1, 1], [1, 1, 0, 1, 1]
    r = stats.ratio(yes, decided)
    assert r.value == pytest.approx(3 / 4) and r.n == 4
    assert stats.mean([np.nan]).value is None and stats.ratio([0], [0]).value is None


def test_resampling_the_same_items_jointly():
    counts = stats.resample_counts(50, 200, seed=3)
    assert counts.shape == (200, 50) and (counts.sum(1) == 50).all()
    x = np.arange(50.0)
    # two statistics of the same items, resampled with one matrix, move together
    a, b = stats.weighted_means(x, counts), stats.weighted_means(2 * x + 1, counts)
    assert np.allclose(b, 2 * a + 1)


@pytest.mark.parametrize("draw,truth", [
    (lambda rng, n: rng.normal(2.0, 1.0, n), 2.0),
    (lambda rng, n: (rng.random(n) < 0.3).astype(float), 0.3),  # an accuracy near the demo's
])
def test_bootstrap_95_interval_covers_the_true_mean_about_95_percent_of_the_time(draw, truth):
    rng = np.random.default_rng(0)
    trials, hits = 300, 0
    for t in range(trials):
        e = stats.mean(draw(rng, 120), reps=400, seed=t)
        hits += e.lo <= truth <= e.hi
    assert 0.90 <= hits / trials <= 0.985, hits / trials


def test_mean_of_means_is_the_papers_headline():
    a = np.array([3.0, 4.0, 5.0])  # two dimensions over the same items...
    b = np.array([1.0, 1.0, 4.0])
    c = np.array([2.0, 2.0])  # ...and one over another set
    ca, cc = stats.resample_counts(3, 300, 0), stats.resample_counts(2, 300, 1)
    e = stats.mean_of_means([(a, ca), (b, ca), (c, cc)])
    assert e.value == pytest.approx((4.0 + 2.0 + 2.0) / 3)
    assert e.lo <= e.value <= e.hi


def test_mt_bench_rule_both_orders():
    # first: the model's answer shown as A; second: shown as B
    assert stats.combine_orders("A", "B") == "win"  # preferred in both positions
    assert stats.combine_orders("B", "A") == "loss"
    assert stats.combine_orders("A", "A") == "tie"  # position bias: always A -> disagreement -> tie
    assert stats.combine_orders("B", "B") == "tie"
    assert stats.combine_orders("tie", "B") == "tie"  # the first a tie -> tie
    assert stats.combine_orders("A", "tie") == "tie"  # a win and a tie disagree -> tie
    assert stats.combine_orders("tie", "tie") == "tie"
    assert stats.combine_orders(None, "B") is None and stats.combine_orders("A", None) is None  # dropped
    e = stats.win_rate(["win", "win", "loss", "tie", "tie"])
    assert e.value == pytest.approx((2 + 0.5 * 2) / 5) and e.n == 5


def test_length_controlled_win_rate_removes_a_preference_driven_by_length_alone():
    rng = np.random.default_rng(1)
    n = 600
    dlen = rng.normal(60, 80, n)  # the model is usually longer than the baseline
    p = 1 / (1 + np.exp(-3 * np.tanh(dlen / dlen.std(ddof=1))))  # ...and length is all the judge sees
    y = (rng.random(n) < p).astype(float)
    groups = [("colour", "count", "describe")[i % 3] for i in range(n)]
    out = stats.length_controlled(y, dlen, groups, reps=300)
    raw = y.mean()
    assert raw > 0.68
    assert abs(out["value"].value - 0.5) < 0.06  # at equal length neither answer is preferred
    assert out["value"].lo < 0.5 < out["value"].hi
    assert out["weights"]["length"] > 2.0 and all(abs(v) < 0.3 for k, v in out["weights"].items() if "group" in k)
    assert stats.extreme_change(raw, out["value"].value)  # AlpacaEval would warn about this move


def test_length_controlled_keeps_a_preference_that_length_does_not_explain():
    rng = np.random.default_rng(2)
    n = 400
    dlen = rng.normal(0, 50, n)  # lengths unrelated to the verdicts
    y = (rng.random(n) < 0.75).astype(float)
    out = stats.length_controlled(y, dlen, reps=200)
    assert abs(out["value"].value - y.mean()) < 0.02
    assert not stats.extreme_change(y.mean(), out["value"].value)


def test_l1_fit_matches_a_direct_search_of_the_objective():
    rng = np.random.default_rng(4)
    X = np.column_stack([np.ones(200), rng.normal(size=200), rng.random(200) < 0.5])
    y = rng.random(200)  # soft labels
    lam = 0.02
    beta = stats.fit_logistic_l1(X, y, np.ones((1, 200)), lam)[0]

    def objective(b):
        z = X @ b
        return (np.logaddexp(0, z) - y * z).mean() + lam * np.abs(b[1:]).sum()

    f = objective(beta)
    for _ in range(500):  # no nearby point is better
        assert objective(beta + rng.normal(0, 0.01, 3)) >= f - 1e-9


def test_format():
    assert stats.fmt({"value": 3.456, "ci95": [3.1, 3.8], "n": 9}) == "3.46 [3.10, 3.80]"
    assert stats.fmt({"value": 0.5, "ci95": [0.4, 0.6]}, 1, 100) == "50.0 [40.0, 60.0]"
    assert stats.fmt(None) == "-" and stats.fmt({"value": None}) == "-"
