"""`fl-bench --only gpu` (scripts/gpu-check) without its Flower runs: what it measures and says."""

from __future__ import annotations

import pytest
import torch

from sim.bench import gpu
from sim.bench.sizes import Sizes
from sim.bench.table import markdown

SMALL = Sizes(rounds=2, run_config={"samples-per-node": 64, "test-samples": 100}, epoch_repeats=1)


def _fake_round(nodes):
    """A stand-in for the 20-node Flower run: nodes(device) says where its nodes trained."""

    def run(sizes, device, share, out, log):
        run.calls.append((device, share))
        devices = {"requested": device, "server": device, "nodes": nodes(device)}
        return {"round_s_steady": 1.0, "first_round_s": 2.0, "wall_s": 9.0, "devices": devices}

    run.calls = []
    return run


def _fake_epoch(cpu_s, cuda_s):
    def epoch(cfg, device, repeats):
        s = cpu_s if device.type == "cpu" else cuda_s
        return {"device": str(device), "dp_s": s, "plain_s": 0.5, "examples": 1, "mode": "fast"}

    return epoch


def _pretend_cuda(monkeypatch):
    """CUDA as the check sees it, with nothing to run on (the measurements are doubles)."""
    monkeypatch.setattr(gpu, "cuda_status", lambda: (True, "CUDA: a test double"))
    monkeypatch.setattr(gpu, "resolve_device", torch.device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_without_cuda_it_measures_the_cpu_half_and_says_the_cuda_half_was_skipped(
    tmp_path, monkeypatch
):
    fake = _fake_round(lambda device: {"cpu": 20})
    monkeypatch.setattr(gpu, "simulated_round", fake)
    said = []
    results = gpu.gpu_results(SMALL, tmp_path, said.append)
    assert fake.calls == [("cpu", 0.0)]  # no GPU share asked of a machine without one
    assert results["gpu_dp_epoch_speedup"] is None and results["gpu_round_speedup"] is None
    epoch = results["details"]["gpu"]["epoch_cpu"]
    assert epoch["device"] == "cpu" and epoch["dp_s"] > 0 and epoch["plain_s"] > 0
    skipped = [line for line in said if "SKIPPED" in line]
    assert len(skipped) == 1 and "not checked on a GPU" in skipped[0]
    table = markdown(results)
    assert "CUDA half | SKIPPED" in table and "not checked on a GPU" in table


def test_a_cuda_run_whose_nodes_trained_elsewhere_fails_the_check(tmp_path, monkeypatch):
    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(gpu, "dp_epoch", _fake_epoch(1.0, 1.0))
    fake = _fake_round(lambda device: {"cpu": 20})  # a "cuda" run whose nodes used CPUs
    monkeypatch.setattr(gpu, "simulated_round", fake)
    with pytest.raises(RuntimeError, match="not all on cuda:0"):
        gpu.gpu_results(SMALL, tmp_path, lambda line: None)
    assert fake.calls == [("cpu", 0.0), ("cuda", 1 / 20)]  # 20 nodes share one GPU


def test_with_cuda_it_reports_cpu_over_cuda_for_the_epoch_and_the_round(tmp_path, monkeypatch):
    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(gpu, "dp_epoch", _fake_epoch(2.0, 0.5))
    on = {"cpu": {"cpu": 20}, "cuda": {"cuda:0": 20}}
    monkeypatch.setattr(gpu, "simulated_round", _fake_round(on.__getitem__))
    results = gpu.gpu_results(SMALL, tmp_path, lambda line: None)
    assert results["gpu_dp_epoch_speedup"] == 4.0 and results["gpu_round_speedup"] == 1.0
    assert "gpu_round_speedup (CPU / CUDA) | 1.00" in markdown(results)


def test_fl_bench_offers_the_gpu_check():
    from sim.bench.cli import build_parser

    assert build_parser().parse_args(["--only", "gpu"]).only == "gpu"
