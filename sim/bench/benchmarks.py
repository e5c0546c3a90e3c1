"""`fl-bench`: where the time of private federated training goes, as ratios from one run.

1. `flower_vs_raw` / `gossip_flower_vs_raw`: a whole run through the real Flower simulation
   path (SuperLink, Ray, ClientApps) divided by the same work done by a plain in-process
   PyTorch loop that trains the nodes one after another with torch's default threads.
2. `dp_vs_plain`: one local epoch of Opacus DP-SGD over one of plain SGD, for every Opacus
   per-sample-gradient mode (each checked against `hooks` with the noise off).
3. `eval_share`: share of a gossip round spent evaluating (every node's model, every round).
4. `scale`: gossip seconds per round and peak memory at growing node counts.
5. `keyed_randomness_share`: share of one DP epoch spent drawing its keyed (ChaCha20) noise
   and Poisson masks.
6. `deploy_round_vs_sim_round`: the steady round of a 3-SuperNode loopback deployment (TLS,
   node auth, the warm `fdg-superexec`) over the same run config simulated with 3 nodes;
   Flower's own subprocess isolation is timed beside it.
7. `gpu_dp_epoch_speedup`, `gpu_round_speedup` (`--only gpu`, `scripts/gpu-check`): a DP
   epoch and a 20-node round on the CPU over the same on CUDA (`sim.bench.gpu`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markdown import Markdown

from flower_app.config import RunConfig
from flower_app.results import write_json
from sim.bench.cli import build_parser
from sim.bench.flower_runs import (
    deploy_vs_sim,
    flower_run,
    flower_vs_raw,
    scale,
    sealed_vs_open,
    steady,
)
from sim.bench.gpu import gpu_results
from sim.bench.local_epoch import epoch_ratios, fastest_correct, keyed_randomness
from sim.bench.sizes import FULL, QUICK, Sizes, run_config_for
from sim.bench.sweep_timing import sweep_vs_cells
from sim.bench.table import markdown
from sim.launch.simulation import SimulationLink

console = Console()


def run_bench(
    sizes: Sizes, log: Callable[[str], None] = console.log, only: str = ""
) -> dict[str, Any]:
    """All measurements (or `only="deploy"`); returns the JSON document."""
    results: dict[str, Any] = {"details": {}}
    if only == "deploy":
        with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp, SimulationLink() as link:
            details = deploy_vs_sim(sizes, link, Path(tmp), log)
        results["deploy_round_vs_sim_round"] = details.pop("ratio")
        results["details"]["deploy"] = details
        return results | environment(sizes)
    if only == "sweep":
        return results | sweep_results(sizes, log) | environment(sizes)
    if only == "sealed":
        return results | sealed_results(sizes, log) | environment(sizes)
    if only == "scale":
        return results | scale_results(sizes, log) | environment(sizes)
    if only == "gpu":
        with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
            return gpu_results(sizes, Path(tmp), log) | environment(sizes)
    cfg_default = RunConfig.from_run_config(dict(sizes.run_config))
    if only == "epoch":  # alone it can afford the repeats a ratio on a shared machine needs
        repeats = max(sizes.epoch_repeats, 5)
        epoch_results(cfg_default, replace(sizes, epoch_repeats=repeats), log, results)
        return results | environment(sizes)
    log("one DP epoch: the share its keyed randomness (ChaCha20) takes")
    keyed = keyed_randomness(cfg_default, sizes.epoch_repeats)
    results["keyed_randomness_share"] = keyed.pop("share")
    results["details"]["keyed_randomness"] = keyed
    if only == "randomness":
        return results | environment(sizes)
    epoch_results(cfg_default, sizes, log, results)
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp, SimulationLink() as link:
        for strategy, key in (("fedavg", "flower_vs_raw"), ("gossip", "gossip_flower_vs_raw")):
            details = flower_vs_raw(sizes, strategy, link, Path(tmp), log)
            results[key] = details.pop("ratio")
            share = details.pop("eval_share")
            if strategy == "gossip":
                results["eval_share"] = share
            results["details"][strategy] = details
        sealed = sealed_vs_open(
            sizes, link, Path(tmp), log, results["details"]["gossip"]["flower_round_s_steady"]
        )
        results["sealed_vs_open_round"] = sealed.pop("ratio")
        results["details"]["gossip"] |= sealed
        log(f"fedavg: {sizes.nodes} nodes x {sizes.rounds} rounds through Flower without DP")
        no_dp = {**run_config_for(sizes, "fedavg"), "eps": float("inf")}
        plain = flower_run(link, no_dp, sizes.nodes, Path(tmp))
        dp_round = results["details"]["fedavg"]["flower_round_s_steady"]
        results["dp_round_vs_plain_round"] = dp_round / steady(plain.rows)
        results["details"]["fedavg_plain_round_s_steady"] = steady(plain.rows)
        results |= scale_growth(scale(sizes, link, Path(tmp), log))
        deploy = deploy_vs_sim(sizes, link, Path(tmp), log)
        results["deploy_round_vs_sim_round"] = deploy.pop("ratio")
        results["details"]["deploy"] = deploy
    sweep = sweep_results(sizes, log)
    results["details"] |= sweep.pop("details")
    return results | sweep | environment(sizes)


def epoch_results(
    cfg: RunConfig, sizes: Sizes, log: Callable[[str], None], results: dict[str, Any]
) -> None:
    """One local epoch, plain against every Opacus mode: `dp_vs_plain` and the details."""
    log("one local epoch: plain SGD vs every Opacus mode")
    epochs = epoch_ratios(cfg, sizes.epoch_repeats)
    results["dp_vs_plain"] = epochs[cfg.opacus_mode]["ratio"]
    results["details"]["epoch"] = epochs
    results["details"]["default_mode"] = cfg.opacus_mode
    fastest = results["details"]["fastest_correct_mode"] = fastest_correct(epochs)
    if fastest != cfg.opacus_mode:
        log(
            f"note: the fastest correct mode here is {fastest}, not the "
            f"default {cfg.opacus_mode} (flower_app/config.py FASTEST_GRAD_SAMPLE_MODE)"
        )


def sealed_results(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """`sealed_vs_open_round` alone: gossip through the open relay, then the sealed one."""
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp, SimulationLink() as link:
        log(f"gossip: {sizes.nodes} nodes x {sizes.rounds} rounds through the open relay")
        open_round = steady(flower_run(link, run_config_for(sizes, "gossip"), sizes.nodes,
                                       Path(tmp)).rows)  # fmt: skip
        details = sealed_vs_open(sizes, link, Path(tmp), log, open_round)
    details["flower_round_s_steady"] = open_round
    return {"sealed_vs_open_round": details.pop("ratio"), "details": {"gossip": details}}


def scale_growth(rows: list[dict[str, float]]) -> dict[str, Any]:
    """`scale` and `scale_per_node_growth` (per-node round cost, largest count / second).

    The second smallest count, not the first: the first run's round also pays what later
    ones find warm.
    """
    small, large = rows[1 if len(rows) > 2 else 0], rows[-1]
    growth = (large["s_per_round"] / large["nodes"]) / (small["s_per_round"] / small["nodes"])
    return {"scale": rows, "scale_per_node_growth": growth - 1}


def scale_results(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """`scale` alone, on a SuperLink of its own."""
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp, SimulationLink() as link:
        return scale_growth(scale(sizes, link, Path(tmp), log))


def sweep_results(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """`sweep_vs_cells` and its details (a fresh SuperLink for each way of running it)."""
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        details = sweep_vs_cells(sizes, Path(tmp), log)
    return {"sweep_vs_cells": details.pop("ratio"), "details": {"sweep": details}}


def environment(sizes: Sizes) -> dict[str, Any]:
    """The machine, the versions and the sizes, for the JSON document."""
    return {
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads_default": torch.get_num_threads(),
            "torch_threads_per_node": 1,
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            **{
                pkg: metadata.version(pkg)
                for pkg in ("flwr", "torch", "opacus", "ray", "numpy", "flower-dp-gossip")
            },
        },
        "sizes": {
            "nodes": sizes.nodes,
            "rounds": sizes.rounds,
            "eps": sizes.eps,
            "run_config": dict(sizes.run_config),
            "scale_config": dict(sizes.scale_config),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """`fl-bench` with this module's sizes (the tests shrink `QUICK`)."""
    return bench(build_parser().parse_args(argv))


def bench(args: argparse.Namespace) -> int:
    """Measure, print the table, and write the JSON document if asked."""
    results = run_bench(QUICK if args.quick else FULL, only=args.only or "")
    console.print(Markdown(markdown(results)))
    if args.json:
        write_json(args.json, results)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
