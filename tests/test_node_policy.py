"""The node decides: its operator's policy, its durable ledger, and the plan it never exceeds."""

import json
import math
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.ledger import FileLedger, LedgerError, ledger_key
from flower_app.model import build_model
from flower_app.network_calibration import network_plan, planned_schedule
from flower_app.network_dp import ORDERS, by_distance, pairwise_rdp, rdp_to_eps
from flower_app.node import Refused, plan, serve_train
from flower_app.policy import NodePolicy, PolicyError, refusal
from flower_app.privacy import PrivacyLedger, epsilon, lifetime_epsilon

N = 120
ABS = "/var/lib/node/ledger"  # an absolute ledger-dir (parsing never touches it)
KEY = ledger_key("run-1", 0)  # the ledger entry of `serve`'s run


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

    def put(self, key, ledger):
        self.data[key] = ledger

    def reserve(self, key, decide):
        record, result = decide(self.runs())
        if record is not None:
            self.put(key, record)
        return result


def serve(cfg, policy, store, server_round, *, run_id="run-1", data=None):
    weights = build_model(cfg.model, seed=0).state_dict()
    with mock.patch("flower_app.node.load_shard", return_value=data or shard()):
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
    node_config = {"partition-id": 0, "num-partitions": 3, "max-eps": 4, "ledger-dir": ABS}
    policy = NodePolicy.from_node_config(node_config)
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
    final = store.data[KEY]
    assert final.steps == final.planned_steps == 2 * 3
    assert out.ledger.epsilon() <= 2.0
    extra = serve(cfg, NodePolicy(), store, 3)
    assert isinstance(extra, Refused) and "past the 6 its noise was calibrated for" in extra.reason
    assert store.data[KEY] == final


@pytest.mark.parametrize(
    "changed", [{"eps": 8.0}, {"batch_size": 20}, {"num_server_rounds": 3}, {"eps": math.inf}]
)
def test_a_ledger_entry_planned_under_another_config_is_not_resumed(changed):
    """Flower shares context.state across a run series: the same key, another config."""
    store = MemoryStore()
    assert not isinstance(serve(RunConfig(**SMALL), NodePolicy(), store, 1), Refused)
    before = store.data[KEY]
    out = serve(RunConfig(**{**SMALL, **changed}), NodePolicy(), store, 2)
    assert isinstance(out, Refused) and "not resuming it" in out.reason
    assert store.data[KEY] == before


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
    assert saved["runs"][KEY]["steps"] == 6 and saved["runs"][KEY]["planned_steps"] == 6


def test_a_round_is_written_to_the_ledger_before_it_trains(tmp_path):
    cfg = RunConfig(**SMALL)
    store = FileLedger(tmp_path)
    with mock.patch("flower_app.node.train_round", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):  # killed mid-round
            serve(cfg, NodePolicy(), store, 1)
    assert store.runs()[KEY].steps == 3  # the round counts as spent


def test_the_lifetime_budget_spans_runs_in_the_file_ledger(tmp_path):
    cfg = RunConfig(**SMALL)
    policy = NodePolicy(ledger_dir=str(tmp_path), lifetime_eps=2.5, has_policy=True)
    for server_round in (1, 2):
        out = serve(cfg, policy, FileLedger(tmp_path), server_round, run_id="a")
    assert out.lifetime_eps == pytest.approx(out.ledger.epsilon())
    again = serve(cfg, policy, FileLedger(tmp_path), 1, run_id="b")
    assert isinstance(again, Refused) and "lifetime-eps=2.5" in again.reason
    assert set(FileLedger(tmp_path).runs()) == {ledger_key("a", 0)}  # the refused run spent nothing


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
    from client_app.replies import train_reply

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
    StateLedger(state).put("run-1/partition-0", led)
    assert StateLedger(state).runs() == {"run-1/partition-0": led}


def test_a_run_series_sharing_context_state_keeps_each_runs_entry_under_its_own_key():
    """Flower shares context.state across a run series: run 2 must not resume run 1's entry."""
    from flwr.app import RecordDict

    from flower_app.records import StateLedger

    store = StateLedger(RecordDict())
    cfg = RunConfig(**SMALL)
    for server_round in (1, 2):
        assert not isinstance(serve(cfg, NodePolicy(), store, server_round, run_id="1"), Refused)
    second = serve(cfg, NodePolicy(), store, 1, run_id="2")
    assert not isinstance(second, Refused), second
    runs = store.runs()
    assert runs["run-1/partition-0"].steps == 6 and runs["run-2/partition-0"].steps == 3


