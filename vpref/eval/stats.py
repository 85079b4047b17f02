"""The statistics under every evaluation figure: bootstrap intervals, the both-order win rate and
the length-controlled win rate.

* `Estimate`: a figure with its percentile-bootstrap 95% interval and the n it rests on.
* Bootstrap by resampling items: one (B, n) matrix of multinomial counts per set of items, so
  every statistic of the same items (three Video-ChatGPT dimensions of the generic set, say) is
  resampled jointly, and a ratio (yes / (yes + no)) is recomputed per replicate, not averaged.
* `combine_orders`: MT-Bench's rule for a pair judged in both presentation orders.
* `length_controlled`: AlpacaEval 2's GLM.  AlpacaEval's item-difficulty term is estimated from
  the verdicts of hundreds of leaderboard models on each instruction; a single policy-vs-baseline
  comparison has one verdict per item and cannot identify it.  vpref stands in a fixed effect
  per item *group* -- the question family on the synthetic world, the evaluation set on a real
  benchmark -- so that a policy which is better on hard families is not credited with a length
  effect.  Fitted with a (smoothed) L1 penalty on everything but the intercept, soft labels
  (cross-entropy against y in [0, 1], which is AlpacaEval's row duplication with weights y and
  1 - y), and a fixed penalty instead of AlpacaEval's cross-validated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_json(self) -> dict:
        rnd = (lambda x: None if x is None else round(float(x), 6))
        return {"value": rnd(self.value), "ci95": [rnd(self.lo), rnd(self.hi)], "n": self.n}

    @staticmethod
    def from_json(d: dict | None) -> "Estimate":
        if not d:
            return Estimate(None, None, None, 0)
        lo, hi = d.get("ci95") or (None, None)
        return Estimate(d.get("value"), lo, hi, d.get("n", 0))


def fmt(e: dict | Estimate | None, digits: int = 2, scale: float = 1.0) -> str:
    """'3.21 [3.10, 3.32]' (a value without an interval prints alone; nothing prints '-')."""
    if isinstance(e, dict):
        e = Estimate.from_json(e)
    if e is None or e.value is None:
        return "-"
    v = f"{e.value * scale:.{digits}f}"
    if e.lo is None or e.hi is None:
        return v
    return f"{v} [{e.lo * scale:.{digits}f}, {e.hi * scale:.{digits}f}]"


def resample_counts(n: int, reps: int, seed: int) -> np.ndarray:
    """(reps, n) multinomial counts: how often each of n items is drawn in each bootstrap replicate."""
    if n == 0:
        return np.zeros((reps, 0), np.int64)
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps)


def _interval(reps: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return None, None
    a = (1 - level) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def weighted_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per replicate, the mean of the finite values (NaN marks an item without a value)."""
    ok = np.isfinite(values)
    num = counts[:, ok] @ values[ok]
    den = counts[:, ok].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def mean(values, counts: np.ndarray | None = None, reps: int = 1000, seed: int = 0) -> Estimate:
    """Mean of the finite values, with a bootstrap interval over all items (NaN ones included in
    the resampling, so the interval also carries the uncertainty of how many have a value)."""
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    if not ok.any():
        return Estimate(None, None, None, 0)
    counts = resample_counts(len(x), reps, seed) if counts is None else counts
    lo, hi = _interval(weighted_means(x, counts))
    return Estimate(float(x[ok].mean()), lo, hi, int(ok.sum()))


