"""Run-config `device`: resolved where the work happens, refused when absent, never a fallback.

These run on CPU-only machines: `auto` must resolve to the CPU, an explicit CUDA device must
be refused in one line (by the node, the ServerApp, preflight and fl-sweep), and the keyed DP
noise must be the same numbers whatever device the parameters live on. The `meta` device
stands in for a GPU where only the device of a tensor matters; the tests marked `cuda` compare
the numbers on a real GPU and are skipped without one.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from opacus.optimizers import DPOptimizer

from client_app.replies import train_reply
from flower_app import keyed_opacus
from flower_app.config import ConfigError, RunConfig
from flower_app.data import to_tensors
from flower_app.device import (
    CPU_INDEX,
    DeviceError,
    check_on,
    cuda_index,
    data_on,
    device_name,
    model_device,
    resolve_device,
)
from flower_app.keyed_opacus import KeyedPoissonSampler, noised, use_keyed_noise
from flower_app.model import build_model
from flower_app.node import local_round, serve_train
from flower_app.policy import NodePolicy
from flower_app.preflight import preflight
from flower_app.records import StateLedger
from flower_app.rng import PrivacyRandomness
from flower_app.wire import DEVICE, METRICS

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks what a machine without CUDA does")
TINY = {"samples-per-node": 40, "test-samples": 50, "batch-size": 8, "num-server-rounds": 2}


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_and_cuda_devices(value):
    assert RunConfig.from_run_config({"device": value}).device == value


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "cuda:0,1", ""])
def test_a_bad_device_is_one_line_naming_key_value_and_what_is_valid(value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"device": value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"device={value!r}")
    assert "auto" in text and "cpu" in text and "cuda:N" in text


@no_cuda
def test_auto_resolves_to_the_cpu_on_a_machine_without_cuda():
    assert RunConfig().device == "auto"
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@cuda
def test_auto_resolves_to_the_first_gpu_where_there_is_one():
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_where_cuda_is_present_auto_takes_it_in_full_float32(monkeypatch):
    """Two pretend GPUs (nothing runs on them): auto is cuda:0, cuda:1 exists, cuda:2 not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(DeviceError, match=r"2 CUDA device\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_an_absent_cuda_device_is_refused_in_one_line(value):
    with pytest.raises(DeviceError) as err:
        resolve_device(value)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"device={value!r} is not available")
    assert "device=auto" in text and "device=cpu" in text  # what is valid here
    assert isinstance(err.value, ConfigError)  # the ClientApp and ServerApp refuse it


@no_cuda
def test_a_node_hidden_from_the_gpus_says_so(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match="no GPU is visible to this process"):
        resolve_device("cuda")


@no_cuda
def test_the_dry_run_refuses_cuda_before_anything_runs():
    with pytest.raises(DeviceError, match="device='cuda' is not available"):
        preflight(RunConfig(device="cuda"), 4)


@no_cuda
def test_the_serverapp_refuses_cuda_in_one_line():
    from server_app.app import prepare
    from server_app.rejections import RunRejected

    grid = mock.Mock()
    grid.get_node_ids.return_value = [1, 2]
    with pytest.raises(RunRejected) as err:
        prepare(grid, {"device": "cuda", **TINY})
    assert str(err.value).startswith("invalid run: device='cuda' is not available")


class _Store:
    """A ledger store that records whether anything was reserved."""

    def __init__(self):
        self.reserved = False

    def reserve(self, key, decide):
        self.reserved = True
        raise AssertionError("a refused device must spend nothing")


@no_cuda
def test_a_node_refuses_cuda_before_it_loads_its_shard_or_spends_anything():
    store = _Store()
    with pytest.raises(DeviceError):
        serve_train(
            RunConfig.from_run_config({"device": "cuda", "eps": 8.0, **TINY}),
            NodePolicy(),
            store,
            run_id="r",
            partition_id=0,
            num_partitions=2,
            weights=build_model("cnn", seed=0).state_dict(),
            server_round=1,
        )
    assert not store.reserved


@pytest.mark.parametrize("eps", [8.0, float("inf")])
def test_device_cpu_trains_end_to_end_and_the_reply_says_where(eps):
    cfg = RunConfig.from_run_config({"device": "cpu", "eps": eps, "noise-seed": 1, **TINY})
    out = local_round(
        cfg,
        partition_id=0,
        num_partitions=2,
        weights=build_model("cnn", seed=0).state_dict(),
        ledger=None,
        server_round=1,
    )
    assert out.device == "cpu"
    assert all(t.device.type == "cpu" for t in out.state_dict.values())
    assert train_reply(out, 0)[METRICS][DEVICE] == CPU_INDEX


def test_serve_train_reports_the_device_the_node_resolved():
    cfg = RunConfig.from_run_config({"eps": 8.0, "noise-seed": 1, **TINY})  # device=auto
    out = serve_train(
        cfg,
        NodePolicy(),
        StateLedger(RecordDict()),
        run_id="r",
        partition_id=1,
        num_partitions=2,
        weights=build_model("cnn", seed=0).state_dict(),
        server_round=1,
    )
    assert out.device == str(resolve_device("auto"))


