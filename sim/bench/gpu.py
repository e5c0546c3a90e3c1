"""`fl-bench --only gpu`: a DP epoch and a 20-node simulated round, on the CPU and on CUDA.

One prepared check for a machine with a GPU (issue 31, item 3), sized to finish well within
ten minutes: the default model and batch size's DP epoch (default `grad-sample-mode`, keyed
noise) on the CPU with one thread (as a simulated node trains) against `cuda`, and the steady
round of a 20-node FedAvg simulation with `device=cpu` against `device=cuda` with each node
taking 1/20 of the GPU (`client-resources-num-gpus`). The GPU run's `summary.json` must say
that every node trained on CUDA: a run that fell back to the CPU fails the check.

Without CUDA the CPU half runs and the CUDA half is skipped, with one line saying why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flower_app.config import RunConfig
from flower_app.device import data_on, resolve_device
from flower_app.model import build_model
from flower_app.privacy import plan_ledger
from flower_app.rng import PrivacyRandomness
from flower_app.shards import shard_for
from flower_app.train import train_dp, train_plain
from sim.bench.flower_runs import flower_run, steady
from sim.bench.sizes import Sizes, run_config_for
from sim.launch.simulation import SimulationLink

GPU_NODES = 20  # the round the issue asks for


def cuda_status() -> tuple[bool, str]:
    """Whether torch can use CUDA here, and one line saying what it sees."""
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda}"
    if not torch.cuda.is_available():
        return False, f"CUDA is not available here ({build}, no device visible)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"CUDA: {', '.join(names)} ({build})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dp_epoch(cfg: RunConfig, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds of one plain and one DP epoch on `device` (min over repeats, after a warm-up).

    Partition 0 of 20, the default model, batch size and Opacus mode, σ for ε = 8 over 20
    epochs, keyed noise; one torch thread on the CPU, as a simulated node trains.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = data_on(device, shard_for(cfg, 0, GPU_NODES))
        ledger = plan_ledger(num_samples=len(data), batch_size=cfg.batch_size, total_epochs=20,
                             target_eps=8.0, delta=cfg.delta, accountant="rdp")  # fmt: skip
        common = {"epochs": 1, "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": 0.0}
        times: dict[str, list[float]] = {"plain": [], "dp": []}
        for i in range(repeats + 1):  # the first of each is a warm-up (CUDA context, kernels)
            for kind in times:
                model = build_model(cfg.model, seed=0).to(device)
                _sync(device)
                t0 = time.perf_counter()
                if kind == "plain":
                    train_plain(model, data, generator=torch.Generator().manual_seed(0), **common)
                else:
                    train_dp(model, data, ledger, max_grad_norm=cfg.max_grad_norm,
                             grad_sample_mode=cfg.opacus_mode,
                             randomness=PrivacyRandomness.replayable(0), **common)  # fmt: skip
                _sync(device)
                if i:
                    times[kind].append(time.perf_counter() - t0)
        return {
            "device": str(device),
            "plain_s": min(times["plain"]),
            "dp_s": min(times["dp"]),
            "examples": len(data),
            "mode": cfg.opacus_mode,
        }
    finally:
        torch.set_num_threads(threads)


def simulated_round(
    sizes: Sizes, device: str, gpus_per_node: float, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The steady round of a 20-node FedAvg run on `device`, and where its nodes trained."""
    log(
        f"gpu: {GPU_NODES} nodes x {sizes.rounds} rounds, device={device}, "
        f"client-resources-num-gpus={gpus_per_node:g}"
    )
    config = {**run_config_for(sizes, "fedavg"), "device": device}
    out.mkdir(parents=True)  # this run's folder is the only one in it
    with SimulationLink(gpus_per_node=gpus_per_node) as link:
        timing = flower_run(link, config, GPU_NODES, out)
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    devices = json.loads((folder / "summary.json").read_text()).get("devices", {})
    return {
        "round_s_steady": steady(timing.rows),
        "first_round_s": float(timing.rows[0]["round_s"]),
        "wall_s": timing.wall_s,
        "devices": devices,
    }


def gpu_results(sizes: Sizes, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """`gpu_dp_epoch_speedup`, `gpu_round_speedup` (CPU time / CUDA time; None without CUDA).

    Every time is in `details.gpu`; without CUDA the CPU half is measured and the rest skipped.
    """
    available, line = cuda_status()
    log(line)
    cfg = RunConfig.from_run_config(dict(sizes.run_config))
    details: dict[str, Any] = {"cuda": line}
    log("gpu: one DP epoch on the CPU (one thread)")
    details["epoch_cpu"] = dp_epoch(cfg, torch.device("cpu"), sizes.epoch_repeats)
    details["round_cpu"] = simulated_round(sizes, "cpu", 0.0, out / "cpu", log)
    results: dict[str, Any] = {"gpu_dp_epoch_speedup": None, "gpu_round_speedup": None}
    if not available:
        log(f"gpu: the CUDA half is SKIPPED: {line}; not checked on a GPU")
        return results | {"details": {"gpu": details}}
    log("gpu: one DP epoch on cuda")
    details["epoch_cuda"] = dp_epoch(cfg, resolve_device("cuda"), sizes.epoch_repeats)
    details["round_cuda"] = simulated_round(sizes, "cuda", 1 / GPU_NODES, out / "cuda", log)
    nodes = details["round_cuda"]["devices"].get("nodes", {})
    if set(nodes) != {"cuda:0"}:
        raise RuntimeError(f"the device=cuda run's nodes trained on {nodes}, not all on cuda:0")
    results["gpu_dp_epoch_speedup"] = details["epoch_cpu"]["dp_s"] / details["epoch_cuda"]["dp_s"]
    results["gpu_round_speedup"] = (
        details["round_cpu"]["round_s_steady"] / details["round_cuda"]["round_s_steady"]
    )
    return results | {"details": {"gpu": details}}
