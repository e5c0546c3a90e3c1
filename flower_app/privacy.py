"""Privacy accounting: (ε, δ) maths over Opacus accountants, and the per-node ledger.

Privacy unit: with dp-mode=sample, one training sample of one node (sample-level DP, as
Opacus DP-SGD gives); with dp-mode=update, a node's whole dataset (client-level DP: the
round's model update is clipped and noised once). Trust model: each node trusts only itself;
the server and other nodes see only models that already carry DP noise. The ε a node reports
is cumulative over the rounds it took part in, never per round.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.gdp import delta_eps_mu, eps_from_mu
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from flower_app import disk_cache

if TYPE_CHECKING:  # rng imports config, which imports this module
    from flower_app.rng import KeyedStream

PRIVACY_UNIT = "sample-level (ε, δ)-DP per node: the unit is one training example of one node"
# The unit each dp-mode protects (run-config `dp-mode`).
PRIVACY_UNITS = {
    "sample": PRIVACY_UNIT,
    "update": (
        "client-level (node-level) (ε, δ)-DP: the unit is a node's whole dataset (its "
        "clipped round update present vs absent, sensitivity C); against the server, which "
        "sees each node's own release, replacing the dataset (sensitivity 2C) is the "
        "relation that counts, reported as eps_replace"
    ),
}
TRUST_MODEL = (
    "each node trusts only itself; the server and the other nodes see only models that "
    "already carry DP noise"
)
# Binary-search tolerance of the calibration: final ε lands in [target - tol, target].
EPS_TOLERANCE = 0.01
# Opacus's default RDP orders stop at 63, which is loose for few steps or large ε; more
# orders only tighten the bound (every order gives a valid ε).
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 512, 1024]
# The noise search uses integer orders only: each fractional order costs Opacus a slow
# series (calibration took 3.7 s per node and run here). The reported ε uses all orders, so
# it can only come out lower than the ε the search guaranteed.
SEARCH_ORDERS = [float(a) for a in range(2, 64)] + [80, 96, 128, 192, 256, 512, 1024]


# The largest σ the noise search accepts: Opacus doubles σ from 10 and gives up past
# MAX_SIGMA, so a target this σ cannot meet is one no noise can meet here.
CALIBRATION_MAX_SIGMA = 10.0 * 2 ** int(math.log2(MAX_SIGMA / 10))


class CalibrationError(ValueError):
    """No noise multiplier meets the target ε: one line naming ε, δ and what it would take."""


def _orders(accountant: str) -> dict[str, list[float]]:
    return {"alphas": SEARCH_ORDERS} if accountant == "rdp" else {}


def _search_eps(sigma: float, sample_rate: float, steps: int, delta: float, acc: str) -> float:
    """ε exactly as the noise search computes it (its accountant and orders)."""
    accountant = create_accountant(mechanism=acc)
    accountant.history = [(sigma, sample_rate, steps)]
    # At σ this large the best order is the largest, and PRV takes log(1 - q) at q = 1:
    # expected, and what the search itself sees.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta=delta, **_orders(acc)))


@lru_cache(maxsize=64)
def smallest_target_eps(delta: float, accountant: str) -> float:
    """Below this ε no run can calibrate, whatever its data: a config check before training.

    The ε of ONE full-batch release at `CALIBRATION_MAX_SIGMA` (the conversion's floor: it
    stays > 0 as σ grows). A node's own sample rate and step count move it by ~1e-9 either
    way, so 0.1% below is still never above what some node could meet.
    """
    try:
        return 0.999 * _search_eps(CALIBRATION_MAX_SIGMA, 1.0, 1, delta, accountant)
    except (ValueError, RuntimeError) as err:  # e.g. PRV at δ=1e-30: "Floating point errors"
        raise CalibrationError(
            f"delta={delta:g} is not valid with accountant={accountant!r}, which cannot "
            f"compute ε there ({err}); use a delta nearer 1e-5 or accountant='rdp'"
        ) from None


@lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one step; RDP composes additively, so `steps` steps cost steps times this."""
    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)


