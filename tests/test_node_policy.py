"""The node decides: its operator's policy, its durable ledger, and the plan it never exceeds."""

import json
import math
from unittest import mock

import numpy as np
import pytest

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.ledger import FileLedger, LedgerError
from flower_app.model import build_model
from flower_app.node import Refused, plan, serve_train
from flower_app.policy import NodePolicy, PolicyError, refusal
from flower_app.privacy import PrivacyLedger, epsilon, lifetime_epsilon

N = 120


def shard(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return to_tensors("fashion-mnist", x, y)


class MemoryStore:
    def __init__(self):
        self.data = {}

    def runs(self):
        return dict(self.data)

    def put(self, run_id, ledger):
        self.data[run_id] = ledger


def serve(cfg, policy, store, server_round, *, run_id="run-1", data=None):
    weights = build_model(cfg.model, seed=0).state_dict()
    with mock.patch("flower_app.node.shard_for", return_value=data or shard()):
        return serve_train(
            cfg,
            policy,
            store,
            run_id=run_id,
            partition_id=0,
            num_partitions=2,
            weights=weights,
            server_round=server_round,
        )


SMALL = dict(num_server_rounds=2, batch_size=40, eps=2.0)


# --- parsing the operator's node config ---------------------------------------------------


def test_a_node_without_policy_keys_accepts_everything():
    policy = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 3})
    assert not policy.has_policy and policy.allow_seeded_noise and math.isinf(policy.max_eps)


def test_any_policy_key_makes_seeded_noise_opt_in():
    policy = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 3, "max-eps": 4})
    assert policy.has_policy and not policy.allow_seeded_noise and policy.max_eps == 4


@pytest.mark.parametrize(
    "node_config, match",
    [
        ({"max-esp": 4}, "unknown node-config key.*max-esp.*valid keys: partition-id"),
        ({"max-eps": -1}, "max-eps=-1 is not valid; expected a number > 0"),
        ({"max-eps": "x"}, "max-eps='x' is not valid"),
        ({"lifetime-eps": 0}, "lifetime-eps=0 is not valid"),
        ({"allow-seeded-noise": "maybe"}, "allow-seeded-noise='maybe' is not valid; expected true"),
        ({"ledger-dir": ""}, "ledger-dir='' is not valid"),
    ],
)
def test_a_bad_policy_is_one_line_naming_key_and_valid_values(node_config, match):
    with pytest.raises(PolicyError, match=match):
        NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2, **node_config})


# --- refusals -----------------------------------------------------------------------------


def _refusal(cfg, policy, ledger="plan", others=(), n=N):
    ledger = plan(cfg, n) if ledger == "plan" else ledger
    steps = 0 if ledger is None else (1 if ledger.dp_mode == "update" else 3)
    return refusal(policy, cfg, num_samples=n, ledger=ledger, other_runs=others, steps=steps)


def test_max_eps_refuses_a_larger_eps_and_no_dp():
    policy = NodePolicy(max_eps=4, has_policy=True)
    assert _refusal(RunConfig(eps=4.0), policy) is None
    assert _refusal(RunConfig(eps=8.0), policy) == "eps=8 exceeds this node's max-eps=4"
    inf = RunConfig(eps=math.inf)
    assert _refusal(inf, policy, ledger=None) == "eps=inf (no DP) exceeds this node's max-eps=4"


def test_update_mode_is_checked_at_its_replacement_eps():
    """eps=4 of dp-mode=update is ε=4 for add/remove, but much more against the server."""
    cfg = RunConfig(eps=4.0, dp_mode="update")
    reason = _refusal(cfg, NodePolicy(max_eps=5, has_policy=True))
    assert reason is not None and "over its max-eps=5" in reason and "against the server" in reason


def test_seeded_noise_needs_the_operators_consent():
    cfg = RunConfig(eps=2.0, noise_seed=3)
    assert "allow-seeded-noise=false" in _refusal(cfg, NodePolicy(has_policy=True))
    assert _refusal(cfg, NodePolicy(has_policy=True, allow_seeded_noise=True)) is None
    assert _refusal(cfg, NodePolicy()) is None  # simulation: no policy


def test_a_delta_of_one_over_n_or_more_is_refused_on_every_node():
    reason = _refusal(RunConfig(eps=2.0, delta=0.01), NodePolicy(), n=100)
    assert reason.startswith("delta=0.01 is not valid for this node's 100 examples")
    assert _refusal(RunConfig(eps=2.0, delta=0.009), NodePolicy(), n=100) is None


