"""The one-run audit's statistic, guesses and canaries (flower_app/audit.py), without Flower."""

import math

import networkx as nx
import numpy as np
import pytest
from scipy import special

from flower_app.audit import (
    audit_scores,
    eps_lower_bound,
    guess,
    guess_rules,
    joint_confidence,
    make_canaries,
    p_value,
)
from flower_app.config import RunConfig
from flower_app.node import plan
from flower_app.privacy import steps_per_epoch
from flower_app.shards import canary_set, shard_for
from server_app.audit import headline_bound, observer_assignments


def direct_p_value(m, r, v, eps, delta):
    """Theorem 3.1 term by term with exact binomial coefficients."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (100, 20, 15, 1.0, 0.0),
        (1000, 50, 45, 2.0, 1e-5),
        (200, 60, 60, 3.0, 1e-3),
        (50, 10, 0, 1.0, 0.1),
    ],
)
def test_p_value_equals_the_theorem_computed_term_by_term(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(
        direct_p_value(m, r, v, eps, delta), rel=1e-9
    )


def test_all_r_guesses_right_without_delta_gives_the_closed_form_bound():
    # P[W' >= r] = q^r: the bound solves q^r = 0.05, i.e. ε = logit(0.05^(1/r)).
    for r in (10, 100, 1000):
        closed = float(special.logit(0.05 ** (1 / r)))
        assert eps_lower_bound(10 * r, r, r, 0.0) == pytest.approx(closed, abs=1e-6)
    # By hand: 0.05^(1/100) = 0.970487, ln(0.970487 / 0.029513) = 3.4930.
    assert eps_lower_bound(1000, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-3)


def test_chance_guessing_and_no_guesses_bound_nothing():
    assert eps_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert eps_lower_bound(1000, 100, 58, 0.0) == 0.0  # not significant at 95%
    assert eps_lower_bound(1000, 0, 0, 0.0) == 0.0


def test_the_bound_grows_with_correct_guesses_and_delta_only_lowers_it():
    bounds = [eps_lower_bound(1000, 100, v, 0.0) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    for v in (70, 90, 100):
        assert eps_lower_bound(1000, 100, v, 1e-4) <= eps_lower_bound(1000, 100, v, 0.0)
    # The level the bound was found at: p(ε_lower) ~ 0.05 and p is increasing in ε.
    e = eps_lower_bound(1000, 100, 90, 1e-5)
    assert p_value(1000, 100, 90, e, 1e-5) == pytest.approx(0.05, abs=1e-6)
    assert p_value(1000, 100, 90, e * 0.9, 1e-5) < 0.05 < p_value(1000, 100, 90, e * 1.1, 1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_guess_counts_top_in_and_bottom_out():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    assert guess(scores, included, 2, 0) == (2, 1)  # 0.9 (in, right), 0.8 (out, wrong)
    assert guess(scores, included, 1, 2) == (3, 3)  # 0.9 in; 0.1 and 0.2 out
    with pytest.raises(ValueError):
        guess(scores, included, 3, 3)
    assert all(kp + km <= 40 for kp, km in guess_rules(40)) and len(set(guess_rules(40))) == len(
        guess_rules(40)
    )


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_an_eps_dp_randomised_response_is_never_caught_above_its_eps(eps):
    # Each canary's score is its coin flip, kept with probability e^ε/(1+e^ε): exactly ε-DP.
    rng = np.random.default_rng(int(eps * 10))
    m = 20000
    included = rng.random(m) < 0.5
    keep = rng.random(m) < special.expit(eps)
    scores = np.where(keep, included, ~included) + rng.random(m) * 1e-3  # ties broken at random
    result = audit_scores(scores, included, delta=0.0)
    assert 0.5 * eps < result["eps_lower"] <= eps


def test_perfectly_separated_scores_give_a_clear_bound():
    included = np.arange(400) % 2 == 0
    result = audit_scores(included.astype(float) + np.linspace(0, 0.1, 400), included, 1e-5)
    assert result["eps_lower"] > 2 and result["correct"] == result["guesses"]


def test_the_headline_bound_holds_for_all_observers_together_when_nothing_leaks():
    """12 observers, no leak at all: the headline must exceed 0 in at most ~5% of audits.

    The max of the per-observer 95% bounds does far more often; the Bonferroni-corrected
    bounds (`joint_confidence`) keep the family-wise level.
    """
    rng = np.random.default_rng(5)
    audits, observers, m = 50, 12, 100
    level = joint_confidence(observers)
    plain = joint = 0
    for _ in range(audits):
        included = rng.random(m) < 0.5
        per_obs = [rng.random(m) for _ in range(observers)]  # scores unrelated to the coins
        plain += max(audit_scores(x, included, 1e-5)["eps_lower"] for x in per_obs) > 0
        joint += max(audit_scores(x, included, 1e-5, level)["eps_lower"] for x in per_obs) > 0
    print(f"no-leak audits with a bound > 0: max of 95% bounds {plain}, joint {joint} of {audits}")  # noqa: T201
    assert joint <= 0.05 * audits + 2 * (audits * 0.05 * 0.95) ** 0.5
    assert plain > joint
    assert (
        headline_bound({"observers": [{"eps_lower_joint": 0.3}, {"eps_lower_joint": 0.1}]}) == 0.3
    )
    assert level == pytest.approx(1 - 0.05 / 12)


def test_canaries_come_from_the_audit_seed_alone():
    a = make_canaries(20, 50, audit_seed=3)
    assert a.images.shape == (1000, 28, 28) and a.images.dtype == np.uint8
    assert len({img.tobytes() for img in a.images}) == 1000
    assert 0.05 < (a.images > 0).mean() < 0.15 and set(np.unique(a.label)) == set(range(10))
    assert list(np.bincount(a.owner)) == [50] * 20
    assert 0.4 < a.included.mean() < 0.6
    b = make_canaries(20, 50, audit_seed=3)
    c = make_canaries(20, 50, audit_seed=4)
    assert np.array_equal(a.included, b.included) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.included, c.included)


def test_a_node_trains_on_exactly_its_included_canaries_and_plans_for_them():
    base = {"samples-per-node": 200, "seed": 7}
    plain = RunConfig.from_run_config(base | {"eps": 2.0})
    audited = RunConfig.from_run_config(base | {"eps": 2.0, "audit-canaries": 30, "audit-seed": 5})
    canaries, images = canary_set(audited, 4)
    for pid in range(4):
        without, with_ = shard_for(plain, pid, 4), shard_for(audited, pid, 4)
        mine = canaries.of(pid)
        assert len(with_) == len(without) + len(mine)
        x, y = with_.tensors
        ix, iy = images.tensors
        assert np.array_equal(x[len(without) :].numpy(), ix[mine].numpy())
        assert np.array_equal(y[len(without) :].numpy(), iy[mine].numpy())
        assert np.array_equal(x[: len(without)].numpy(), without.tensors[0].numpy())
        # No other canary, in or out, of any node is in this node's data.
        others = np.setdiff1d(np.arange(len(canaries.owner)), mine)
        flat = {row.tobytes() for row in x.reshape(len(x), -1).numpy()}
        assert not any(ix[j].reshape(-1).numpy().tobytes() in flat for j in others)
        # The plan counts the canaries: serve_train plans on this shard, n + included.
        expected = 1 / steps_per_epoch(len(with_), 64)
        assert plan(audited, len(with_)).sample_rate == pytest.approx(expected)


def test_each_gossip_observer_sits_exactly_d_hops_from_the_canarys_owner():
    graph = nx.cycle_graph(10)
    owners = np.repeat(np.arange(10), 5)
    views = observer_assignments(owners, graph, audit_seed=1)
    names = [v[0] for v in views]
    assert names == ["owner", *[f"distance-{d}" for d in range(1, 6)], "average"]
    for _, d, scorer in views[1:-1]:
        hops = [
            nx.shortest_path_length(graph, int(o), int(s))
            for o, s in zip(owners, scorer, strict=True)
        ]
        assert hops == [d] * len(owners)
    assert observer_assignments(owners, graph, 1)[2][2].tolist() == views[2][2].tolist()
    fedavg = observer_assignments(owners, None, 1)
    assert [v[0] for v in fedavg] == ["owner", "global"] and fedavg[1][1] is None