@dataclass(frozen=True)
class PrivacyLedger:
    """What a node has spent in one run: enough to re-audit its ε from the results alone.

    `planned_steps` is the step count the noise was calibrated for; a node never takes a
    step beyond it. `dp_mode` says which unit `noise_multiplier` is relative to: `sample`
    (Opacus DP-SGD, one example added or removed) or `update` (a node's clipped update,
    sensitivity C for add/remove; replacing the node's data moves it by up to 2C).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    planned_steps: int = 0
    dp_mode: str = "sample"

    def epsilon(self) -> float:
        """Cumulative ε after `steps` optimizer steps (add/remove of the mode's unit)."""
        return epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    @property
    def strict_noise_multiplier(self) -> float:
        """σ relative to the worst neighbouring change the server can observe.

        In update mode the server sees the node's own release, where replacing the node's
        data (or one of its examples) moves the clipped update by up to 2C: σ/2.
        """
        return self.noise_multiplier / 2 if self.dp_mode == "update" else self.noise_multiplier

    def strict_epsilon(self, steps: int | None = None) -> float:
        """ε against the server: what node policies and the lifetime ledger count."""
        return epsilon(
            noise_multiplier=self.strict_noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps if steps is None else steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    def after(self, steps: int) -> PrivacyLedger:
        """The ledger once `steps` more optimizer steps were taken."""
        return PrivacyLedger(**{**asdict(self), "steps": self.steps + steps})

    def at_plan(self) -> PrivacyLedger:
        """The ledger once every planned step is taken."""
        return PrivacyLedger(**{**asdict(self), "steps": self.planned_steps})

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict, for records and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Back from `to_dict` (a JSON object or a Flower ConfigRecord); other keys ignored."""
        return cls(
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            steps=int(data["steps"]),
            delta=float(data["delta"]),
            accountant=str(data["accountant"]),
            planned_steps=int(data["planned_steps"]),
            dp_mode=str(data["dp_mode"]),
        )


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε of the subsampled Gaussian mechanism after `steps` steps (pure, no training)."""
    if steps == 0:
        return 0.0
    if accountant == "rdp":
        curve = steps * _rdp_per_step(sample_rate, noise_multiplier)
        return float(get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)[0])
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_eps: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (within tolerance) whose ε after `steps` stays <= target.

    Takes the exact step count of the whole run, so the budget covers every round and
    local epoch, not one round. The search is a pure function of its inputs and costs
    0.2 s (rdp) to 3 s (prv), once per node per run, so its result is kept on disk; a
    stored σ is used only after the accountant confirms its ε is within the target.
    """
    if not math.isfinite(target_eps):
        return 0.0
    key = {
        "target_eps": target_eps,
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "accountant": accountant,
        "tolerance": EPS_TOLERANCE,
    }
    stored = disk_cache.load("noise-multiplier", key)
    if isinstance(stored, float) and stored > 0:
        spent = epsilon(
            noise_multiplier=stored,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )
        if spent <= target_eps:
            return stored
    sigma = _search_noise(key)
    disk_cache.store("noise-multiplier", key, sigma)
    return sigma


def _search_noise(key: dict[str, Any]) -> float:
    with warnings.catch_warnings():
        # The search probes σ whose best order lies at an end of the range: expected.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=key["target_eps"],
                target_delta=key["delta"],
                sample_rate=key["sample_rate"],
                steps=key["steps"],
                accountant=key["accountant"],
                epsilon_tolerance=EPS_TOLERANCE,
                **_orders(key["accountant"]),
            )
        except (ValueError, RuntimeError) as err:  # "The privacy budget is too low." & co
            raise _unreachable(key, err) from None
    return float(sigma)


def _unreachable(key: dict[str, Any], err: Exception) -> CalibrationError:
    """Why the search found no σ for `key`, in one line."""
    where = (
        f"at δ={key['delta']:g} over {key['steps']} steps of sample rate "
        f"{key['sample_rate']:.3g} ({key['accountant']})"
    )
    try:
        floor = _search_eps(
            CALIBRATION_MAX_SIGMA, key["sample_rate"], key["steps"], key["delta"], key["accountant"]
        )
    except (ValueError, RuntimeError):
        return CalibrationError(f"eps={key['target_eps']:g} cannot be met {where}: {err}")
    return CalibrationError(
        f"eps={key['target_eps']:g} cannot be met {where}: even the largest noise the search "
        f"tries (σ={CALIBRATION_MAX_SIGMA:g}) spends ε={floor:.4g}; use a larger eps"
    )


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch under Poisson sampling (Opacus: 1 / sample rate)."""
    return max(1, math.ceil(num_samples / batch_size))


def plan_ledger(
    *,
    num_samples: int,
    batch_size: int,
    total_epochs: int = 0,
    total_steps: int = 0,
    target_eps: float,
    delta: float,
    accountant: str,
) -> PrivacyLedger:
    """A node's empty ledger, with noise calibrated for every step of the run.

    The run takes `total_steps` Poisson steps when given (run-config `local-steps`), else
    `total_epochs` epochs of ⌈n / batch⌉ steps; the sample rate is 1/⌈n / batch⌉ either way.
    """
    per_epoch = steps_per_epoch(num_samples, batch_size)
    planned = total_steps or per_epoch * total_epochs
    if planned < 1:
        raise ValueError("plan_ledger needs total_steps or total_epochs >= 1")
    sample_rate = 1 / per_epoch
    sigma = calibrate_noise(
        target_eps=target_eps,
        delta=delta,
        sample_rate=sample_rate,
        steps=planned,
        accountant=accountant,
    )
    return PrivacyLedger(sigma, sample_rate, 0, delta, accountant, planned, "sample")


def lifetime_epsilon(ledgers: Sequence[PrivacyLedger]) -> float:
    """ε of everything a node ever trained: the RDP composition of all its runs.

    Each run counts at its strict σ (see `PrivacyLedger.strict_noise_multiplier`); the
    (ε, δ) conversion uses the smallest δ among the runs, so no run's own claim is weakened.
    """
    spent = [led for led in ledgers if led.steps > 0]
    if not spent:
        return 0.0
    if any(led.strict_noise_multiplier <= 0 for led in spent):
        return math.inf
    curve = sum(
        led.steps * _rdp_per_step(led.sample_rate, led.strict_noise_multiplier) for led in spent
    )
    delta = min(led.delta for led in spent)
    return float(get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)[0])


