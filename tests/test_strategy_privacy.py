"""What the server does with nodes' privacy: refusals, vertex binding, lost replies."""

import logging
import math
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.replies import refusal_reply
from flower_app.config import RunConfig
from flower_app.node import Refused
from flower_app.privacy import epsilon
from flower_app.topology import build_topology
from server_app.rejections import OneLineRejections, RunRejected
from strategies import privacy_bounds
from strategies.base import NodeRefused, PrivacyBounds
from strategies.fedavg import CentralFedAvg
from strategies.gossip import Gossip
from tests.mock_grid import mock_grid

SIGMA, Q, ROUND_STEPS = 1.2, 0.05, 20


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def metrics(pid, server_round):
    steps = server_round * ROUND_STEPS
    eps = epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=steps, delta=1e-5)
    return {
        "num-examples": 10,
        "partition-id": pid,
        "eps": eps,
        "eps-strict": eps,
        "noise-multiplier": SIGMA,
        "sample-rate": Q,
        "steps": steps,
        "round-steps": ROUND_STEPS,
        "planned-steps": 5 * ROUND_STEPS,
    }


def reply(node_id, pid, server_round=1, value=None):
    msg = Mock(spec=Message)
    msg.has_error.return_value = False
    msg.metadata.src_node_id = node_id
    value = float(pid) if value is None else value
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord([np.full(3, value, dtype=np.float32)]),
            "metrics": MetricRecord(metrics(pid, server_round)),
        }
    )
    return msg


def refusal(node_id, pid, reason):
    msg = Mock(spec=Message)
    msg.has_error.return_value = False
    msg.metadata.src_node_id = node_id
    msg.content = refusal_reply(Refused(reason), pid)
    return msg


INITIAL = ArrayRecord([np.zeros(3, dtype=np.float32)])


def fedavg(nodes, bounds=None):
    strategy = CentralFedAvg(num_nodes=len(nodes), min_available_nodes=1, bounds=bounds)
    return strategy


def test_one_refusing_node_stops_the_run_with_its_reason():
    strategy = fedavg([10, 11])
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11])))
    with pytest.raises(NodeRefused) as err:
        strategy.aggregate_train(
            1, [reply(10, 0), refusal(11, 1, "eps=8 exceeds this node's max-eps=4")]
        )
    assert str(err.value) == (
        "round 1: refused by its node(s): partition-id=1: eps=8 exceeds this node's max-eps=4"
    )


def test_a_second_node_claiming_a_partition_is_refused(caplog):
    """Found by attack: node 12 reported partition 0 and overwrote node 10's ε report."""
    caplog.set_level(logging.WARNING, logger="flwr")
    logging.getLogger("flwr").addHandler(caplog.handler)
    strategy = fedavg([10, 11, 12])
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    strategy.aggregate_train(1, [reply(10, 0, 2), reply(11, 1, 2)])
    honest = strategy.reports.eps_spent()
    list(strategy.configure_train(2, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    arrays, _ = strategy.aggregate_train(2, [reply(10, 0, 2), reply(11, 1, 2), reply(12, 0, 1)])
    logging.getLogger("flwr").removeHandler(caplog.handler)
    assert "node 12 claims partition-id=0, which is bound to node 10" in caplog.text
    # The impostor's lower ε did not replace node 10's.
    assert strategy.reports.eps_spent() == honest
    assert strategy.last_round["nodes_trained"] == 2
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 0.5)  # mean of pids 0 and 1


def test_a_node_racing_to_claim_a_registered_partition_first_is_refused():
    """First-report binding lets node 12 take vertex 0 if it answers first; partition-nodes
    binds each vertex to the node id its operator registered, before any reply."""
    from strategies import STRATEGIES

    cfg = RunConfig(strategy="gossip", gossip_relay="open", eps=math.inf,
                    partition_nodes="0:10,1:11,2:12", min_available_nodes=1)  # fmt: skip
    strategy = STRATEGIES["gossip"](cfg, 3, lambda arrays: {})
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    strategy.aggregate_train(1, [reply(12, 0, value=-100.0), reply(11, 1), reply(10, 0)])
    assert strategy.reports.partition_of == {10: 0, 11: 1, 12: 2}
    assert -100.0 not in np.concatenate(list(strategy.models.values()))


def test_fedavg_built_with_bindings_refuses_an_unbound_claimant_from_the_first_reply():
    """The bindings are the reports' from construction: no call after it sets them up."""
    strategy = CentralFedAvg(num_nodes=2, min_available_nodes=1, bindings={0: 10, 1: 11})
    assert strategy.reports.node_of == {0: 10, 1: 11}
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    arrays, _ = strategy.aggregate_train(
        1, [reply(12, 0, value=-100.0), reply(10, 0), reply(11, 1)]
    )
    assert strategy.reports.node_of == {0: 10, 1: 11}
    assert strategy.last_round["nodes_trained"] == 2
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 0.5)  # mean of pids 0 and 1


