"""`fl-bench`'s runs through Flower: timed, against the plain loop, at scale, deployed.

Every run goes through the real `flwr run` path (an owned simulation SuperLink, or a
3-SuperNode loopback deployment) and is timed from submission to completion; its
per-round seconds come from the run's own rounds.csv.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from sim.bench.plain_loop import raw_run
from sim.bench.sizes import ON_CPU, OPEN_RELAY, Sizes, run_config_for
from sim.launch.deployment import Deployment
from sim.launch.simulation import SimulationLink


@dataclass
class FlowerTiming:
    """One run through Flower: total wall seconds, per-round rows, peak memory."""

    wall_s: float
    rows: list[dict[str, str]]
    peak_rss_mb: float


class PeakRSS:
    """Polls the summed RSS of a process tree in a background thread."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        """Watch `pid` and all its descendants."""
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        """Start polling."""
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join()


def flower_run(
    link: SimulationLink, run_config: Mapping[str, Any], num_nodes: int, out: Path
) -> FlowerTiming:
    """Run through the real `flwr run` path and time it from submission to completion."""
    name = f"bench-{run_config['strategy']}-{num_nodes}-{time.time_ns()}"
    cfg = {**run_config, "results-dir": str(out), "run-name": name}
    assert link.pid is not None
    with PeakRSS(link.pid) as rss:
        t0 = time.perf_counter()
        outcome = link.run(cfg, num_nodes=num_nodes, timeout=7200)
        wall = time.perf_counter() - t0
    if not outcome.completed:
        raise RuntimeError(f"benchmark run failed: {outcome.status}: {outcome.details}")
    with (out / name / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return FlowerTiming(wall, rows, rss.peak / 2**20)


def steady(rows: list[dict[str, str]], key: str = "round_s") -> float:
    """Mean of `key` over rounds after the first (which also pays for worker start-up)."""
    values = [float(r[key]) for r in rows[1:]] or [float(r[key]) for r in rows]
    return float(np.mean(values))


def flower_vs_raw(
    sizes: Sizes, strategy: str, link: SimulationLink, out: Path, log: Callable[[str], None]
) -> dict[str, float]:
    """One strategy's run through Flower and as a plain loop: the ratio and its parts."""
    run_config = run_config_for(sizes, strategy)
    log(f"{strategy}: {sizes.nodes} nodes x {sizes.rounds} rounds through Flower")
    flower = flower_run(link, run_config, sizes.nodes, out)
    log(f"{strategy}: the same as a plain loop")
    raw, raw_rounds = raw_run(run_config, sizes.nodes)
    raw_steady = float(np.mean(raw_rounds[1:] or raw_rounds))
    later = flower.rows[1:]
    return {
        "ratio": flower.wall_s / raw,
        "flower_wall_s": flower.wall_s,
        "raw_wall_s": raw,
        "raw_round_s_steady": raw_steady,
        "flower_vs_raw_per_round": steady(flower.rows) / raw_steady,
        "flower_round_s_steady": steady(flower.rows),
        "flower_first_round_s": float(flower.rows[0]["round_s"]),
        "eval_s_steady": steady(flower.rows, "eval_s"),
        "eval_share": sum(float(r["eval_s"]) for r in later)
        / max(sum(float(r["round_s"]) for r in later), 1e-9),
    }


def sealed_vs_open(
    sizes: Sizes, link: SimulationLink, out: Path, log: Callable[[str], None], open_round: float
) -> dict[str, float]:
    """Gossip's steady round with the sealed relay against the open one (same run config).

    `open_round` is the open relay's steady round from `flower_vs_raw`. Sealed rounds add one
    Flower round trip per gossip exchange and the nodes' sealing; the ratio is that cost.
    """
    log(f"gossip: {sizes.nodes} nodes x {sizes.rounds} rounds through the sealed relay")
    config = {**run_config_for(sizes, "gossip"), "gossip-relay": "sealed"}
    sealed = steady(flower_run(link, config, sizes.nodes, out).rows)
    return {"ratio": sealed / open_round, "sealed_round_s_steady": sealed}


def scale(
    sizes: Sizes, link: SimulationLink, out: Path, log: Callable[[str], None]
) -> list[dict[str, float]]:
    """Gossip's steady seconds per round and peak memory at each node count."""
    rows = []
    for n in sizes.scale_nodes:
        log(f"scale: gossip with {n} nodes")
        run_config = {
            "strategy": "gossip",
            "eps": sizes.eps,
            "num-server-rounds": sizes.scale_rounds,
            **ON_CPU,
            **sizes.scale_config,
            **OPEN_RELAY,
        }
        timing = flower_run(link, run_config, n, out)
        rows.append(
            {
                "nodes": n,
                "s_per_round": steady(timing.rows),
                "peak_rss_mb": timing.peak_rss_mb,
                "first_round_s": float(timing.rows[0]["round_s"]),
            }
        )
    return rows


def deploy_vs_sim(
    sizes: Sizes, link: SimulationLink, out: Path, log: Callable[[str], None]
) -> dict[str, float]:
    """Steady round: 3 SuperNodes on loopback (warm, then Flower's subprocess) vs simulated."""
    config = dict(sizes.deploy_config)
    log("deploy: the run config simulated with 3 nodes")
    sim = steady(flower_run(link, config, 3, out).rows)
    rounds = {}
    for warm in (True, False) if sizes.deploy_subprocess else (True,):
        name = "warm" if warm else "subprocess"
        log(f"deploy: 3 SuperNodes on loopback, {name} ClientApps")
        with Deployment(out / f"deploy-{name}", 3, warm=warm, startup_timeout=300) as d:
            run_name = f"run-{name}"
            run_id = d.submit({**config, "num-nodes": 3, "results-dir": str(out),
                               "run-name": run_name})  # fmt: skip
            outcome = d.wait(run_id, timeout=3600)
            if not outcome.completed:
                raise RuntimeError(f"deployment run failed: {outcome.status}: {outcome.details}")
        with (out / run_name / "rounds.csv").open() as fh:
            rounds[name] = steady(list(csv.DictReader(fh)))
    out_rows = {
        "ratio": rounds["warm"] / sim,
        "sim_round_s_steady": sim,
        "deploy_round_s_steady": rounds["warm"],
    }
    if "subprocess" in rounds:
        out_rows["deploy_subprocess_round_s_steady"] = rounds["subprocess"]
        out_rows["subprocess_vs_sim"] = rounds["subprocess"] / sim
    return out_rows