# --- issue 26: the operator's floor fails closed ---------------------------------------------


def parse(**keys):
    return NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2, **keys})


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"max-eps": 8}, "max-eps=8 needs an absolute ledger-dir"),
        # The attack: three ε=8 runs passed lifetime-eps=10 and composed to 13.8.
        ({"lifetime-eps": 10}, "lifetime-eps=10 needs an absolute ledger-dir"),
        ({"max-eps": 8, "ledger-dir": "ledger"}, "ledger-dir='ledger' is not valid; expected an"),
        ({"lifetime-eps": 10, "ledger-dir": "~/ledger"}, "ledger-dir='~/ledger' is not valid"),
        ({"max-eps": math.inf, "ledger-dir": "./l"}, "ledger-dir='./l' is not valid"),
    ],
)
def test_a_finite_limit_without_an_absolute_ledger_dir_is_refused_at_parse_time(keys, match):
    with pytest.raises(PolicyError, match=match) as err:
        parse(**keys)
    assert "\n" not in str(err.value)


def test_an_infinite_max_eps_needs_no_ledger_and_finite_limits_with_one_parse():
    assert math.isinf(parse(**{"max-eps": math.inf}).max_eps)
    policy = parse(**{"max-eps": 8, "lifetime-eps": 32, "ledger-dir": ABS})
    assert (policy.max_eps, policy.lifetime_eps, policy.ledger_dir) == (8, 32, ABS)


def test_max_delta_defaults_to_1e_5_with_a_policy_and_is_checked():
    assert parse(**{"max-eps": 8, "ledger-dir": ABS}).max_delta == 1e-5
    assert parse(**{"max-eps": 8, "ledger-dir": ABS, "max-delta": 1e-6}).max_delta == 1e-6
    assert "max-delta=1e-05" in parse(**{"max-eps": math.inf}).describe()
    for bad in (0, 1, -1e-5, "x", True):
        with pytest.raises(PolicyError, match="max-delta=.* is not valid; expected a number in"):
            parse(**{"max-eps": math.inf, "max-delta": bad})


def test_the_servers_delta_is_refused_above_the_operators_max_delta():
    """Found by attack: under max-eps=8, delta=0.99/n passed and cost ε 9.7 at δ=1e-5."""
    policy = NodePolicy(max_eps=8, has_policy=True)
    reason = _refusal(RunConfig(eps=8.0, delta=0.99 / 20_000), policy, n=20_000)
    assert reason is not None and "delta=4.95e-05 exceeds this node's max-delta=1e-05" in reason
    assert _refusal(RunConfig(eps=8.0, delta=1e-5), policy, n=20_000) is None


def test_the_policy_counts_epsilon_at_the_operators_delta_not_the_runs():
    cfg = RunConfig(eps=2.0, dp_mode="update", delta=1e-9)
    led = plan(cfg, N)
    at_run = led.strict_epsilon(led.planned_steps)
    at_operator = PrivacyLedger(**{**led.to_dict(), "delta": 1e-3}).strict_epsilon(
        led.planned_steps
    )
    assert at_operator < at_run
    between = (at_run + at_operator) / 2
    policy = NodePolicy(max_eps=between, max_delta=1e-3, has_policy=True)
    assert _refusal(cfg, policy) is None
    reason = _refusal(cfg, NodePolicy(max_eps=at_operator * 0.99, max_delta=1e-3, has_policy=True))
    assert reason is not None and "δ=0.001, this node's max-delta" in reason
    # The lifetime too: runs composed at the operator's δ, whatever δ each run asked.
    done = led.at_plan()
    two = lifetime_epsilon([done, done])
    loose = lifetime_epsilon([PrivacyLedger(**{**done.to_dict(), "delta": 1e-3})] * 2)
    life = NodePolicy(lifetime_eps=(two + loose) / 2, max_delta=1e-3, has_policy=True)
    assert _refusal(cfg, life, others=[done]) is None


def test_a_delta_above_one_over_2n_is_refused_and_the_documented_runs_pass():
    reason = _refusal(RunConfig(eps=2.0, delta=0.006), NodePolicy(), n=100)
    assert reason.startswith("delta=0.006 is not valid for this node's 100 examples")
    assert "at most 1/(2n) = 0.005" in reason and "releasing an example" in reason
    assert _refusal(RunConfig(eps=2.0, delta=0.005), NodePolicy(), n=100) is None
    # README defaults (δ=1e-5, ~2,750 examples, 20 nodes: at most 5,319) and the documented
    # 3-node deployment of the whole dataset (at most 24,807 examples per node).
    for n in (2_750, 5_319, 24_807):
        assert _refusal(RunConfig(eps=8.0), NodePolicy(), n=n) is None, n


