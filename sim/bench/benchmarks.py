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
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from rich.console import Console
from rich.markdown import Markdown

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.gossip import apply_pairs, mean_model, random_matching
from flower_app.model import GRAD_SAMPLE_MODES, build_model
from flower_app.node import local_round, shard_for
from flower_app.privacy import plan_ledger
from flower_app.records import ARRAYS, NUM_EXAMPLES, train_reply
from flower_app.results import write_json
from flower_app.rng import PrivacyRandomness
from flower_app.topology import build_topology
from flower_app.train import train_dp, train_plain
from server_app.evaluation import central_test_sets, model_evaluator
from sim.launch.deployment import Deployment
from sim.launch.simulation import SimulationLink
from strategies.gossip import Layout

console = Console()


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is."""

    nodes: int = 20
    rounds: int = 5
    eps: float = 8.0
    run_config: Mapping[str, Any] = field(default_factory=dict)
    epoch_repeats: int = 3
    scale_nodes: tuple[int, ...] = (20, 100, 1000)
    scale_rounds: int = 3
    scale_config: Mapping[str, Any] = field(
        default_factory=lambda: {
            "samples-per-node": 20,
            "test-samples": 500,
            "node-eval-samples": 100,
        }
    )
    deploy_config: Mapping[str, Any] = field(
        default_factory=lambda: {
            "strategy": "fedavg",
            "eps": 8.0,
            "num-server-rounds": 5,
            "samples-per-node": 500,
            "test-samples": 1000,
        }
    )
    # Also time Flower's own subprocess isolation (a fresh process per message).
    deploy_subprocess: bool = True


FULL = Sizes()
QUICK = Sizes(
    nodes=20,
    rounds=3,
    run_config={"samples-per-node": 300, "test-samples": 2000},
    epoch_repeats=2,
    scale_nodes=(10, 20, 40),
    scale_rounds=3,
    deploy_subprocess=False,
)


# The plain loop averages gossip models on the server, as the open relay does: gossip runs
# here pin it, so the ratios keep measuring what they measured before gossip-relay existed.
OPEN_RELAY = {"gossip-relay": "open"}


def _cfg(sizes: Sizes, strategy: str) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "eps": sizes.eps,
        "num-server-rounds": sizes.rounds,
        **sizes.run_config,
        **OPEN_RELAY,
    }


# --- the plain loop --------------------------------------------------------------------


def raw_run(run_config: Mapping[str, Any], num_nodes: int) -> tuple[float, list[float]]:
    """Seconds for the whole run, and per round, as a plain loop (as the tutorial does it).

    Same data, model, DP, rounds, node count and seed as the Flower run; nodes train one
    after another with torch's default threads. Aggregation, gossip averaging and
    evaluation are the app's own code (Flower's FedAvg sum, the Gossip strategy's layout
    and pairing, the ServerApp's test sets and evaluator); only the transport is missing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default: one thread per core
    try:
        t0 = time.perf_counter()
        cfg = RunConfig.from_run_config(run_config)
        test, node_test = central_test_sets(cfg)
        evaluate_central, evaluate_node = (
            model_evaluator(cfg, test),
            model_evaluator(cfg, node_test),
        )
        start = ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict())
        layout = Layout(start)
        models = dict.fromkeys(range(num_nodes), start)
        ledgers: dict[int, Any] = dict.fromkeys(range(num_nodes))
        graph = build_topology(cfg.topology, num_nodes, seed=cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        round_s = []
        for server_round in range(1, cfg.num_server_rounds + 1):
            t_round = time.perf_counter()
            replies = {}
            for v in range(num_nodes):
                out = local_round(
                    cfg,
                    partition_id=v,
                    num_partitions=num_nodes,
                    weights=models[v].to_torch_state_dict(),
                    ledger=ledgers[v],
                    server_round=server_round,
                )
                ledgers[v] = out.ledger
                replies[v] = train_reply(out, v)
            if cfg.strategy == "fedavg":
                avg = aggregate_arrayrecords(list(replies.values()), NUM_EXAMPLES)
                models = dict.fromkeys(range(num_nodes), avg)
                evaluate_central(avg.to_numpy_ndarrays())
            else:
                flat = {v: layout.flatten(r[ARRAYS]) for v, r in replies.items()}
                flat = apply_pairs(flat, random_matching(graph, rng), sequential=False)
                models = {v: layout.to_record(x) for v, x in flat.items()}
                evaluate_central(layout.unflatten(mean_model(flat)))
                for x in flat.values():
                    evaluate_node(layout.unflatten(x))
            round_s.append(time.perf_counter() - t_round)
        return time.perf_counter() - t0, round_s
    finally:
        torch.set_num_threads(threads)


# --- Flower runs -----------------------------------------------------------------------


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


# --- one local epoch -------------------------------------------------------------------


def epoch_ratios(cfg: RunConfig, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds of one local epoch per mode (min over repeats) and the ratio to plain SGD.

    Every mode is also run with the noise off from the same start and the same Poisson
    batches, and its result compared with `hooks`: a fast mode must compute the same
    clipped update.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated node trains
    try:
        data = shard_for(cfg, 0, 20)
        common = {"epochs": 1, "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": 0.0}
        ledger = plan_ledger(
            num_samples=len(data),
            batch_size=cfg.batch_size,
            total_epochs=20,
            target_eps=8.0,
            delta=cfg.delta,
            accountant="rdp",
        )
        times: dict[str, list[float]] = {m: [] for m in ("plain", *GRAD_SAMPLE_MODES)}
        for _ in range(repeats):  # interleaved, so drifting load hits every mode alike
            for mode in times:
                model = build_model(cfg.model, seed=0)
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                if mode == "plain":
                    train_plain(model, data, generator=gen, **common)
                else:
                    train_dp(
                        model,
                        data,
                        ledger,
                        max_grad_norm=cfg.max_grad_norm,
                        grad_sample_mode=mode,
                        randomness=PrivacyRandomness.replayable(0),
                        **common,
                    )
                times[mode].append(time.perf_counter() - t0)
        plain = min(times["plain"])
        reference = _noiseless_update(cfg, data, "hooks")
        out: dict[str, dict[str, Any]] = {"plain": {"s": plain, "ratio": 1.0}}
        for mode in GRAD_SAMPLE_MODES:
            diff = float(
                max(
                    (a - b).abs().max()
                    for a, b in zip(reference, _noiseless_update(cfg, data, mode), strict=True)
                )
            )
            out[mode] = {
                "s": min(times[mode]),
                "ratio": min(times[mode]) / plain,
                "diff": diff,
                "empty_batches_ok": _survives_empty_batches(cfg, mode),
            }
        return out
    finally:
        torch.set_num_threads(threads)


def keyed_randomness(cfg: RunConfig, repeats: int) -> dict[str, float]:
    """Seconds one DP epoch spends drawing its keyed randomness, and one DP epoch's seconds.

    The randomness is what `train_dp` draws per step (a Poisson mask over the shard and a
    Gaussian per parameter, from `flower_app.rng`), timed alone; the epoch is the default
    mode's whole DP epoch (randomness included). Min over repeats, one torch thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = shard_for(cfg, 0, 20)
        ledger = plan_ledger(num_samples=len(data), batch_size=cfg.batch_size, total_epochs=20,
                             target_eps=8.0, delta=cfg.delta, accountant="rdp")  # fmt: skip
        params = [p for p in build_model(cfg.model).parameters()]
        steps = round(1 / ledger.sample_rate)
        draw, epoch = [], []
        for _ in range(repeats):
            rand = PrivacyRandomness.fresh()
            t0 = time.perf_counter()
            for _ in range(steps):
                rand.sampling.bernoulli(len(data), ledger.sample_rate)
                rand.noise.gaussians(1.0, params)
            draw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_dp(build_model(cfg.model, seed=0), data, ledger, epochs=1,
                     batch_size=cfg.batch_size, lr=cfg.lr, momentum=0.0,
                     max_grad_norm=cfg.max_grad_norm, grad_sample_mode=cfg.opacus_mode)  # fmt: skip
            epoch.append(time.perf_counter() - t0)
        return {"randomness_s": min(draw), "dp_epoch_s": min(epoch), "steps": steps,
                "share": min(draw) / min(epoch)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _survives_empty_batches(cfg: RunConfig, mode: str) -> bool:
    """Poisson sampling draws empty batches on small shards; a correct mode must train on."""
    rng = np.random.default_rng(0)
    data = to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100).astype(np.int64),
    )
    ledger = plan_ledger(
        num_samples=100,
        batch_size=1,
        total_epochs=1,
        target_eps=8.0,
        delta=cfg.delta,
        accountant="rdp",
    )  # expected batch of 1: about a third of the batches are empty
    try:
        train_dp(
            build_model(cfg.model, seed=0),
            data,
            ledger,
            epochs=1,
            batch_size=1,
            lr=cfg.lr,
            momentum=0.0,
            max_grad_norm=cfg.max_grad_norm,
            grad_sample_mode=mode,
            randomness=PrivacyRandomness.replayable(0),
        )
    except RuntimeError:
        return False
    return True


def fastest_correct(epoch: Mapping[str, Mapping[str, Any]]) -> str:
    """The fastest Opacus mode that matches hooks and survives empty batches."""
    ok = [m for m in GRAD_SAMPLE_MODES if epoch[m]["diff"] < 1e-4 and epoch[m]["empty_batches_ok"]]
    return min(ok, key=lambda m: epoch[m]["s"])


def _noiseless_update(cfg: RunConfig, data: Any, mode: str) -> list[torch.Tensor]:
    model = build_model(cfg.model, seed=0)
    ledger = replace(
        plan_ledger(
            num_samples=len(data),
            batch_size=cfg.batch_size,
            total_epochs=1,
            target_eps=8.0,
            delta=cfg.delta,
            accountant="rdp",
        ),
        noise_multiplier=0.0,
    )
    train_dp(
        model,
        data,
        ledger,
        epochs=1,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=0.0,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=mode,
        randomness=PrivacyRandomness.replayable(1),
    )
    return [p.detach().clone() for p in model.parameters()]


# --- the benchmark ---------------------------------------------------------------------


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
    cfg_default = RunConfig.from_run_config(dict(sizes.run_config))
    log("one DP epoch: the share its keyed randomness (ChaCha20) takes")
    keyed = keyed_randomness(cfg_default, sizes.epoch_repeats)
    results["keyed_randomness_share"] = keyed.pop("share")
    results["details"]["keyed_randomness"] = keyed
    if only == "randomness":
        return results | environment(sizes)
    log("one local epoch: plain SGD vs every Opacus mode")
    epochs = epoch_ratios(cfg_default, sizes.epoch_repeats)
    results["dp_vs_plain"] = epochs[cfg_default.opacus_mode]["ratio"]
    results["details"]["epoch"] = epochs
    results["details"]["default_mode"] = cfg_default.opacus_mode
    fastest = results["details"]["fastest_correct_mode"] = fastest_correct(epochs)
    if fastest != cfg_default.opacus_mode:
        log(
            f"note: the fastest correct mode here is {fastest}, not the "
            f"default {cfg_default.opacus_mode} (flower_app/model.py FASTEST_GRAD_SAMPLE_MODE)"
        )
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp, SimulationLink() as link:
        for strategy, key in (("fedavg", "flower_vs_raw"), ("gossip", "gossip_flower_vs_raw")):
            details = flower_vs_raw(sizes, strategy, link, Path(tmp), log)
            results[key] = details.pop("ratio")
            share = details.pop("eval_share")
            if strategy == "gossip":
                results["eval_share"] = share
            results["details"][strategy] = details
        log(f"fedavg: {sizes.nodes} nodes x {sizes.rounds} rounds through Flower without DP")
        no_dp = {**_cfg(sizes, "fedavg"), "eps": float("inf")}
        plain = flower_run(link, no_dp, sizes.nodes, Path(tmp))
        dp_round = results["details"]["fedavg"]["flower_round_s_steady"]
        results["dp_round_vs_plain_round"] = dp_round / steady(plain.rows)
        results["details"]["fedavg_plain_round_s_steady"] = steady(plain.rows)
        results["scale"] = scale(sizes, link, Path(tmp), log)
        deploy = deploy_vs_sim(sizes, link, Path(tmp), log)
        results["deploy_round_vs_sim_round"] = deploy.pop("ratio")
        results["details"]["deploy"] = deploy
        small, large = results["scale"][1], results["scale"][-1]
        results["scale_per_node_growth"] = (large["s_per_round"] / large["nodes"]) / (
            small["s_per_round"] / small["nodes"]
        ) - 1
    return results | environment(sizes)


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


def flower_vs_raw(
    sizes: Sizes, strategy: str, link: SimulationLink, out: Path, log: Callable[[str], None]
) -> dict[str, float]:
    """One strategy's run through Flower and as a plain loop: the ratio and its parts."""
    run_config = _cfg(sizes, strategy)
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


def deploy_lines(results: Mapping[str, Any]) -> list[str]:
    """The deployment rows of the table (none when not measured)."""
    if "deploy" not in results["details"]:
        return []
    d = results["details"]["deploy"]
    lines = [
        f"| deploy_round_vs_sim_round (3 SuperNodes, warm fdg-superexec) | "
        f"{results['deploy_round_vs_sim_round']:.2f} ({d['deploy_round_s_steady']:.2f} s / "
        f"{d['sim_round_s_steady']:.2f} s) | <= 1.5 |",
    ]
    if "subprocess_vs_sim" in d:
        lines.append(
            f"| the same with Flower's subprocess isolation | {d['subprocess_vs_sim']:.2f} "
            f"({d['deploy_subprocess_round_s_steady']:.2f} s) | |"
        )
    return lines


def randomness_lines(results: Mapping[str, Any]) -> list[str]:
    """The keyed-randomness row, when measured."""
    if "keyed_randomness_share" not in results:
        return []
    k = results["details"]["keyed_randomness"]
    return [
        f"| keyed_randomness_share (ChaCha20 noise + Poisson masks, one DP epoch) "
        f"| {results['keyed_randomness_share']:.1%} ({k['randomness_s']:.3f} s / "
        f"{k['dp_epoch_s']:.3f} s, {k['steps']} steps) | small |"
    ]


def markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown table (what `fl-bench` prints)."""
    if "flower_vs_raw" not in results:  # --only deploy / randomness
        return "\n".join(["| measurement | value | target |", "| --- | --- | --- |",
                          *deploy_lines(results), *randomness_lines(results)])  # fmt: skip
    d = results["details"]
    lines = [
        "| measurement | value | target |",
        "| --- | --- | --- |",
        f"| flower_vs_raw (FedAvg, whole run) | {results['flower_vs_raw']:.2f} "
        f"({d['fedavg']['flower_wall_s']:.1f} s / {d['fedavg']['raw_wall_s']:.1f} s) | <= 0.8 |",
        f"| gossip_flower_vs_raw (whole run) | {results['gossip_flower_vs_raw']:.2f} "
        f"({d['gossip']['flower_wall_s']:.1f} s / {d['gossip']['raw_wall_s']:.1f} s) | <= 0.8 |",
        f"| dp_vs_plain (one epoch, default mode) | {results['dp_vs_plain']:.2f} | <= 1.5 |",
        f"| dp_round_vs_plain_round (FedAvg steady round, eps={results['sizes']['eps']:g} vs inf) "
        f"| {results['dp_round_vs_plain_round']:.2f} "
        f"({d['fedavg']['flower_round_s_steady']:.2f} s / "
        f"{d['fedavg_plain_round_s_steady']:.2f} s) | <= 1.5 |",
        f"| gossip per-node round cost, {results['scale'][-1]['nodes']} vs "
        f"{results['scale'][1]['nodes']} nodes | {results['scale_per_node_growth']:+.0%} "
        "| <= +20% |",
        f"| eval_share (gossip, rounds 2+) | {results['eval_share']:.1%} | small |",
        *randomness_lines(results),
    ]
    for mode, r in d["epoch"].items():
        extra = ""
        if "diff" in r:
            empty = "ok" if r["empty_batches_ok"] else "FAILS"
            extra = f"; Δ vs hooks {r['diff']:.0e}; empty batches {empty}"
        lines.append(f"| one epoch, {mode} | {r['s']:.3f} s (x{r['ratio']:.2f}{extra}) | |")
    lines.append(
        f"| fastest correct Opacus mode | {d['fastest_correct_mode']} "
        f"(default: {d['default_mode']}) | default |"
    )
    for strategy in ("fedavg", "gossip"):
        r = d[strategy]
        lines.append(
            f"| {strategy} Flower round, steady / first | {r['flower_round_s_steady']:.2f} s / "
            f"{r['flower_first_round_s']:.1f} s | |"
        )
        lines.append(
            f"| {strategy} Flower vs loop per steady round | {r['flower_vs_raw_per_round']:.2f} "
            f"({r['flower_round_s_steady']:.2f} s / {r['raw_round_s_steady']:.2f} s) | |"
        )
    lines += deploy_lines(results)
    for s in results["scale"]:
        lines.append(
            f"| gossip {s['nodes']} nodes | {s['s_per_round']:.2f} s/round, "
            f"peak {s['peak_rss_mb']:.0f} MB | linear |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point `fl-bench`."""
    parser = argparse.ArgumentParser(prog="fl-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--only",
        choices=["deploy", "randomness"],
        help="only this measurement (deploy: a few minutes; randomness: seconds)",
    )
    args = parser.parse_args(argv)
    results = run_bench(QUICK if args.quick else FULL, only=args.only or "")
    console.print(Markdown(markdown(results)))
    if args.json:
        write_json(args.json, results)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
