from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies.base import QuorumError
from strategies.fedavg import CentralFedAvg, aggregate_train_metrics


def reply(pid, value, n, eps=None, error=False):
    msg = Mock(spec=Message)
    msg.has_error.return_value = error
    msg.metadata.src_node_id = 1000 + pid
    msg.error.reason = "node crashed"
    metrics = {"num-examples": n, "partition-id": pid, "train-loss": float(value)}
    if eps is not None:
        metrics["eps"] = eps
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord([np.full(3, float(value), dtype=np.float32)]),
            "metrics": MetricRecord(metrics),
        }
    )
    return msg


def test_aggregate_train_is_the_example_weighted_mean_and_skips_errors():
    strategy = CentralFedAvg(num_nodes=3, min_available_nodes=2)
    replies = [
        reply(0, 1.0, 100, eps=0.5),
        reply(1, 4.0, 300, eps=0.7),
        reply(2, 99.0, 1, error=True),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = arrays.to_numpy_ndarrays()[0]
    np.testing.assert_allclose(w, np.full(3, (1.0 * 100 + 4.0 * 300) / 400))
    assert metrics["train-loss"] == pytest.approx(3.25)
    assert metrics["eps-max"] == pytest.approx(0.7)
    diag = strategy.round_diagnostics()
    assert diag["nodes_trained"] == 2 and diag["nodes_failed"] == 1
    assert diag["eps_spent"] == pytest.approx(0.7)


def test_eps_spent_remembers_nodes_not_sampled_this_round():
    strategy = CentralFedAvg(num_nodes=2, min_available_nodes=1)
    strategy.aggregate_train(1, [reply(0, 1.0, 10, eps=0.9), reply(1, 1.0, 10, eps=0.4)])
    strategy.aggregate_train(2, [reply(1, 1.0, 10, eps=0.6)])
    assert strategy.reports.eps_spent() == pytest.approx(0.9)
    assert set(strategy.reports.privacy_by_node()) == {"0", "1"}


def test_metrics_without_dp_have_no_eps():
    out = aggregate_train_metrics([reply(0, 2.0, 5).content], "num-examples")
    assert "eps-max" not in out and out["train-loss"] == pytest.approx(2.0)


def test_no_federated_evaluation():
    assert list(CentralFedAvg(num_nodes=2).configure_evaluate(1, ArrayRecord(), None, None)) == []


def test_too_few_answers_stop_the_run_with_a_clear_message():
    strategy = CentralFedAvg(num_nodes=4, min_available_nodes=3)
    replies = [reply(0, 1.0, 10), reply(1, 1.0, 10), reply(2, 1.0, 10, error=True)]
    with pytest.raises(QuorumError, match="only 2 node\\(s\\) answered.*min-available-nodes=3"):
        strategy.aggregate_train(5, replies)


def test_aggregate_is_bit_identical_whatever_order_the_replies_arrive_in():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(10, 200)).astype(np.float32)

    def replies():
        out = []
        for pid, v in enumerate(values):
            msg = reply(pid, 0.0, 100 + pid)
            msg.content["arrays"] = ArrayRecord([v])
            out.append(msg)
        return out

    forward, backward = replies(), replies()[::-1]
    # A float32 sum depends on its order (else this test would prove nothing).
    sums = [np.float32(0) + values[0], np.float32(0) + values[-1]]
    for v in values[1:]:
        sums[0] = sums[0] + v
    for v in values[-2::-1]:
        sums[1] = sums[1] + v
    assert not np.array_equal(sums[0], sums[1])
    a = CentralFedAvg(num_nodes=10).aggregate_train(1, forward)[0].to_numpy_ndarrays()[0]
    b = CentralFedAvg(num_nodes=10).aggregate_train(1, backward)[0].to_numpy_ndarrays()[0]
    assert np.array_equal(a, b)
