"""
experiments/stats.py -- the paired tests and intervals behind the verdicts of experiments/tables.py

A verdict compares two rows, a and b, measured on the SAME images: per image, a's value minus b's,
d_i (accuracy: 0/1 correctness averaged over the row's position draws; saliency: the mean saliency
the tokens read). The question "is a > b?" is answered by a paired test of "the d_i are symmetric
about 0" at 5 % (two-sided):

    holds     the test rejects and mean(d) > 0
    reversed  the test rejects and mean(d) < 0
    tie       otherwise

Which test, by what the rows hold:

  * both rows right/wrong with one draw (d_i in {-1, 0, 1}): McNemar's exact test. Only the
    discordant images count: b_ = #(a right, b wrong), c_ = #(a wrong, b right); under the null
    each discordant image is a fair coin, so b_ ~ Binomial(b_ + c_, 1/2) and
    p = min(1, 2 P(Binomial <= min(b_, c_))), summed exactly in integers (mcnemar_p).
  * right/wrong averaged over several draws (d_i on a lattice: multiples of 1/lcm(draws)): the
    paired sign-flip permutation test, EXACT over all 2^m sign flips of the m nonzero d_i. The
    flips of the images with |d_i| = j (lattice units) add up to j (2 B_j - m_j), B_j ~
    Binomial(m_j, 1/2), so the null distribution of sum(d) is a convolution of a few binomials
    (lattice_sign_flip_p). With one draw it IS McNemar's test (a test checks they agree).
  * continuous reads (saliency): the sign-flip test on 10,000 random flips with a fixed seed,
    p = (1 + #{|flipped sum| >= |observed sum|}) / (1 + flips), or all 2^m flips when m <= 13
    (random_sign_flip_p).

"Rejects" means p <= 0.05. The interval beside each verdict is the paired percentile bootstrap of
mean(d) over images with 10,000 resamples (bootstrap_interval). Interval and test are different
procedures, so at the edge of zero they can disagree (the interval excludes 0 and p > 0.05, or
the reverse). The rule: the VERDICT IS THE TEST'S, and a cell whose 95 % interval says otherwise
is flagged with FLAG after its verdict (Paired.text, e.g. "+100.0 [+100.0, +100.0] tie‡": 5 of 5
images, McNemar p = 0.0625), never silently widened or narrowed. tests/test_results.py checks
that every committed cell's interval agrees with its test, so no committed cell is flagged.

A table of verdicts is a family of tests: holm() gives Holm's step-down correction (at 5 %), which
tables.py prints under each verdict table.

Everything here is numpy / torch / math: no scipy.
"""

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import torch

ALPHA = 0.05                    # the tests' level (two-sided); the intervals are 1 - ALPHA = 95 %
RESAMPLES = 10_000              # bootstrap resamples of every interval
FLIPS = 10_000                  # random sign flips of a continuous read's test
EXACT_FLIPS_UP_TO = 13          # m <= 13 nonzero differences: all 2^m flips (8,192 <= FLIPS)
FLAG = "‡"                      # marks a verdict whose 95 % interval disagrees with its test


def top1(correct):
    """(n,) bool right/wrong (a torch tensor) -> top-1 accuracy in percent."""
    return 100 * correct.float().mean().item()


def per_image_mean(values):
    """(draws, n) or (n,) -> (float64 (n,): each image's mean over the draws, draws)."""
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    return x.mean(0), x.shape[0]


def mcnemar_p(b, c):
    """McNemar's exact two-sided p of b discordant images one way and c the other:
    min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2), summed exactly in integers."""
    m, k = b + c, min(b, c)
    if m == 0:
        return 1.0
    term, tail = 1, 1                         # C(m, 0); then C(m, i) from C(m, i - 1)
    for i in range(k):
        term = term * (m - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2 ** m)        # Python's int / int is exact, then rounded once


