"""The knobs a fair comparison needs: a validation split, local steps, gossip steps, bytes."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from flower_app.config import ConfigError, RunConfig
from flower_app.data import load_arrays, to_tensors, validation_split
from flower_app.model import build_model
from flower_app.node import local_round, plan
from flower_app.policy import round_steps
from flower_app.privacy import epsilon, plan_ledger
from flower_app.rng import PrivacyRandomness
from flower_app.shards import ShardSpec, shard_for, shard_indices
from flower_app.topology import build_topology
from flower_app.train import train_dp, train_plain
from server_app.evaluation import central_test_sets
from strategies.gossip import Gossip
from tests.mock_grid import mock_grid
from tests.test_gossip_strategy import record, reply

N_TRAIN = 60_000


def test_validation_split_is_fixed_whatever_the_seed_and_disjoint():
    train, held = validation_split(N_TRAIN, 5000)
    assert len(held) == 5000 and len(train) == N_TRAIN - 5000
    assert not np.intersect1d(train, held).size
    assert np.array_equal(np.union1d(train, held), np.arange(N_TRAIN))
    again_train, again_held = validation_split(N_TRAIN, 5000)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    none_train, none_held = validation_split(N_TRAIN, 0)
    assert none_held.size == 0 and np.array_equal(none_train, np.arange(N_TRAIN))
    with pytest.raises(ValueError, match="validation-samples=60000 is not valid"):
        validation_split(N_TRAIN, N_TRAIN)


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid", "shards"])
def test_no_node_shard_holds_a_validation_example(partitioner):
    labels = load_arrays("fashion-mnist").y_train
    _, held = validation_split(len(labels), 5000)
    seen = []
    for seed in (7, 8):  # the split does not move with the run's seed
        for pid in range(20):
            cfg = RunConfig(partitioner=partitioner, seed=seed, validation_samples=5000)
            idx = shard_indices(labels, ShardSpec.of(cfg, pid, 20))
            assert not np.intersect1d(idx, held).size, f"node {pid} holds validation examples"
            seen.append(idx)
    # Without the split the shards do use those examples: the carve-out is what keeps them out.
    cfg = RunConfig(partitioner=partitioner, seed=7)
    plain = [shard_indices(labels, ShardSpec.of(cfg, pid, 20)) for pid in range(20)]
    assert np.intersect1d(np.concatenate(plain), held).size > 4000


def test_a_validation_run_evaluates_on_held_out_training_examples_never_the_test_set():
    arrays = load_arrays("fashion-mnist")
    _, held = validation_split(len(arrays.y_train), 3000)
    cfg = RunConfig(validation_samples=3000, evaluate_on="validation", node_eval_samples=500)
    central, per_node = central_test_sets(cfg)
    expected = to_tensors("fashion-mnist", arrays.x_train[held], arrays.y_train[held])
    assert torch.equal(central.tensors[0], expected.tensors[0])
    assert torch.equal(central.tensors[1], expected.tensors[1])
    assert len(per_node) == 500
    test, _ = central_test_sets(RunConfig(validation_samples=3000))
    assert len(test) == len(arrays.y_test)
    assert torch.equal(
        test.tensors[0], to_tensors("fashion-mnist", arrays.x_test, arrays.y_test).tensors[0]
    )


def test_validation_config_errors_are_one_line():
    with pytest.raises(
        ConfigError, match="evaluate-on='validation' is not valid with validation-samples=0"
    ):
        RunConfig(evaluate_on="validation")
    with pytest.raises(ConfigError, match="local-steps=-1 is not valid"):
        RunConfig.from_run_config({"local-steps": -1})
    with pytest.raises(ConfigError, match="gossip-steps=0 is not valid"):
        RunConfig.from_run_config({"gossip-steps": 0})
    with pytest.raises(ConfigError, match="choose one of: test, validation"):
        RunConfig.from_run_config({"evaluate-on": "train"})
    with pytest.raises(ConfigError, match="validation-samples=60000 is not valid"):
        central_test_sets(RunConfig(validation_samples=60_000))


def random_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n).astype(np.int64),
    )


@pytest.mark.parametrize("mode", ["fast", "hooks"])
def test_train_dp_takes_exactly_local_steps_at_the_one_epoch_sample_rate(mode):
    data = random_data(200)  # batch 16: 13 steps per epoch, q = 1/13
    ledger = plan_ledger(
        num_samples=200, batch_size=16, total_steps=21, target_eps=4.0, delta=1e-5, accountant="rdp"
    )
    assert ledger.planned_steps == 21 and ledger.sample_rate == pytest.approx(1 / 13)
    for done in (0, 7, 14):
        result = train_dp(
            build_model("mlp", seed=0),
            data,
            ledger.after(done),
            epochs=5,  # ignored: steps wins
            steps=7,
            batch_size=16,
            lr=0.1,
            momentum=0.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            randomness=PrivacyRandomness.replayable(done),
        )
        assert result.steps == 7
    spent = ledger.after(21).epsilon()
    assert spent == pytest.approx(
        epsilon(noise_multiplier=ledger.noise_multiplier, sample_rate=1 / 13, steps=21, delta=1e-5)
    )
    assert 3.9 <= spent <= 4.0


def test_train_plain_takes_exactly_local_steps_passing_over_the_data_again():
    result = train_plain(
        build_model("mlp", seed=0),
        random_data(50),
        epochs=1,
        steps=9,
        batch_size=16,
        lr=0.1,
        momentum=0.0,
    )
    assert result.steps == 9  # 4 batches per pass: more than two passes


def test_a_local_steps_run_plans_and_spends_exactly_rounds_times_local_steps():
    cfg = RunConfig(eps=2.0, num_server_rounds=3, local_steps=3, samples_per_node=300)
    data = shard_for(cfg, 0, 10)
    ledger = plan(cfg, len(data))
    assert ledger.planned_steps == 9
    assert ledger.sample_rate == pytest.approx(1 / math.ceil(len(data) / cfg.batch_size))
    assert round_steps(cfg, ledger) == 3
    weights = build_model("cnn", seed=7).state_dict()
    for r in range(1, 4):
        out = local_round(
            cfg, partition_id=0, num_partitions=10, weights=weights, ledger=ledger, server_round=r
        )
        assert out.round_steps == 3
        ledger, weights = out.ledger, out.state_dict
    assert ledger.steps == ledger.planned_steps == 9
    assert 1.9 <= ledger.epsilon() <= 2.0
    # The whole-epoch plan of the same run: local-steps is what changed the plan.
    epochs = RunConfig(eps=2.0, num_server_rounds=3, samples_per_node=300)
    assert plan(epochs, len(data)).planned_steps == 3 * math.ceil(len(data) / 64) == 15


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("mode", ["matching", "edges", "metropolis"])
def test_gossip_steps_conserve_the_network_mean_and_mix_further(mode, task_identity):
    values = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
    results = {}
    for steps in (1, 4):
        graph = build_topology("ring", 8, seed=0)
        strategy = Gossip(graph, mode=mode, steps_per_round=steps, seed=3, edges_per_round=4)
        nodes = list(range(100, 108))
        list(strategy.configure_train(1, record(0.0), ConfigRecord(), mock_grid(nodes)))
        mean, _ = strategy.aggregate_train(1, [reply(100 + i, i, v) for i, v in enumerate(values)])
        network = np.mean([m for m in strategy.models.values()], axis=0)
        assert network == pytest.approx(np.full_like(network, np.mean(values)))
        assert mean.to_numpy_ndarrays()[0][0, 0] == pytest.approx(np.mean(values))
        results[steps] = strategy.last_round
    # More steps: closer to consensus, and every step's messages are counted.
    assert results[4]["consensus_distance"] < results[1]["consensus_distance"]
    assert results[4]["bytes_sent_per_node"] > 2 * results[1]["bytes_sent_per_node"]
