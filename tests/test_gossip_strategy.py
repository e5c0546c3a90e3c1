"""The Gossip strategy with fake replies: no Flower run, no training."""

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_app.topology import build_topology
from strategies.gossip import Gossip
from tests.mock_grid import mock_grid

KEYS = ("layer.weight", "layer.bias")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def record(value):
    return ArrayRecord(
        {
            KEYS[0]: Array(np.full((2, 2), value, dtype=np.float32)),
            KEYS[1]: Array(np.full(2, value, dtype=np.float32)),
        }
    )


def reply(node_id, pid, value, error=False):
    msg = Mock(spec=Message)
    msg.has_error.return_value = error
    msg.metadata.src_node_id = node_id
    msg.error.reason = "gone"
    msg.content = RecordDict(
        {
            "arrays": record(value),
            "metrics": MetricRecord(
                {"num-examples": 10, "partition-id": pid, "train-loss": 1.0, "eps": 0.1 * pid}
            ),
        }
    )
    return msg


def grid_of(node_ids):
    return mock_grid(node_ids)


def node_value(msg):
    return float(msg.content["arrays"].to_numpy_ndarrays()[0][0, 0])


def make(mode="matching", n=6, evaluate=None):
    """A strategy past configure_train of round 1 (which records the initial model)."""
    graph = build_topology("ring", n, seed=0)
    strategy = Gossip(graph, mode=mode, seed=3, min_available_nodes=2, evaluate_arrays=evaluate)
    list(strategy.configure_train(1, record(0.0), ConfigRecord(), grid_of(range(100, 100 + n))))
    return strategy


def test_first_round_sends_the_initial_model_then_each_node_gets_its_own():
    strategy = make()
    nodes = [100 + i for i in range(6)]
    msgs = list(strategy.configure_train(1, record(0.0), ConfigRecord(), grid_of(nodes)))
    assert {m.metadata.dst_node_id for m in msgs} == set(nodes)
    assert all(node_value(m) == 0.0 for m in msgs)
    strategy.aggregate_train(1, [reply(100 + i, i, float(i)) for i in range(6)])
    msgs = list(strategy.configure_train(2, record(-1.0), ConfigRecord(), grid_of(nodes)))
    by_node = {m.metadata.dst_node_id: node_value(m) for m in msgs}
    expected = {100 + v: float(strategy.models[v][0]) for v in range(6)}
    assert by_node == pytest.approx(expected)
    assert -1.0 not in by_node.values(), "a node received the server's diagnostic average"
    assert len(set(np.round(list(by_node.values()), 6))) > 1, "everyone got the same model"
    keys = list(msgs[0].content["arrays"].keys())
    assert keys == list(KEYS)


@pytest.mark.parametrize("mode", ["matching", "edges", "metropolis"])
def test_gossip_conserves_the_mean_and_only_mixes_neighbours(mode):
    strategy = make(mode)
    values = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    mean, _ = strategy.aggregate_train(1, [reply(100 + i, i, v) for i, v in enumerate(values)])
    assert mean.to_numpy_ndarrays()[0][0, 0] == pytest.approx(np.mean(values))
    for v, model in strategy.models.items():
        neighbours = {v, (v - 1) % 6, (v + 1) % 6}
        if mode != "edges":  # edges mode is sequential: mass can travel two hops
            lo = min(values[u] for u in neighbours)
            hi = max(values[u] for u in neighbours)
            assert lo - 1e-9 <= model[0] <= hi + 1e-9
    # 6 parameters per model, each starting with the spread of `values`; averaging contracts.
    assert strategy.last_round["consensus_distance"] < 6 * np.var(values)
    assert strategy.last_round["bytes_sent_per_node"] > 0


def test_absent_nodes_keep_their_model_and_skip_pairing():
    strategy = make("metropolis")
    strategy.aggregate_train(1, [reply(100 + i, i, float(i)) for i in range(6)])
    before = {v: m.copy() for v, m in strategy.models.items()}
    replies = [reply(100 + i, i, 7.0) for i in range(6) if i != 2]
    replies.append(reply(102, 2, 999.0, error=True))
    strategy.aggregate_train(2, replies)
    np.testing.assert_array_equal(strategy.models[2], before[2])
    assert all(999.0 not in m for m in strategy.models.values())
    assert strategy.last_round["nodes_trained"] == 5
    assert strategy.last_round["nodes_failed"] == 1


def test_matching_pairs_each_node_at_most_once():
    strategy = make("matching", n=10)
    values = np.arange(10) * 100.0
    strategy.aggregate_train(1, [reply(100 + i, i, float(v)) for i, v in enumerate(values)])
    after = [float(m[0]) for m in strategy.models.values()]
    for v, x in enumerate(after):
        # Either untouched, or the mean with exactly one ring neighbour.
        options = {
            values[v],
            (values[v] + values[(v + 1) % 10]) / 2,
            (values[v] + values[v - 1]) / 2,
        }
        assert any(abs(x - o) < 1e-9 for o in options)


def test_node_accuracies_come_from_every_node_model():
    seen = []

    def evaluate(arrays):
        seen.append(float(arrays[0][0, 0]))
        return 0.0, float(arrays[0][0, 0]) / 100

    strategy = make("matching", evaluate=evaluate)
    strategy.aggregate_train(1, [reply(100 + i, i, float(i * 10)) for i in range(6)])
    diag = strategy.round_diagnostics()
    assert len(seen) == 6
    assert diag["node_acc_min"] <= diag["node_acc_mean"] <= diag["node_acc_max"]
    assert diag["eps_spent"] == pytest.approx(0.5)


def test_summary_reports_the_spectral_gap_of_the_mode_used():
    facts = make("metropolis", n=20).topology_facts()
    expected = 1 - (1 / 3 + 2 / 3 * np.cos(2 * np.pi / 20))
    assert facts["spectral_gap"] == pytest.approx(expected, rel=1e-6)
    assert facts["nodes"] == 20 and facts["edges"] == 20 and facts["diameter"] == 10
    assert facts["name"] == "ring" and facts["mode"] == "metropolis"


def test_gossip_takes_what_both_strategies_share_from_base_not_from_fedavg():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parent.parent / "strategies" / "gossip.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "strategies.base" in modules and "strategies.fedavg" not in modules