def test_lifetime_eps_composes_every_run_the_node_ever_trained_in():
    cfg = RunConfig(eps=2.0, num_server_rounds=2, batch_size=40)
    done = plan(cfg, N).at_plan()
    policy = NodePolicy(lifetime_eps=2.5, has_policy=True)
    assert _refusal(cfg, policy) is None
    reason = _refusal(cfg, policy, others=[done])
    assert "lifetime ε to" in reason and "over its lifetime-eps=2.5" in reason
    assert "spent so far: 1.9" in reason or "spent so far: 2" in reason
    two = lifetime_epsilon([done, done])
    assert 2.5 < two < 4.0  # composed: more than one run, less than the naive sum
    assert two == pytest.approx(
        epsilon(
            noise_multiplier=done.noise_multiplier,
            sample_rate=done.sample_rate,
            steps=2 * done.steps,
            delta=done.delta,
        )
    )


# --- the ledger: write-ahead, enforced, durable --------------------------------------------


def test_a_train_message_beyond_the_planned_rounds_is_refused_and_spends_nothing():
    """Found by attack: a third message to a 2-round run was trained (ε=2 became 2.044)."""
    cfg = RunConfig(**SMALL)
    store = MemoryStore()
    for server_round in (1, 2):
        out = serve(cfg, NodePolicy(), store, server_round)
        assert not isinstance(out, Refused)
    final = store.data["run-1"]
    assert final.steps == final.planned_steps == 2 * 3
    assert out.ledger.epsilon() <= 2.0
    extra = serve(cfg, NodePolicy(), store, 3)
    assert isinstance(extra, Refused) and "past the 6 its noise was calibrated for" in extra.reason
    assert store.data["run-1"] == final


def test_a_restarted_node_resumes_its_file_ledger(tmp_path):
    cfg = RunConfig(**SMALL)
    policy = NodePolicy(ledger_dir=str(tmp_path), has_policy=True, max_eps=8)
    first = serve(cfg, policy, FileLedger(tmp_path), 1)
    # A new process: nothing in memory, only the folder.
    second = serve(cfg, policy, FileLedger(tmp_path), 2)
    assert second.ledger.steps == 2 * first.ledger.steps
    assert second.ledger.epsilon() > first.ledger.epsilon()
    assert isinstance(serve(cfg, policy, FileLedger(tmp_path), 3), Refused)
    saved = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert saved["runs"]["run-1"]["steps"] == 6 and saved["runs"]["run-1"]["planned_steps"] == 6


def test_a_round_is_written_to_the_ledger_before_it_trains(tmp_path):
    cfg = RunConfig(**SMALL)
    store = FileLedger(tmp_path)
    with mock.patch("flower_app.node.local_round", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):  # killed mid-round
            serve(cfg, NodePolicy(), store, 1)
    assert store.runs()["run-1"].steps == 3  # the round counts as spent


def test_the_lifetime_budget_spans_runs_in_the_file_ledger(tmp_path):
    cfg = RunConfig(**SMALL)
    policy = NodePolicy(ledger_dir=str(tmp_path), lifetime_eps=2.5, has_policy=True)
    for server_round in (1, 2):
        out = serve(cfg, policy, FileLedger(tmp_path), server_round, run_id="a")
    assert out.lifetime_eps == pytest.approx(out.ledger.epsilon())
    again = serve(cfg, policy, FileLedger(tmp_path), 1, run_id="b")
    assert isinstance(again, Refused) and "lifetime-eps=2.5" in again.reason
    assert set(FileLedger(tmp_path).runs()) == {"a"}  # the refused run spent nothing


def test_an_unreadable_ledger_stops_the_node_instead_of_starting_afresh(tmp_path):
    (tmp_path / "privacy-ledger.json").write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        FileLedger(tmp_path).runs()


def test_the_ledger_never_records_fewer_steps(tmp_path):
    store = FileLedger(tmp_path)
    led = PrivacyLedger(1.0, 0.1, 10, 1e-5, "rdp", 20, "sample")
    store.put("r", led)
    with pytest.raises(LedgerError, match="refusing to record 5"):
        store.put("r", PrivacyLedger(1.0, 0.1, 5, 1e-5, "rdp", 20, "sample"))


def test_a_private_reply_carries_no_train_loss():
    from flower_app.records import train_reply

    cfg = RunConfig(**SMALL)
    out = serve(cfg, NodePolicy(), MemoryStore(), 1)
    metrics = train_reply(out, 0)["metrics"]
    assert "train-loss" not in metrics
    assert {"eps", "noise-multiplier", "sample-rate", "steps", "planned-steps"} <= set(metrics)
    plain = serve(RunConfig(**{**SMALL, "eps": math.inf}), NodePolicy(), MemoryStore(), 1)
    assert "train-loss" in train_reply(plain, 0)["metrics"]


def test_the_context_state_ledger_round_trips_through_a_flower_record():
    from flwr.app import RecordDict

    from flower_app.records import StateLedger

    led = PrivacyLedger(1.5, 0.1, 20, 1e-5, "rdp", 40, "sample")
    state = RecordDict()
    StateLedger(state, "r").put("r", led)
    assert StateLedger(state, "r").runs() == {"r": led}
