"""`fl-bench`'s results as the Markdown table it prints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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


def sealed_lines(results: Mapping[str, Any]) -> list[str]:
    """The sealed relay's row, when measured."""
    if "sealed_vs_open_round" not in results:
        return []
    g = results["details"]["gossip"]
    return [
        f"| sealed_vs_open_round (gossip steady round, sealed relay vs open) "
        f"| {results['sealed_vs_open_round']:.2f} ({g['sealed_round_s_steady']:.2f} s / "
        f"{g['flower_round_s_steady']:.2f} s) | <= 1.1 |"
    ]


def sweep_lines(results: Mapping[str, Any]) -> list[str]:
    """The sweep rows (one Flower run vs a run per cell), when measured."""
    if "sweep_vs_cells" not in results:
        return []
    d = results["details"]["sweep"]
    return [
        f"| sweep_vs_cells (same grid: one Flower run vs a run per cell) "
        f"| {results['sweep_vs_cells']:.2f} ({d['one_run_wall_s']:.0f} s / "
        f"{d['run_per_cell_wall_s']:.0f} s) | < 1 |",
        f"| sweep wall vs its cells' steady rounds, one Flower run "
        f"| {d['one_run_vs_steady_rounds']:.2f} ({d['one_run_steady_rounds_s']:.0f} s) | <= 1.1 |",
        f"| the same, a run per cell | {d['run_per_cell_vs_steady_rounds']:.2f} | (was 1.43) |",
    ]


def dp_vs_plain_line(results: Mapping[str, Any]) -> list[str]:
    """The `dp_vs_plain` row, when measured."""
    if "dp_vs_plain" not in results:
        return []
    return [f"| dp_vs_plain (one epoch, default mode) | {results['dp_vs_plain']:.2f} | <= 1.5 |"]


def epoch_lines(results: Mapping[str, Any]) -> list[str]:
    """Every mode's epoch and the fastest correct one, when measured."""
    if "dp_vs_plain" not in results:
        return []
    d = results["details"]
    lines = []
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


def scale_growth_line(results: Mapping[str, Any]) -> list[str]:
    """The per-node round cost's growth from the second smallest node count to the largest."""
    if "scale" not in results:
        return []
    rows = results["scale"]
    return [
        f"| gossip per-node round cost, {rows[-1]['nodes']} vs "
        f"{rows[1 if len(rows) > 2 else 0]['nodes']} nodes "
        f"| {results['scale_per_node_growth']:+.0%} | <= +20% |"
    ]


def scale_lines(results: Mapping[str, Any]) -> list[str]:
    """Gossip's seconds per round and peak memory at each node count."""
    return [
        f"| gossip {s['nodes']} nodes | {s['s_per_round']:.2f} s/round, "
        f"peak {s['peak_rss_mb']:.0f} MB | linear |"
        for s in results.get("scale", [])
    ]


def gpu_lines(results: Mapping[str, Any]) -> list[str]:
    """The GPU rows (`--only gpu`): CPU against CUDA, or the CUDA half marked skipped."""
    if "gpu_round_speedup" not in results:
        return []
    g = results["details"]["gpu"]
    cpu_e, cpu_r = g["epoch_cpu"], g["round_cpu"]
    lines = [
        f"| DP epoch, CPU (1 thread, {cpu_e['examples']} examples, {cpu_e['mode']}) "
        f"| {cpu_e['dp_s']:.3f} s (plain {cpu_e['plain_s']:.3f} s) | |",
        f"| 20-node FedAvg steady round, device=cpu | {cpu_r['round_s_steady']:.2f} s | |",
    ]
    if results["gpu_round_speedup"] is None:
        return [*lines, f"| CUDA half | SKIPPED: {g['cuda']} | not checked on a GPU |"]
    cuda_e, cuda_r = g["epoch_cuda"], g["round_cuda"]
    return [
        *lines,
        f"| DP epoch, CUDA | {cuda_e['dp_s']:.3f} s (plain {cuda_e['plain_s']:.3f} s) | |",
        f"| 20-node FedAvg steady round, device=cuda, 1/20 GPU per node "
        f"| {cuda_r['round_s_steady']:.2f} s (nodes on {cuda_r['devices'].get('nodes')}) | |",
        f"| gpu_dp_epoch_speedup (CPU / CUDA) | {results['gpu_dp_epoch_speedup']:.2f} | > 1 |",
        f"| gpu_round_speedup (CPU / CUDA) | {results['gpu_round_speedup']:.2f} | > 1 |",
    ]


def markdown(results: Mapping[str, Any]) -> str:
    """The results as a Markdown table (what `fl-bench` prints)."""
    if "flower_vs_raw" not in results:  # --only deploy / epoch / randomness / sweep / sealed
        return "\n".join(["| measurement | value | target |", "| --- | --- | --- |",
                          *deploy_lines(results), *dp_vs_plain_line(results),
                          *epoch_lines(results), *randomness_lines(results),
                          *sweep_lines(results), *sealed_lines(results),
                          *scale_growth_line(results), *scale_lines(results),
                          *gpu_lines(results)])  # fmt: skip
    d = results["details"]
    lines = [
        "| measurement | value | target |",
        "| --- | --- | --- |",
        f"| flower_vs_raw (FedAvg, whole run) | {results['flower_vs_raw']:.2f} "
        f"({d['fedavg']['flower_wall_s']:.1f} s / {d['fedavg']['raw_wall_s']:.1f} s) | <= 0.8 |",
        f"| gossip_flower_vs_raw (whole run) | {results['gossip_flower_vs_raw']:.2f} "
        f"({d['gossip']['flower_wall_s']:.1f} s / {d['gossip']['raw_wall_s']:.1f} s) | <= 0.8 |",
        *dp_vs_plain_line(results),
        f"| dp_round_vs_plain_round (FedAvg steady round, eps={results['sizes']['eps']:g} vs inf) "
        f"| {results['dp_round_vs_plain_round']:.2f} "
        f"({d['fedavg']['flower_round_s_steady']:.2f} s / "
        f"{d['fedavg_plain_round_s_steady']:.2f} s) | <= 1.5 |",
        *scale_growth_line(results),
        *sealed_lines(results),
        f"| eval_share (gossip, rounds 2+) | {results['eval_share']:.1%} | small |",
        *randomness_lines(results),
        *sweep_lines(results),
    ]
    lines += epoch_lines(results)
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
    return "\n".join(lines + scale_lines(results))