def gaussian_sigma(eps: float, delta: float) -> float:
    """The classic one-shot Gaussian mechanism's noise multiplier sqrt(2 ln(1.25/δ)) / ε.

    Dwork & Roth, Thm A.1 (stated for ε < 1). It covers ONE release: used every round, the
    ε composes, which `epsilon(sample_rate=1, steps=rounds)` measures.
    """
    if not math.isfinite(eps):
        return 0.0
    return math.sqrt(2 * math.log(1.25 / delta)) / eps


def plan_update_ledger(
    *, target_eps: float, delta: float, rounds: int, accounting: str, accountant: str
) -> PrivacyLedger:
    """A node's empty ledger for dp-mode=update: one full-batch Gaussian release per round.

    `composed` calibrates σ so that `rounds` releases (sample rate 1: no amplification, the
    server's sampling is not trusted) meet `target_eps`; `per-round` uses the uncomposed
    one-shot σ for `target_eps`, whose true ε after the run the ledger still reports.
    """
    if accounting == "per-round":
        sigma = gaussian_sigma(target_eps, delta)
    elif accounting == "composed":
        sigma = calibrate_noise(
            target_eps=target_eps,
            delta=delta,
            sample_rate=1.0,
            steps=rounds,
            accountant=accountant,
        )
    else:
        raise ValueError(f"accounting={accounting!r} is not valid; use composed or per-round")
    return PrivacyLedger(sigma, 1.0, 0, delta, accountant, rounds, "update")


