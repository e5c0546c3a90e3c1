"""Who failed a round is whom the strategy asked minus who answered: a node that never replied
within round-timeout sent nothing, and the error reply the SuperLink writes for a node it
declared offline carries the SuperLink's node id. Both strategies count each once."""

import logging
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_app.topology import build_topology
from strategies.base import QuorumError
from strategies.fedavg import CentralFedAvg
from strategies.gossip import Gossip
from tests.mock_grid import mock_grid


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def grid_of(node_ids):
    return mock_grid(node_ids)


def reply(node_id, pid, error=False):
    msg = Mock(spec=Message)
    msg.has_error.return_value = error
    msg.metadata.src_node_id = node_id
    msg.error.reason = "node unavailable"
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord([np.full(3, float(pid), dtype=np.float32)]),
            "metrics": MetricRecord({"num-examples": 10, "partition-id": pid, "train-loss": 1.0}),
        }
    )
    return msg


@pytest.fixture
def flower_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    logging.getLogger("flwr").addHandler(caplog.handler)
    yield caplog
    logging.getLogger("flwr").removeHandler(caplog.handler)


def test_fedavg_counts_a_silent_node_and_an_error_reply(flower_warnings):
    strategy = CentralFedAvg(num_nodes=4, min_available_nodes=2)
    initial = ArrayRecord([np.zeros(3, dtype=np.float32)])
    msgs = list(strategy.configure_train(1, initial, ConfigRecord(), grid_of([10, 11, 12, 13])))
    assert strategy.reports.sent_to == {10, 11, 12, 13} == {m.metadata.dst_node_id for m in msgs}
    # Node 12 answered with an error, node 13 not at all.
    strategy.aggregate_train(1, [reply(10, 0), reply(11, 1), reply(12, 2, error=True)])
    assert strategy.last_round["nodes_trained"] == 2
    assert strategy.last_round["nodes_failed"] == 2
    assert "round 1: node 12 left out" in flower_warnings.text
    assert "round 1: node 13 left out" in flower_warnings.text
    assert "error reply from 12: node unavailable" in flower_warnings.text


def test_an_offline_error_written_by_the_superlink_counts_once():
    strategy = CentralFedAvg(num_nodes=3, min_available_nodes=2)
    initial = ArrayRecord([np.zeros(3, dtype=np.float32)])
    list(strategy.configure_train(2, initial, ConfigRecord(), grid_of([10, 11, 12])))
    superlink_error = reply(1, 2, error=True)  # src_node_id: the SuperLink's, not node 12's
    strategy.aggregate_train(2, [reply(10, 0), reply(11, 1), superlink_error])
    assert strategy.last_round["nodes_failed"] == 1


def test_fedavg_quorum_still_counts_only_answers():
    strategy = CentralFedAvg(num_nodes=3, min_available_nodes=2)
    initial = ArrayRecord([np.zeros(3, dtype=np.float32)])
    list(strategy.configure_train(1, initial, ConfigRecord(), grid_of([10, 11, 12])))
    with pytest.raises(QuorumError, match="only 1 node"):
        strategy.aggregate_train(1, [reply(10, 0)])


def test_gossip_counts_a_silent_node_and_keeps_its_model(flower_warnings):
    strategy = Gossip(build_topology("ring", 4, seed=0), seed=1, min_available_nodes=2)
    initial = ArrayRecord([np.zeros(3, dtype=np.float32)])
    list(strategy.configure_train(1, initial, ConfigRecord(), grid_of([10, 11, 12, 13])))
    strategy.aggregate_train(1, [reply(10 + i, i) for i in range(4)])
    assert strategy.last_round["nodes_failed"] == 0
    before = strategy.models[3].copy()
    list(strategy.configure_train(2, initial, ConfigRecord(), grid_of([10, 11, 12, 13])))
    strategy.aggregate_train(2, [reply(10 + i, i) for i in range(3)])
    assert strategy.last_round["nodes_trained"] == 3
    assert strategy.last_round["nodes_failed"] == 1
    np.testing.assert_array_equal(strategy.models[3], before)
    assert "round 2: node 13 left out" in flower_warnings.text
