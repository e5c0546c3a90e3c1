"""audit-mode=whitebox in real nodes and a real gossip run (in process, no Flower run).

The node adds C·c_i to its release only in an audit its policy allows; the ServerApp scores
the canaries from the increments the nodes report; sealed and open relays give one audit.
"""

import json
import math

import numpy as np
import pytest

from flower_app.config import ConfigError, RunConfig
from flower_app.model import build_model
from flower_app.node import Refused, local_round, serve_train
from flower_app.policy import NodePolicy
from flower_app.results import to_json
from flower_app.whitebox_audit import draw_plan, project
from server_app.whitebox import whitebox_audit
from tests.inprocess_grid import TINY, run_gossip
from tests.test_node_policy import MemoryStore

NODES = 6
WHITEBOX = {**TINY, "dp-mode": "update", "audit-canaries": 40, "audit-mode": "whitebox"}


def _flat(state):
    return np.concatenate([v.double().numpy().ravel() for v in state.values()])


def test_whitebox_needs_update_mode_and_gossip():
    with pytest.raises(ConfigError, match="audit-mode='whitebox' needs dp-mode='update'"):
        RunConfig.from_run_config({**WHITEBOX, "dp-mode": "sample"})
    with pytest.raises(ConfigError, match="audit-mode='whitebox'"):
        RunConfig.from_run_config({**WHITEBOX, "strategy": "fedavg"})


def test_a_node_refuses_server_chosen_vectors_without_its_operators_consent():
    """Adding a vector the server picks to a node's release is an attack unless allowed."""
    cfg = RunConfig.from_run_config({**WHITEBOX, "noise-seed": -1})  # secret noise
    weights = build_model(cfg.model, seed=0).state_dict()
    kw = dict(run_id="r", partition_id=0, num_partitions=NODES, weights=weights, server_round=1)
    out = serve_train(cfg, NodePolicy(max_eps=math.inf, has_policy=True), MemoryStore(), **kw)
    assert isinstance(out, Refused)
    assert "vectors to the update this node releases" in out.reason
    assert "allow-audit=false" in out.reason
    allowed = NodePolicy(max_eps=math.inf, has_policy=True, allow_audit=True)
    assert not isinstance(serve_train(cfg, allowed, MemoryStore(), **kw), Refused)


def test_the_node_adds_exactly_c_along_its_included_canaries():
    """Same seeded noise with and without the audit: the releases differ by C·c_i only."""
    weights = build_model("mlp", seed=0).state_dict()
    kw = dict(partition_id=2, num_partitions=NODES, weights=weights, ledger=None, server_round=1)
    plain = local_round(RunConfig.from_run_config({**WHITEBOX, "audit-canaries": 0}), **kw)
    cfg = RunConfig.from_run_config(WHITEBOX)
    audited = local_round(cfg, **kw)
    assert plain.canary_increments is None and plain.num_examples == audited.num_examples
    diff = _flat(audited.state_dict) - _flat(plain.state_dict)
    plan = draw_plan(NODES, 40, diff.size, cfg.audit_seed)
    mine = plan.of(2)
    assert len(mine) > 5
    assert np.allclose(diff[plan.index[mine]], cfg.max_grad_norm * plan.sign[mine], atol=1e-5)
    assert np.count_nonzero(np.abs(diff) > 1e-5) == len(mine)
    released = project(_flat(audited.state_dict) - _flat(weights), plan)
    assert np.allclose(audited.canary_increments, released)


@pytest.fixture(scope="module")
def runs():
    """One open and one sealed run of 3 rounds on a ring of 6 (the conftest's task identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess_grid import RUN_ID

    raw = {**WHITEBOX, "num-server-rounds": 3}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", 1)):
            mp.setattr(TaskIdentity, name, value)
        return {r: run_gossip({**raw, "gossip-relay": r}, NODES) for r in ("open", "sealed")}


def test_sealed_and_open_give_one_audit(runs):
    audits = {}
    for relay, (strategy, _) in runs.items():
        cfg = RunConfig.from_run_config({**WHITEBOX, "num-server-rounds": 3, "gossip-relay": relay})
        audits[relay] = whitebox_audit(cfg, strategy)
    rows = audits["sealed"]["observers"]
    assert rows == audits["open"]["observers"]
    assert rows[0]["observer"] == "owner" and rows[0]["canaries"] == NODES * 40
    assert {r["distance"] for r in rows} == {0, 1, 2, 3}
    for r in rows:
        assert r["eps_lower"] <= r["eps_accountant"], r
    reached = [r["distance"] for r in rows if r["canaries"]]  # a path reached the observer
    assert [d["distance"] for d in audits["sealed"]["by_distance"]] == reached
    assert reached[:2] == [0, 1] and audits["sealed"]["observer_node"] in range(NODES)
    stored = json.loads(to_json(audits["sealed"]))  # audit.json as the ServerApp writes it
    assert stored["mode"] == "whitebox" and len(stored["observers"]) == len(rows)


def test_the_reported_increments_are_what_entered_the_models(runs):
    """Mixing conserves the sum: the nodes' final models sum to n·x0 plus every increment."""
    strategy, grid = runs["sealed"]
    initial = np.concatenate(
        [np.asarray(a, dtype=np.float64).ravel() for a in strategy.initial.to_numpy_ndarrays()]
    )
    plan = draw_plan(NODES, 40, initial.size, 0)
    total = sum(project(grid.node_model(p), plan) for p in range(NODES))
    increments = sum(inc for got in strategy.canary_increments for inc in got.values())
    assert len(strategy.canary_increments) == 3
    assert np.allclose(total, NODES * project(initial, plan) + increments, atol=1e-4)


def test_increments_of_the_wrong_length_make_the_audit_unavailable_not_a_crash(runs):
    import copy

    strategy = copy.copy(runs["sealed"][0])
    strategy.canary_increments = [{0: np.zeros(3)}, *strategy.canary_increments[1:]]
    cfg = RunConfig.from_run_config({**WHITEBOX, "num-server-rounds": 3})
    audit = whitebox_audit(cfg, strategy)
    assert audit["observers"] == [] and "vertex 0 reported (3,)" in audit["unavailable"]