@pytest.mark.parametrize("text", ["0:10,0:11", "0:10,1:10", "0=10", "a:1", "-1:3", "1:2:3"])
def test_partition_nodes_must_be_distinct_pairs(text):
    from flower_app.config import ConfigError

    with pytest.raises(ConfigError, match="partition-nodes=.* is not valid; expected ''"):
        RunConfig(partition_nodes=text)
    assert RunConfig(partition_nodes=" 0:10, 1:11 ").bindings == {0: 10, 1: 11}


def test_a_gossip_node_cannot_take_over_another_vertex_and_receive_its_model():
    strategy = Gossip(build_topology("ring", 3, seed=0), seed=1, min_available_nodes=1)
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    strategy.aggregate_train(1, [reply(10, 0, value=5.0), reply(11, 1), reply(12, 2)])
    # Node 12 now claims vertex 0 (node 10's); it must keep getting its own vertex's model.
    list(strategy.configure_train(2, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    strategy.aggregate_train(2, [reply(11, 1), reply(12, 0, value=-100.0)])
    assert strategy.reports.partition_of == {10: 0, 11: 1, 12: 2}
    assert -100.0 not in np.concatenate(list(strategy.models.values()))
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(3, INITIAL, ConfigRecord(), mock_grid([10, 11, 12]))
    }
    np.testing.assert_array_equal(
        sent[12].content["arrays"].to_numpy_ndarrays()[0],
        strategy.layout.unflatten(strategy.models[2])[0],
    )


def test_a_lost_reply_still_counts_the_round_the_node_may_have_spent():
    strategy = fedavg([10, 11], bounds=PrivacyBounds(delta=1e-5, run_bound=8.0))
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11])))
    strategy.aggregate_train(1, [reply(10, 0, 1), reply(11, 1, 1)])
    list(strategy.configure_train(2, INITIAL, ConfigRecord(), mock_grid([10, 11])))
    strategy.aggregate_train(2, [reply(10, 0, 1)])  # node 10 answers late data; 11 is lost
    two_rounds = epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=40, delta=1e-5)
    assert strategy.reports.node_eps(1) == pytest.approx(two_rounds)
    assert strategy.reports.eps_spent() == pytest.approx(two_rounds)
    assert strategy.reports.privacy_by_node()["1"]["lost-rounds"] == 1
    # The node comes back: its own (durable) ledger is the truth again.
    list(strategy.configure_train(3, INITIAL, ConfigRecord(), mock_grid([10, 11])))
    strategy.aggregate_train(3, [reply(10, 0, 3), reply(11, 1, 3)])
    assert "lost-rounds" not in strategy.reports.privacy_by_node()["1"]


def test_a_node_lost_before_it_ever_reported_counts_at_the_runs_bound():
    strategy = fedavg([10, 11], bounds=PrivacyBounds(run_bound=2.0))
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11])))
    strategy.aggregate_train(1, [reply(10, 0, 1)])
    assert strategy.reports.eps_spent() == 2.0


def test_the_run_bound_is_the_plan_and_per_round_labels_compose():
    assert privacy_bounds(RunConfig(eps=2.0)).run_bound == 2.0
    per_round = privacy_bounds(
        RunConfig(eps=1.0, dp_mode="update", accounting="per-round", num_server_rounds=20)
    )
    assert per_round.run_bound > 4.0