def test_device_index_round_trips_for_the_reply_metric():
    assert cuda_index("cpu") == CPU_INDEX and device_name(CPU_INDEX) == "cpu"
    assert cuda_index(torch.device("cuda", 2)) == 2 and device_name(2) == "cuda:2"
    assert cuda_index("cuda") == 0


def test_a_model_off_the_asked_device_raises_rather_than_computing_elsewhere():
    model = build_model("mlp", seed=0)
    check_on(model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="not on meta"):
        check_on(model, torch.device("meta"))
    model.net[1].to("meta")  # one layer elsewhere: no single device to compute on
    with pytest.raises(RuntimeError, match="expected one device"):
        model_device(model)


def test_data_moves_to_the_device_once_and_stays_put_when_there():
    rng = np.random.default_rng(0)
    data = to_tensors("fashion-mnist", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
                      np.arange(6))  # fmt: skip
    assert data_on(torch.device("cpu"), data) is data
    moved = data_on(torch.device("meta"), data)
    assert all(t.device.type == "meta" for t in moved.tensors) and len(moved) == 6


# The keyed noise: drawn on the CPU in float64, then moved to the parameter's device.


def _noise(like):
    return PrivacyRandomness.replayable(5).noise.gaussians(2.0, like)


def test_the_keyed_noise_for_a_key_is_the_same_whatever_the_targets_device():
    shapes = [(3, 4), (7,), (2, 1, 3, 3)]
    on_cpu = _noise([torch.zeros(s) for s in shapes])
    on_meta = _noise([torch.zeros(s, device="meta") for s in shapes])
    for a, b in zip(on_cpu, on_meta, strict=True):
        assert a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float64
        assert torch.equal(a, b)


def test_noised_adds_in_float64_and_lands_on_the_sums_device_in_its_dtype():
    summed = torch.linspace(-1, 1, 12).view(3, 4)
    noise = _noise([summed])[0]
    out = noised(summed, noise)
    assert out.dtype == torch.float32
    assert torch.equal(out, (summed.double() + noise).float())
    elsewhere = noised(summed.to("meta"), noise)
    assert elsewhere.device.type == "meta" and elsewhere.dtype == torch.float32


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=torch.float64, device="meta")]
)
def test_noise_not_drawn_by_the_keyed_stream_on_the_cpu_is_refused(bad):
    with pytest.raises(RuntimeError, match="keyed stream"):
        noised(torch.zeros(3), bad)


def test_opacus_adds_the_cpu_drawn_keyed_noise_to_parameters_on_another_device():
    """Parameters on `meta` (a stand-in for a GPU): the noise is still the CPU keyed draw.

    torch's generators are switched off, so nothing but the keyed stream can draw it.
    """
    shapes = [(3, 4), (5,)]
    params = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in shapes]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.5, max_grad_norm=2.0,
                      expected_batch_size=4)  # fmt: skip
    use_keyed_noise(opt, PrivacyRandomness.replayable(5).noise)
    for p in params:
        p.summed_grad = torch.zeros(p.shape, device="meta")
    seen = []

    def spy(summed, noise):
        seen.append(noise)
        return noised(summed, noise)

    forbidden = mock.Mock(side_effect=AssertionError("torch's generator drew DP noise"))
    with (
        mock.patch.object(keyed_opacus, "noised", spy),
        mock.patch("torch.normal", forbidden),
        mock.patch("torch.randn", forbidden),
    ):
        opt.add_noise()
    expected = PrivacyRandomness.replayable(5).noise.gaussians(1.5 * 2.0, params)
    (got,) = seen  # one draw for all parameters
    assert got.device.type == "cpu" and torch.equal(got, torch.cat([e.flatten() for e in expected]))
    for p in params:
        assert p.grad.device.type == "meta" and p.grad.shape == p.shape


def _batches(data):
    sampler = KeyedPoissonSampler(num_samples=len(data), sample_rate=0.2, steps=6,
                                  stream=PrivacyRandomness.replayable(3).sampling)  # fmt: skip
    return [(idx, data.__getitems__(idx)) for idx in sampler]


def test_poisson_batches_are_drawn_on_the_cpu_whatever_the_datas_device():
    rng = np.random.default_rng(0)
    data = to_tensors("fashion-mnist", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                      np.arange(50))  # fmt: skip
    on_cpu, on_meta = _batches(data), _batches(data_on(torch.device("meta"), data))
    assert [idx for idx, _ in on_cpu] == [idx for idx, _ in on_meta]  # the same examples
    for idx, (x, y) in on_meta:
        assert x.device.type == "meta" and len(y) == len(idx)  # gathered where the data is
    assert sum(len(idx) for idx, _ in on_cpu) > 0