@pytest.mark.parametrize(
    "keys",
    [{"data-dir": "/srv/my-data.npz"}, {"data-dir": "/srv/d", "allow-seeded-noise": "x"}],
)
def test_a_node_serving_its_own_data_needs_an_explicit_policy(keys):
    match = "data-dir=.* needs a privacy policy|allow-seeded-noise='x'"
    with pytest.raises(PolicyError, match=match):
        parse(**keys)
    with pytest.raises(PolicyError, match="max-eps=inf to accept any run"):
        parse(**{"data-dir": "/srv/my-data.npz"})
    own = parse(**{"data-dir": "/srv/my-data.npz", "max-eps": math.inf})
    assert own.has_policy and not own.allow_seeded_noise


def test_a_node_with_a_policy_ignores_the_runs_data_dir():
    cfg = RunConfig(**SMALL, data_dir="/srv/someone-elses-files")
    calls = []

    def fake_shard(cfg, *args, **kwargs):
        calls.append(cfg.data_dir)
        return shard()

    with mock.patch("flower_app.node.load_shard", side_effect=fake_shard):
        weights = build_model(cfg.model, seed=0).state_dict()
        kw = dict(run_id="r", partition_id=0, num_partitions=2, weights=weights, server_round=1)
        serve_train(cfg, NodePolicy(max_eps=math.inf, has_policy=True), MemoryStore(), **kw)
        assert calls and set(calls) == {""}
        calls.clear()
        serve_train(cfg, NodePolicy(), MemoryStore(), **kw)  # simulation: the run's data-dir
        assert set(calls) == {"/srv/someone-elses-files"}


def test_audit_canaries_need_the_operators_allow_audit():
    cfg = RunConfig(eps=2.0, audit_canaries=10)
    reason = _refusal(cfg, NodePolicy(has_policy=True))
    assert reason is not None and "audit-canaries=10" in reason and "allow-audit=false" in reason
    assert _refusal(cfg, NodePolicy(has_policy=True, allow_audit=True)) is None
    assert _refusal(cfg, NodePolicy()) is None  # simulation: no policy
    assert parse(**{"max-eps": math.inf, "allow-audit": "true"}).allow_audit is True
    assert parse(**{"max-eps": math.inf}).allow_audit is False


@pytest.mark.parametrize("value", ["two", 0, -1, 1.5, True, ""])
def test_torch_threads_is_a_positive_integer_or_one_line(value):
    from flower_app.policy import torch_threads

    with pytest.raises(
        PolicyError, match="torch-threads=.* is not valid; expected an integer >= 1"
    ):
        parse(**{"torch-threads": value})
    assert torch_threads({"torch-threads": 2}) == 2 == torch_threads({"torch-threads": "2"})
    assert torch_threads({}) == 1