def one_shot_true_eps(eps_label: float, delta: float) -> float:
    """The exact ε of ONE release with the one-shot formula's σ for `eps_label`.

    Dwork & Roth's σ = sqrt(2 ln(1.25/δ))/ε guarantees (ε, δ) only for ε <= 1; above that
    the release costs more than its label.
    """
    return gaussian_eps_exact(
        noise_multiplier=gaussian_sigma(eps_label, delta), steps=1, delta=delta
    )


def privatize_update(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    noise: KeyedStream,
) -> tuple[dict[str, torch.Tensor], float]:
    """`start + clip_C(end - start) + N(0, (σC)²)` per coordinate, and the update's raw norm.

    The L2 norm is taken over all floating-point tensors together (the whole model), as the
    Gaussian mechanism's sensitivity needs; other tensors (counters) come from `end` as is.
    A non-finite update (NaN or inf anywhere) is released as the zero update: `clip / norm`
    would skip the clip (NaN) or mark the overflowing coordinates (inf · 0), un-noised.
    """
    keys = [k for k, v in end.items() if torch.is_floating_point(v)]
    deltas = {k: end[k].detach().double() - start[k].detach().double() for k in keys}
    norm = float(torch.sqrt(sum(((d**2).sum() for d in deltas.values()), torch.tensor(0.0))))
    if not math.isfinite(norm):
        deltas = {k: torch.zeros_like(d) for k, d in deltas.items()}
    scale = min(1.0, clip / norm) if math.isfinite(norm) and norm > 0 else 1.0
    out = {k: v.detach().clone() for k, v in end.items()}
    for k in keys:
        drawn = noise.gaussian(noise_multiplier * clip, deltas[k])
        private = start[k].double() + deltas[k] * scale + drawn
        out[k] = private.to(end[k].dtype)
    return out, norm


def gaussian_eps_exact(*, noise_multiplier: float, steps: int, delta: float) -> float:
    """Tight ε of `steps` full-batch Gaussian releases (sample rate 1), no RDP slack.

    `steps` Gaussian mechanisms of multiplier σ compose exactly into μ-GDP with
    μ = √steps / σ (Dong et al. 2019), whose exact (ε, δ) curve (Balle & Wang 2018, Thm 8)
    Opacus inverts. The RDP ledger is an upper bound on this; the doc quotes both.
    """
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    mu = math.sqrt(steps) / noise_multiplier
    if delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    try:
        return float(eps_from_mu(mu=mu, delta=delta))
    except ValueError:  # beyond Opacus's search bracket (ε > 500): no meaningful privacy
        return math.inf


# PLD discretization of `replace_one_epsilon`: pessimistic, so the ε is an upper bound; 1e-2
# costs ~0.03 s a node and overstates ε by ~0.03 at most (1e-4: ~1.3 s, exact to 1e-4).
REPLACE_ONE_DISCRETIZATION = 1e-2


@lru_cache(maxsize=1024)
def replace_one_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps under replace-one adjacency.

    A node publishes its exact n (and q, σ, which depend on it), so an observer can tell
    add/remove neighbours apart by n alone; with n public the guarantee that holds is for
    two datasets of the same size differing in one example. Computed by Google's
    `dp_accounting` PLD accountant with `NeighboringRelation.REPLACE_ONE`, whose dominating
    pair for Poisson subsampling under substitution is that of Zhu, Dong & Wang (AISTATS
    2022, Sec. 5); the pessimistic discretization makes it an upper bound.
    """
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting  # slow to import, and only a run's summary needs it
    from dp_accounting.pld import PLDAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )
    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=REPLACE_ONE_DISCRETIZATION,
    )
    return float(accountant.compose(event).get_epsilon(delta))