@cuda
def test_a_dp_round_on_the_gpu_adds_the_very_noise_the_cpu_adds():
    """Same key, same weights: the noised gradients agree (the clipped sums to float32)."""
    ends = {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig.from_run_config({"device": device, "eps": 8.0, "noise-seed": 1, **TINY})
        out = local_round(cfg, partition_id=0, num_partitions=2, ledger=None, server_round=1,
                          weights=build_model("cnn", seed=0).state_dict())  # fmt: skip
        assert out.device.startswith(device)
        ends[device] = out.state_dict
    for k, v in ends["cpu"].items():
        assert torch.allclose(v, ends["cuda"][k], atol=1e-4), k


# Where the ServerApp evaluates and what summary.json says.


def test_the_summary_counts_nodes_by_the_device_they_reported():
    from server_app.evaluation import devices_used

    reports = {0: {DEVICE: 0}, 1: {DEVICE: 0}, 2: {DEVICE: CPU_INDEX}, 3: {}}
    got = devices_used(RunConfig(device="cpu"), reports)
    assert got == {"requested": "cpu", "server": "cpu", "nodes": {"cpu": 1, "cuda:0": 2}}


def test_the_server_evaluates_on_its_resolved_device():
    from server_app.evaluation import model_evaluator, server_device

    cfg = RunConfig(device="cpu", model="mlp")
    assert server_device(cfg) == torch.device("cpu")
    rng = np.random.default_rng(0)
    test = to_tensors("fashion-mnist", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, 20))  # fmt: skip
    arrays = [p.detach().numpy() for p in build_model("mlp", seed=0).state_dict().values()]
    loss, accuracy = model_evaluator(cfg, test)(arrays)
    assert np.isfinite(loss) and 0 <= accuracy <= 1


# Simulation: Flower's client-resources-num-gpus, and the local Ray head's GPUs.


def test_a_simulation_link_asks_flower_for_each_nodes_share_of_a_gpu(tmp_path):
    from sim.launch.simulation import SimulationLink

    for share, want in ((0.0, "client-resources-num-gpus=0.0"),
                        (0.25, "client-resources-num-gpus=0.25")):  # fmt: skip
        link = SimulationLink(flwr_home=tmp_path / str(share), gpus_per_node=share)
        with mock.patch.object(link.cli, "submit", return_value="1") as submit:
            link.submit({}, num_nodes=20, app_dir=tmp_path)
        config = submit.call_args.kwargs["federation_config"]
        assert "num-supernodes=20" in config and want in config
        head = link.ray_head
        assert head is not None and head.gpus == (share > 0)
        command = head.command(tmp_path)
        if share:  # Ray counts the machine's GPUs; the nodes see theirs
            assert not any(a.startswith("--num-gpus") for a in command)
            assert "CUDA_VISIBLE_DEVICES" not in head.env or head.env["CUDA_VISIBLE_DEVICES"]
        else:  # no GPU offered, and none visible to a node given no share
            assert "--num-gpus=0" in command and head.env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("share", "devices", "words"),
    [
        (1.5, ["auto"], "a share in [0, 1]"),
        (0.0, ["auto", "cuda:1"], "device='cuda:1' needs --gpus-per-node > 0"),
        pytest.param(0.25, ["auto"], "torch sees none", marks=no_cuda),
    ],
)
def test_fl_sweep_refuses_a_gpu_share_that_cannot_work_in_one_line(share, devices, words):
    from sim.sweeps.flags import check_gpus
    from sim.sweeps.spec import SweepError

    with pytest.raises(SweepError) as err:
        check_gpus(share, devices)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_fl_sweep_takes_gpus_per_node_and_passes_it_to_every_link():
    from sim.sweeps.cli import make_links
    from sim.sweeps.flags import build_parser, check_gpus

    args = build_parser().parse_args(["run", "--preset", "quick", "--gpus-per-node", "0.5"])
    assert args.gpus_per_node == 0.5
    assert build_parser().parse_args(["run", "--preset", "quick"]).gpus_per_node == 0.0
    check_gpus(0.0, ["auto", "cpu"])  # the default passes everywhere
    links = make_links(2, ["127.0.0.1:1", "127.0.0.1:2"], gpus_per_node=0.5)
    assert [link.gpus_per_node for link in links] == [0.5, 0.5]


@no_cuda
def test_the_python_api_passes_the_gpu_share_and_is_refused_without_a_gpu(tmp_path):
    from sim import api
    from sim.sweeps.spec import SweepError

    assert api.option_flags({"gpus_per_node": 0.25}) == ["--gpus-per-node", "0.25"]
    with pytest.raises(SweepError, match="--gpus-per-node 0.25 needs a GPU"):
        api.sweep(preset="quick", seeds=7, eps=8, strategies="fedavg", gpus_per_node=0.25,
                  dry_run=True, out=tmp_path / "s")  # fmt: skip