def test_the_client_app_replies_a_bad_torch_threads_in_one_line(monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import train
    from flower_app.wire import REFUSAL

    for name, value in (("_task_id", 1), ("_run_id", 5), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    node_config = {"partition-id": 0, "num-partitions": 2, "torch-threads": "two"}
    ctx = Context(5, 1, node_config, RecordDict(), {})
    reply = train(msg, ctx)
    reason = reply.content[REFUSAL]["reason"]
    assert reason.startswith("torch-threads='two' is not valid") and "\n" not in reason


# --- issue 26: the ledger is one transaction, durable, and keyed by run and partition --------


def test_two_concurrent_runs_cannot_both_pass_the_lifetime_check(tmp_path):
    """Both runs read the ledger before either wrote: both passed lifetime-eps and trained."""
    import threading

    from flower_app import node

    cfg = RunConfig(**SMALL)
    # One run's plan costs ε 1.99; with the other's first round (9 steps in all) 2.38.
    policy = NodePolicy(ledger_dir=str(tmp_path), lifetime_eps=2.2, has_policy=True)
    barrier = threading.Barrier(2)
    real_refusal = node.refusal

    def slow_refusal(*args, **kwargs):
        try:
            barrier.wait(timeout=3)  # both checks at once, if the ledger lets them
        except threading.BrokenBarrierError:
            pass
        return real_refusal(*args, **kwargs)

    def fake_round(cfg, *, ledger, **kwargs):
        return node.NodeRound({}, N, 0.0, ledger.after(3), 3)

    weights = build_model(cfg.model, seed=0).state_dict()
    results = {}

    def serve_run(run_id):
        try:
            results[run_id] = serve_train(
                cfg,
                policy,
                FileLedger(tmp_path),
                run_id=run_id,
                partition_id=0,
                num_partitions=2,
                weights=weights,
                server_round=1,
            )
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            results[run_id] = err

    with (
        mock.patch("flower_app.node.load_shard", return_value=shard()),
        mock.patch("flower_app.node.refusal", side_effect=slow_refusal),
        mock.patch("flower_app.node.train_round", side_effect=fake_round),
    ):
        threads = [threading.Thread(target=serve_run, args=(r,)) for r in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    refused_runs = [r for r, out in results.items() if isinstance(out, Refused)]
    assert len(refused_runs) == 1, {r: type(out).__name__ for r, out in results.items()}
    assert len(FileLedger(tmp_path).runs()) == 1


def test_the_ledger_folder_is_fsynced_after_the_rename(tmp_path):
    import os
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    with mock.patch("os.fsync", side_effect=fsync), mock.patch("os.replace", side_effect=replace):
        FileLedger(tmp_path).put("r", PrivacyLedger(1.0, 0.1, 10, 1e-5, "rdp", 20, "sample"))
    assert events[-2:] == ["rename", "fsync-dir"], events


@pytest.mark.parametrize(
    "entry",
    [
        {"steps": 3},
        {**PrivacyLedger(1.0, 0.1, 10, 1e-5, "rdp", 20, "sample").to_dict(), "steps": "x"},
        {**PrivacyLedger(1.0, 0.1, 10, 1e-5, "rdp", 20, "sample").to_dict(), "steps": -5},
        {**PrivacyLedger(1.0, 0.1, 10, 1e-5, "rdp", 20, "sample").to_dict(), "delta": 2},
        "not an object",
    ],
)
def test_a_malformed_ledger_entry_is_one_line_not_a_traceback(tmp_path, entry):
    path = tmp_path / "privacy-ledger.json"
    path.write_text(json.dumps({"format": 1, "runs": {"run-7/partition-0": entry}}))
    with pytest.raises(LedgerError, match="malformed entry 'run-7/partition-0'") as err:
        FileLedger(tmp_path).runs()
    assert "\n" not in str(err.value)


def test_two_partitions_sharing_a_ledger_dir_keep_separate_entries(tmp_path):
    """Keyed by run id alone, partition 1 resumed partition 0's entry (6 steps after 1 round)."""
    cfg = RunConfig(**SMALL)
    policy = NodePolicy(ledger_dir=str(tmp_path), max_eps=8, has_policy=True)
    weights = build_model(cfg.model, seed=0).state_dict()
    with mock.patch("flower_app.node.load_shard", return_value=shard()):
        for pid in (0, 1):
            out = serve_train(
                cfg,
                policy,
                FileLedger(tmp_path),
                run_id="7",
                partition_id=pid,
                num_partitions=2,
                weights=weights,
                server_round=1,
            )
            assert out.ledger.steps == 3, pid
    saved = json.loads((tmp_path / "privacy-ledger.json").read_text())["runs"]
    assert (
        set(saved)
        == {ledger_key("7", 0), ledger_key("7", 1)}
        == {
            "run-7/partition-0",
            "run-7/partition-1",
        }
    )
    assert all(e["steps"] == 3 for e in saved.values())


# --- observer classes: a partner limit and privacy-unit=network (issue 29) ------------------

NODES = 20  # a ring of 20: observers up to 10 hops away
NETWORK = dict(strategy="gossip", dp_mode="update", num_server_rounds=20, eps=8.0)


def _network_refusal(cfg, policy):
    net = network_plan(cfg, NODES)
    ledger = plan(cfg, N, network=net)
    return refusal(policy, cfg, num_samples=N, ledger=ledger, other_runs=(), steps=1, network=net)


def _replacement_eps(sigma, rounds=20):
    """What the node's own releases cost at 2C, by Opacus: independent of the policy's code."""
    return epsilon(noise_multiplier=sigma / 2, sample_rate=1.0, steps=rounds, delta=1e-5)


def test_a_node_refuses_a_network_run_whose_partner_eps_exceeds_its_limit():
    """The attack: eps within max-eps, but privacy-unit=network so far out that σ is small.

    Observers 8 hops away get ε=8, but the node's partners (who receive its own releases)
    get far more. A node whose operator set no partner limit counts max-eps for them too.
    """
    policy = NodePolicy(max_eps=20, has_policy=True)
    assert _refusal(RunConfig(**NETWORK), policy) is None  # the local eps=8 run: 18.8 at 2C
    attack = RunConfig(**NETWORK, privacy_unit="network", network_min_distance=8)
    sigma = network_plan(attack, NODES).noise_multiplier
    partner = _replacement_eps(sigma)
    assert sigma < 2.0 and partner > 30  # local calibration takes σ=2.86
    reason = _network_refusal(attack, policy)
    assert reason == (
        "this run would give observers of the node's own releases (its gossip partners, and "
        f"every node nearer than network-min-distance) ε={partner:.4g} at δ=1e-05, over its "
        "max-eps=20 (its partner limit: no max-partner-eps is set)"
    )
    # An explicit partner limit is checked the same way: below that ε refused, above it not.
    below = NodePolicy(max_eps=20, max_partner_eps=partner - 0.1, has_policy=True)
    assert f"over its max-partner-eps={partner - 0.1:g}" in _network_refusal(attack, below)
    above = NodePolicy(max_eps=20, max_partner_eps=partner + 0.1, has_policy=True)
    assert _network_refusal(attack, above) is None


def test_the_far_class_is_checked_against_max_eps_by_the_nodes_own_accounting():
    cfg = RunConfig(**NETWORK, privacy_unit="network")
    net = network_plan(cfg, NODES)
    graph, schedule = planned_schedule(cfg, NODES)
    # Independent of the calibration's σ = 1 shortcut: the accountant at σ, sensitivity 2C.
    eps = rdp_to_eps(pairwise_rdp(schedule, net.noise_multiplier, sensitivity=2), ORDERS, 1e-5)
    far = max(r["eps_max"] for r in by_distance(eps, graph) if r["distance"] >= 2)
    policy = NodePolicy(max_eps=far - 0.01, max_partner_eps=100, has_policy=True)
    assert _network_refusal(cfg, policy) == (
        f"this run would give observers 2 or more hops away ε={far:.4g} at δ=1e-05 (the "
        "node's own accounting of the schedule drawn from seed), over its "
        f"max-eps={far - 0.01:g}"
    )
    assert _network_refusal(cfg, replace(policy, max_eps=far + 0.01)) is None


def test_a_partner_limit_binds_local_runs_too():
    policy = NodePolicy(max_eps=30, max_partner_eps=10, has_policy=True)
    reason = _refusal(RunConfig(**NETWORK), policy)
    assert reason is not None and reason.endswith("over its max-partner-eps=10")
    none = NodePolicy(max_eps=math.inf, max_partner_eps=10, has_policy=True)
    assert _refusal(RunConfig(eps=math.inf), none, ledger=None) == (
        "eps=inf (no DP) exceeds this node's max-partner-eps=10"
    )


def test_max_partner_eps_parses_needs_a_ledger_and_defaults_to_max_eps():
    policy = parse(**{"max-eps": 8, "max-partner-eps": 12, "ledger-dir": ABS})
    assert (policy.max_partner_eps, policy.partner_limit) == (12, 12)
    assert "max-partner-eps=12 " in policy.describe()
    default = parse(**{"max-eps": 8, "ledger-dir": ABS})
    assert default.max_partner_eps is None and default.partner_limit == 8
    assert "max-partner-eps=8 (= max-eps)" in default.describe()
    with pytest.raises(PolicyError, match="max-partner-eps=12 needs an absolute ledger-dir"):
        parse(**{"max-eps": math.inf, "max-partner-eps": 12})
    with pytest.raises(PolicyError, match="max-partner-eps=0 is not valid"):
        parse(**{"max-partner-eps": 0})


def test_a_node_computes_its_network_sigma_itself_and_a_refusal_spends_nothing():
    cfg = RunConfig(**NETWORK, privacy_unit="network", network_min_distance=8)
    weights = build_model(cfg.model, seed=0).state_dict()

    def serve20(policy, store):
        with mock.patch("flower_app.node.load_shard", return_value=shard()):
            return serve_train(cfg, policy, store, run_id="run-1", partition_id=3,
                               num_partitions=NODES, weights=weights, server_round=1)  # fmt: skip

    store = MemoryStore()
    out = serve20(NodePolicy(max_eps=20, has_policy=True), store)
    assert isinstance(out, Refused) and "no max-partner-eps is set" in out.reason
    assert store.data == {}
    out = serve20(NodePolicy(max_eps=20, max_partner_eps=50, has_policy=True), store)
    sigma = network_plan(cfg, NODES).noise_multiplier
    assert not isinstance(out, Refused) and out.ledger.noise_multiplier == sigma
    # The ledger charges the local ε (its own releases), not the far class's ε=8.
    assert out.ledger.epsilon() == pytest.approx(
        epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=1e-5)
    )