def binomial_pmf(m):
    """Binomial(m, 1/2)'s probabilities of 0..m, from log C(m, k) - m log 2 (no overflow)."""
    k = torch.arange(m + 1, dtype=torch.float64)
    log_comb = torch.lgamma(k.new_tensor(m + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(m - k + 1)
    return torch.exp(log_comb - m * math.log(2)).numpy()


def lattice_sign_flip_p(units):
    """The exact paired sign-flip test of integer differences (d_i in lattice units): the
    probability, over all 2^m equally likely sign flips, of |sum| >= |observed sum|.

    With m_j images at |d| = j, the flipped sum is sum_j j (2 B_j - m_j), B_j ~ Binomial(m_j, 1/2),
    i.e. 2 S - M with S = sum_j j B_j and M = sum_j j m_j: S's distribution is the convolution
    of each binomial spread onto multiples of j."""
    units = np.asarray(units, dtype=np.int64)
    magnitudes, counts = np.unique(np.abs(units[units != 0]), return_counts=True)
    distribution = np.ones(1)                                       # S = 0 with certainty
    for j, m_j in zip(magnitudes.tolist(), counts.tolist()):
        spread = np.zeros(j * m_j + 1)
        spread[::j] = binomial_pmf(m_j)
        distribution = np.convolve(distribution, spread)
    total = int((magnitudes * counts).sum())
    s = np.arange(len(distribution))
    observed = abs(int(units.sum()))
    return float(min(1.0, distribution[np.abs(2 * s - total) >= observed].sum()))


def random_sign_flip_p(d, flips=FLIPS, seed=0):
    """The paired sign-flip test of continuous differences d: the share of sign flips whose
    |sum| reaches the observed |sum|; all 2^m flips of the m nonzero d_i when m <= 13, else
    `flips` random ones (seed fixed) counted with the observed one: (1 + hits) / (1 + flips)."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    observed = abs(d.sum()) - 1e-9 * np.abs(d).sum()     # a float sum need not repeat bit-exactly
    if len(d) <= EXACT_FLIPS_UP_TO:
        bits = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1
        return float(np.mean(np.abs((1 - 2 * bits) @ d) >= observed))
    generator, hits = torch.Generator().manual_seed(seed), 0
    for start in range(0, flips, 1000):                            # 1,000 flips at a time
        rows = min(1000, flips - start)
        signs = torch.randint(0, 2, (rows, len(d)), generator=generator).double() * 2 - 1
        hits += int((np.abs(signs.numpy() @ d) >= observed).sum())
    return (1 + hits) / (1 + flips)


def bootstrap_interval(d, resamples=RESAMPLES, seed=0, level=1 - ALPHA):
    """The percentile bootstrap of mean(d): resample the n images with replacement `resamples`
    times, take the central `level` of the resampled means -> (low, high).

    When d takes a few distinct values (accuracy differences: at most 2 q + 1 of them), a resample
    only needs how often it drew each value: multinomial counts over the distinct values, the
    same distribution as drawing images and far cheaper at n = 10,000. Otherwise (saliency reads)
    the images themselves are drawn, 1,000 resamples at a time."""
    d = np.asarray(d, dtype=np.float64)
    rng, n = np.random.default_rng(seed), len(d)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= 64:
        means = rng.multinomial(n, counts / n, size=resamples) @ values / n
    else:
        means = np.concatenate([d[rng.integers(0, n, (min(1000, resamples - start), n))].mean(1)
                                for start in range(0, resamples, 1000)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def verdict_of(p, mean, alpha=ALPHA):
    return "tie" if p > alpha or mean == 0 else "holds" if mean > 0 else "reversed"


def interval_verdict(low, high):
    """What a 95 % interval alone says about "a > b": above 0, below 0, or holding it."""
    return "holds" if low > 0 else "reversed" if high < 0 else "tie"


@dataclass
class Paired:
    """a - b on the same images: mean and 95 % bootstrap interval (in the rows' unit), the test's
    name and two-sided p, and the verdict (the test's)."""
    mean: float
    low: float
    high: float
    p: float
    test: str
    n: int

    @property
    def verdict(self):
        return verdict_of(self.p, self.mean)

    @property
    def agrees(self):
        """Whether the 95 % interval alone gives the test's verdict."""
        return interval_verdict(self.low, self.high) == self.verdict

    def scaled(self, factor):
        return Paired(factor * self.mean, factor * self.low, factor * self.high, self.p,
                      self.test, self.n)

    def text(self, digits=1):
        """'+1.7 [-0.4, +3.8] tie'; FLAG after the verdict where the interval disagrees."""
        mean, low, high = (signed(x, digits) for x in (self.mean, self.low, self.high))
        return f"{mean} [{low}, {high}] {self.verdict}" + ("" if self.agrees else FLAG)


def number(x, digits=1):
    """signed() without the sign: '28.7' for 28.65 (stored as 28.649999999999999)."""
    return signed(x, digits).lstrip("+")


def signed(x, digits):
    """'+3.6' for 3.55: x with its sign, rounded half away from zero as a reader rounds, once the
    float's binary noise is dropped at 1e-9 (a mean of 0/1 values is often exactly halfway: 3.55
    is stored as 3.5499999999999998, which Python's own formatting prints as 3.5)."""
    exact = Decimal(repr(round(x, 9)))
    return f"{exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP):+}"


def paired(a, b, seed=0):
    """Two rows' per-image values on the same n images ((draws, n) or (n,); bool = right/wrong,
    float = a continuous read) -> Paired(a - b), by the test their kind calls for."""
    (x, draws_x), (y, draws_y) = per_image_mean(a), per_image_mean(b)
    if len(x) != len(y):
        raise ValueError(f"paired rows need the same images: {len(x)} and {len(y)} values")
    d = x - y
    right_wrong = np.asarray(a).dtype == bool and np.asarray(b).dtype == bool
    if right_wrong and draws_x == draws_y == 1:
        p, test = mcnemar_p(int((d > 0).sum()), int((d < 0).sum())), "McNemar exact"
    elif right_wrong:
        q = math.lcm(draws_x, draws_y)                  # d is a multiple of 1 / q
        p, test = lattice_sign_flip_p(np.rint(d * q)), "sign-flip exact"
    else:
        p, test = random_sign_flip_p(d, seed=seed), "sign-flip random"
    low, high = bootstrap_interval(d, seed=seed)
    return Paired(float(d.mean()), low, high, p, test, len(d))


def holm(p_values, alpha=ALPHA):
    """Holm's step-down adjusted p-values of one family (same order as given): sort ascending,
    multiply the i-th smallest (0-based) by (m - i), carry the running maximum, cap at 1. A
    hypothesis is rejected under Holm at `alpha` exactly when its adjusted p <= alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()
