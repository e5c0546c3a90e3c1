"""One-run privacy audits (Steinke, Nasr & Jagielski, NeurIPS 2023): canaries and the bound.

The auditor draws m canaries and includes each in its owner's training data independently with
probability ½, keeping the coin flips. After the run it scores every canary from an observer's
view, guesses "in" for the k₊ highest scores and "out" for the k₋ lowest, and counts correct
guesses. If training is (ε, δ)-DP, the number W of correct guesses among r satisfies, for
every v (their Theorem 3.1, with W' ~ Binomial(r, e^ε / (1 + e^ε))),

    P[W ≥ v] ≤ P[W' ≥ v] + 2mδ · max_{i = 1..v} P[v > W' ≥ v − i] / i.

The largest ε that this still rejects at the chosen confidence is an empirical lower bound on
the run's ε. Everything here is a pure function of its arguments; the canaries' randomness
comes from `audit-seed` alone (the auditor's, never the DP noise's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

CONFIDENCE = 0.95
# Guessing rules tried on every observer: k₊ = k₋ = f·m and k₊ = f·m, k₋ = 0. Each is tested
# at (1 - CONFIDENCE) / (number of rules) so the reported best holds at CONFIDENCE overall
# (union bound): choosing the best rule after seeing the scores costs nothing unaccounted.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)
_STREAM = 0xA0D1  # separates the audit's generator from every other use of its seed
CANARY_INK = 0.1  # share of a canary's pixels that are on


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (ε, δ)-DP with m canaries (Theorem 3.1)."""
    if not (0 <= v <= r <= m and eps >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, delta in [0, 1]: {m, r, v, eps, delta}")
    q = float(special.expit(eps))  # e^ε / (1 + e^ε): the accuracy of ε-randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[W' >= v]
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    # P[v > W' >= v - i] for i = 1..v: a running sum of the pmf at v-1, v-2, ...
    between = np.cumsum(stats.binom.pmf(v - i, r, q))
    alpha = float(np.max(between / i))
    return min(1.0, beta + 2 * m * delta * alpha)


def eps_lower_bound(m: int, r: int, v: int, delta: float, level: float = 1 - CONFIDENCE) -> float:
    """Largest ε the observed v of r correct guesses rejects at significance `level` (or 0)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    hi = 1.0
    while p_value(m, r, v, hi, delta) < level:
        hi *= 2
        if hi > 1e3:  # v = r = m huge: the bound exceeds anything a run could claim
            return math.inf
    return float(optimize.brentq(lambda e: p_value(m, r, v, e, delta) - level, 0.0, hi, xtol=1e-9))


def joint_confidence(observers: int, confidence: float = CONFIDENCE) -> float:
    """Each observer's confidence so that `observers` bounds hold together at `confidence`.

    Bonferroni's inequality: P[any of k bounds wrong] <= sum of the k error levels, so each is
    tested at (1 - confidence) / k and their maximum is a lower bound at `confidence`.
    """
    return 1 - (1 - confidence) / max(observers, 1)


def guess(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): "in" for the k₊ highest scores, "out" for the k₋ lowest; how many are right."""
    if k_plus + k_minus > len(scores):
        raise ValueError(f"k+ + k- = {k_plus + k_minus} guesses for {len(scores)} canaries")
    # A stable sort on (score, index) keeps ties reproducible.
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    included = np.asarray(included, dtype=bool)
    right = int(included[order[len(order) - k_plus :]].sum()) if k_plus else 0
    right += int((~included[order[:k_minus]]).sum())
    return k_plus + k_minus, right


def guess_rules(m: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) pairs tried for m canaries, without repeats."""
    rules: list[tuple[int, int]] = []
    for f in GUESS_FRACTIONS:
        k = max(1, int(f * m))
        for rule in ((k, k), (k, 0)):
            if sum(rule) <= m and rule not in rules:
                rules.append(rule)
    return rules


def audit_scores(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The best guessing rule's r, v and ε lower bound, valid at `confidence` over all rules."""
    m = len(scores)
    rules = guess_rules(m)
    level = (1 - confidence) / len(rules)
    best: dict[str, Any] = {"guesses": 0, "correct": 0, "eps_lower": 0.0, "k_plus": 0, "k_minus": 0}
    for k_plus, k_minus in rules:
        r, v = guess(scores, included, k_plus, k_minus)
        eps = eps_lower_bound(m, r, v, delta, level)
        if eps > best["eps_lower"]:
            best = {
                "guesses": r,
                "correct": v,
                "eps_lower": eps,
                "k_plus": k_plus,
                "k_minus": k_minus,
            }
    return best | {"canaries": m, "included": int(np.sum(included)), "rules": len(rules)}


@dataclass(frozen=True)
class Canaries:
    """The audit's canaries: an image and a label each, an owner and the auditor's coin."""

    images: np.ndarray  # uint8 (m, 28, 28)
    label: np.ndarray  # a random class
    owner: np.ndarray  # partition id of the node that holds it if included
    included: np.ndarray  # the auditor's coin flips (True: in the owner's training data)

    def of(self, partition_id: int) -> np.ndarray:
        """Positions of the canaries `partition_id` trains on (its included ones)."""
        return np.flatnonzero((self.owner == partition_id) & self.included)


def make_canaries(
    num_partitions: int, per_node: int, audit_seed: int, num_classes: int = 10
) -> Canaries:
    """`per_node` canaries per partition, each in with probability ½, from `audit_seed` only.

    A canary is an image of random sparse pixels (each on with probability CANARY_INK) with a
    random label: an outlier that nothing else in the data resembles, so whether a model
    trained on it shows in its loss. Real images with a wrong label were tried first and were
    too weak to find leakage even without DP (docs/privacy-audit.md). DP must protect every
    example, outliers included, so an outlier canary asks the mechanism its hardest question.
    """
    rng = np.random.default_rng([audit_seed, _STREAM])
    total = per_node * num_partitions
    images = ((rng.random((total, 28, 28)) < CANARY_INK) * 255).astype(np.uint8)
    label = rng.integers(0, num_classes, size=total).astype(np.int64)
    owner = np.repeat(np.arange(num_partitions), per_node)
    included = rng.random(total) < 0.5
    return Canaries(images, label, owner, included)