def test_a_rejected_run_keeps_to_its_one_line():
    """Flower logs a failed ServerApp with two chained tracebacks and exit-code 700 text."""
    logger = logging.getLogger("test-one-line")
    logger.addFilter(OneLineRejections())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        try:
            raise RunRejected("invalid run: eps=-1.0 is not valid")
        except RunRejected as err:
            logger.error("invalid run: eps=-1.0 is not valid")
            logger.error("Simulation raised an exception", exc_info=err)
        logger.error("Exit Code: 700\nAn unhandled exception occurred")
        try:
            raise ValueError("a bug")
        except ValueError as err:
            logger.error("ServerApp raised an exception", exc_info=err)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "invalid run: eps=-1.0 is not valid",
        "ServerApp raised an exception",  # any other failure keeps its traceback
    ]
    assert records[1].exc_info is not None


# An ε above what no noise can certify (RunConfig refuses that) but still out of reach of
# the noise search for this run: 100000 full-batch releases at σ <= 655360 spend ε ≈ 0.00362.
UNREACHABLE = dict(eps=0.0036, dp_mode="update", num_server_rounds=100_000)


def test_a_node_whose_plan_cannot_meet_eps_refuses_in_one_line():
    from flower_app.config import ConfigError
    from flower_app.node import plan

    with pytest.raises(ConfigError) as info:
        plan(RunConfig(**UNREACHABLE), 100)
    message = str(info.value)
    assert "\n" not in message and message.startswith("eps=0.0036 cannot be met")
    assert "δ=1e-05" in message and "100000 steps" in message


def test_the_server_refuses_an_update_mode_eps_it_can_calibrate_before_training():
    from flower_app.config import ConfigError
    from strategies import STRATEGIES

    for name in STRATEGIES:
        with pytest.raises(ConfigError, match=r"^eps=0\.0036 cannot be met"):
            STRATEGIES[name](RunConfig(**UNREACHABLE), 3, None)


def gossip_reply(node_id, pid, num_partitions):
    msg = reply(node_id, pid)
    msg.content["metrics"]["num-partitions"] = num_partitions
    return msg


@pytest.mark.parametrize(("pids", "count"), [((0, 1, 2), 4), ((0, 1, 0), 2), ((0, 1, 3), 0)])
def test_gossip_with_num_partitions_other_than_its_node_count_stops_in_one_line(pids, count):
    from flower_app.config import ConfigError

    strategy = Gossip(build_topology("ring", 3, seed=0), seed=1, min_available_nodes=1)
    list(strategy.configure_train(1, INITIAL, ConfigRecord(), mock_grid([10, 11, 12])))
    replies = [
        gossip_reply(10 + i, pid, count) if count else reply(10 + i, pid)
        for i, pid in enumerate(pids)
    ]
    with pytest.raises(ConfigError) as info:
        strategy.aggregate_train(1, replies)
    message = str(info.value)
    assert "\n" not in message and message.startswith("round 1: ")
    assert f"num-partitions={count or 4}" in message and "3 nodes" in message


def test_a_node_reports_its_num_partitions():
    from client_app.replies import train_reply
    from flower_app.node import NodeRound

    out = NodeRound({}, 10, 0.5, None, num_partitions=4)
    assert train_reply(out, 3)["metrics"]["num-partitions"] == 4


def test_a_run_stopped_by_a_config_mismatch_mid_run_is_one_line(monkeypatch):
    from flower_app.config import ConfigError
    from server_app import app

    strategy = Mock()
    strategy.start.side_effect = ConfigError("round 1: num-partitions=4 but 3 nodes")
    recorder = Mock()
    recorder.files.rows = []
    monkeypatch.setattr(app, "model_for", Mock())
    monkeypatch.setattr(app, "ArrayRecord", Mock())
    with pytest.raises(RunRejected, match="^run stopped: round 1: num-partitions=4 but 3 nodes$"):
        app.run_rounds(Mock(), RunConfig(), strategy, recorder)
    recorder.files.discard.assert_called_once()