def ratio(num, den, counts: np.ndarray | None = None, reps: int = 1000, seed: int = 0) -> Estimate:
    """sum(num) / sum(den) over items (accuracy = yes / (yes + no): num = yes, den = yes or no)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if den.sum() == 0:
        return Estimate(None, None, None, 0)
    counts = resample_counts(len(num), reps, seed) if counts is None else counts
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (counts @ num) / (counts @ den)
    lo, hi = _interval(r)
    return Estimate(float(num.sum() / den.sum()), lo, hi, int(den.sum()))


def mean_of_means(columns: list[tuple[np.ndarray, np.ndarray]]) -> Estimate:
    """The mean of several means (Video-ChatGPT's headline).  Each entry is (values, counts) with
    the counts matrix of the items those values belong to: dimensions over the same items share
    one matrix (resampled jointly), different item sets are resampled independently."""
    points, reps = [], []
    for values, counts in columns:
        x = np.asarray(values, float)
        if not np.isfinite(x).any():
            return Estimate(None, None, None, 0)
        points.append(float(np.nanmean(x)))
        reps.append(weighted_means(x, counts))
    lo, hi = _interval(np.mean(reps, axis=0))
    return Estimate(float(np.mean(points)), lo, hi, sum(int(np.isfinite(np.asarray(v, float)).sum()) for v, _ in columns))


# --------------------------------------------------------------------------- pairwise


MODEL_AS_A = {"A": "win", "B": "loss", "tie": "tie"}
MODEL_AS_B = {"A": "loss", "B": "win", "tie": "tie"}
OUTCOME_Y = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def combine_orders(first: str | None, second: str | None) -> str | None:
    """MT-Bench's rule.  `first`: the verdict ('A', 'B' or 'tie') with the model's answer shown as A;
    `second`: with it shown as B.  Returns the model's 'win', 'loss' or 'tie'; a tie when the two
    orders disagree or the first is a tie; None (the item is dropped) when either did not parse."""
    if first is None or second is None:
        return None
    g1, g2 = MODEL_AS_A[first], MODEL_AS_B[second]
    return "tie" if g1 == "tie" or g1 != g2 else g1


def win_rate(outcomes: list[str], counts: np.ndarray | None = None, reps: int = 1000, seed: int = 0) -> Estimate:
    """(W + 0.5 T) / (W + L + T) with a bootstrap interval over items."""
    return mean([OUTCOME_Y[o] for o in outcomes], counts, reps, seed)


def _design(dlen: np.ndarray, groups: list[str] | None) -> tuple[np.ndarray, list[str]]:
    sd = dlen.std(ddof=1) if len(dlen) > 1 else 0.0
    length = np.tanh(dlen / sd) if sd > 0 else np.zeros_like(dlen)
    cols, names = [np.ones_like(dlen), length], ["intercept", "length"]
    levels = sorted(set(groups or []))
    if len(levels) > 1:
        # reference coding (the first level is absorbed by the intercept): a full-rank design,
        # so Newton's method converges in a few steps
        for g in levels[1:]:
            cols.append(np.array([1.0 if x == g else 0.0 for x in groups]))
            names.append(f"group:{g}")
    return np.stack(cols, 1), names


def fit_logistic_l1(X: np.ndarray, y: np.ndarray, weights: np.ndarray, l1: float, iters: int = 50,
                    sweeps: int = 8, tol: float = 1e-5) -> np.ndarray:
    """Soft-label logistic regression with an L1 penalty, one fit per row of `weights` (B, n) at once:
        minimise  sum_i w_i [log(1 + e^z_i) - y_i z_i] / n + l1 * sum_{j>0} |beta_j|
    Proximal Newton: each step minimises the loss's quadratic model plus the exact L1 term by
    coordinate descent (soft-thresholding), then backtracks on the true objective."""
    n, p = X.shape
    B = weights.shape[0]
    pen = np.full(p, l1)
    pen[0] = 0.0  # the intercept is not shrunk

    def objective(beta):
        z = beta @ X.T
        return (weights * (np.logaddexp(0, z) - y * z)).sum(1) / n + (pen * np.abs(beta)).sum(1)

    outer = (X[:, :, None] * X[:, None, :]).reshape(n, p * p)  # so that every fit's Hessian is one matmul
    beta = np.zeros((B, p))
    f = objective(beta)
    for _ in range(iters):
        z = beta @ X.T
        prob = 0.5 * (1 + np.tanh(z / 2))  # the logistic function without overflow
        grad = (weights * (prob - y)) @ X / n
        H = ((weights * prob * (1 - prob) / n) @ outer).reshape(B, p, p) + 1e-9 * np.eye(p)[None]
        new = beta.copy()
        for _ in range(sweeps):
            for j in range(p):
                d = new - beta
                c = grad[:, j] + (H[:, j, :] * d).sum(1) - H[:, j, j] * d[:, j]
                a = H[:, j, j] * beta[:, j] - c
                new[:, j] = np.sign(a) * np.maximum(np.abs(a) - pen[j], 0.0) / H[:, j, j]
        step = new - beta
        t = np.ones(B)
        for _ in range(30):
            cand = beta + t[:, None] * step
            fc = objective(cand)
            worse = fc > f + 1e-12
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        keep = fc <= f + 1e-12
        moved = np.abs(np.where(keep[:, None], cand - beta, 0.0)).max()
        beta = np.where(keep[:, None], cand, beta)
        f = np.where(keep, fc, f)
        if moved < tol:
            break
    return beta


def length_controlled(y, dlen, groups: list[str] | None = None, l1: float = 1e-3, reps: int = 1000,
                      seed: int = 0) -> dict:
    """AlpacaEval 2's length-controlled win rate.

    y: the model's preference per item in [0, 1] (1 win, 0.5 tie, 0 loss, or a judge's soft
    preference); dlen: model minus baseline answer length in characters; groups: the stand-in for
    the item-difficulty term (see the module doc).  Fits
        logit P(model wins) = w_0 + w_len * tanh(dlen / std(dlen)) + w_group[g_i]
    and returns the mean over items of the prediction with the length term set to 0.
    """
    y, dlen = np.asarray(y, float), np.asarray(dlen, float)
    n = len(y)
    if n == 0:
        return {"value": Estimate(None, None, None, 0), "weights": {}}
    X, names = _design(dlen, groups)
    X0 = X.copy()
    X0[:, 1] = 0.0  # the counterfactual: no length difference
    counts = resample_counts(n, reps, seed).astype(float)
    weights = np.vstack([np.ones((1, n)), counts])  # row 0: the fit on the items themselves
    beta = fit_logistic_l1(X, y, weights, l1)
    pred = 1 / (1 + np.exp(-(beta @ X0.T)))  # (1 + reps, n)
    value = float(pred[0].mean())
    lo, hi = _interval((counts * pred[1:]).sum(1) / n)
    return {"value": Estimate(value, lo, hi, n), "weights": dict(zip(names, map(float, beta[0])))}


def extreme_change(raw: float, lc: float, abs_diff: float = 0.10, rel_diff: float = 4) -> bool:
    """True when the LC rate moved far from the raw one (a sign the GLM failed; AlpacaEval warns
    on the same kind of move): more than `abs_diff` and more than a `rel_diff`-th of the room."""
    low = min(raw - raw / rel_diff, raw - abs_diff)
    high = max(raw + (1 - raw) / rel_diff, raw + abs_diff)
    return lc < low or lc > high
