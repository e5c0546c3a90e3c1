"""ServerApp: validate the run config, run the chosen strategy, evaluate, write results."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import replace
from logging import INFO
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_app.config import ConfigError, RunConfig
from flower_app.data import BatchTensorDataset, DatasetMissing
from flower_app.model import model_for
from flower_app.preflight import check_node_count, check_run_model
from flower_app.results import (
    FolderLocked,
    RunFiles,
    RunSummary,
    default_run_name,
    format_eps,
    resolve_results_dir,
)
from flower_app.train import quiet_opacus_logging
from server_app.audit import (
    AUDIT,
    headline_bound,
    run_audit,
    sealed_audit_scores,
    write_audit,
)
from server_app.cells import run_cells
from server_app.evaluation import (
    RoundRecorder,
    central_test_sets,
    devices_used,
    model_evaluator,
    server_device,
)
from server_app.network_privacy import network_line, network_privacy, write_network_privacy
from server_app.polling import prompt_grid, simulated
from server_app.privacy_report import privacy_line, privacy_summary
from server_app.rejections import fail, one_line_rejections
from server_app.sim_runtime import speed_up_message_lookup
from server_app.whitebox import whitebox_audit
from strategies import STRATEGIES
from strategies.base import NodeRefused, QuorumError, RunStrategy

app = ServerApp()


def wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    """The connected node ids; with `want` > 0, first wait until that many are connected."""
    deadline = time.monotonic() + timeout
    while want and len(node_ids := list(grid.get_node_ids())) < want:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"num-nodes={want}: only {len(node_ids)} node(s) connected within "
                f"round-timeout={timeout:g}s"
            )
        log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids), want)
        time.sleep(2)
    return list(grid.get_node_ids())


def prepare(
    grid: Grid, run_config: Mapping[str, Any]
) -> tuple[RunConfig, int, RunStrategy, BatchTensorDataset]:
    """The run config, the node count, the strategy and the central test set, all checked."""
    try:
        cfg = RunConfig.from_run_config(run_config)
        random.seed(cfg.seed)  # for anything that draws from the global `random`
        num_nodes = len(wait_for_nodes(grid, cfg.num_nodes, cfg.round_timeout))
        check_node_count(cfg, num_nodes)
        log(INFO, "Device: the server evaluates on %s (device=%s)", server_device(cfg), cfg.device)
        test, node_test = central_test_sets(cfg)
        check_run_model(cfg)
        strategy = STRATEGIES[cfg.strategy](cfg, num_nodes, model_evaluator(cfg, node_test))
    except (ConfigError, DatasetMissing) as err:
        fail(f"invalid run: {err}")
    return cfg, num_nodes, strategy, test


def run_folder(cfg: RunConfig) -> tuple[str, RunFiles]:
    """The run's name and its results folder (never one holding a completed run)."""
    run_name = cfg.run_name or default_run_name(cfg.strategy, cfg.eps, cfg.seed)
    try:
        return run_name, RunFiles(resolve_results_dir(cfg.results_dir) / run_name, lock=True)
    except (FileExistsError, FolderLocked) as err:
        fail(str(err))


def run_rounds(grid: Grid, cfg: RunConfig, strategy: RunStrategy, recorder: RoundRecorder) -> None:
    """Flower's round loop; a stopped run leaves a failed summary, or no folder at all."""
    files = recorder.files
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model_for(cfg, seed=cfg.seed).state_dict()),
            num_rounds=cfg.num_server_rounds,
            train_config=ConfigRecord(),
            evaluate_fn=recorder,
            timeout=cfg.round_timeout,
        )
    except (NodeRefused, QuorumError, ConfigError) as err:
        if files.rows:
            files.finish(RunSummary.failed(err))
        else:  # refused before any round: nothing was trained, nothing is kept
            files.discard()
        fail(f"run stopped: {err}")
    except BaseException as err:
        files.finish(RunSummary.failed(err))
        raise


def summarize(
    cfg: RunConfig,
    strategy: RunStrategy,
    recorder: RoundRecorder,
    *,
    run_name: str,
    num_nodes: int,
    wall_s: float,
) -> RunSummary:
    """The summary.json of a run whose round loop ended."""
    last, rounds = recorder.last_row, len(recorder.files.rows)
    eps_spent = last.get("eps_spent", 0.0)
    return RunSummary(
        status="completed" if rounds == cfg.num_server_rounds else "incomplete",
        run_name=run_name,
        strategy=cfg.strategy,
        rounds_completed=rounds,
        final_accuracy=last.get("accuracy"),
        final_node_accuracy=last.get("node_acc_mean"),
        diverged_at_round=recorder.diverged_at,
        final_loss=last.get("loss"),
        initial_accuracy=recorder.initial.get("accuracy"),
        eps_target=cfg.eps,
        eps_spent=eps_spent,
        wall_s=round(wall_s, 3),
        num_nodes=num_nodes,
        privacy=privacy_summary(cfg, strategy, eps_spent, num_nodes),
        devices=devices_used(cfg, strategy.reports.metrics),
        **strategy.run_summary(),
    )


def audit_and_write(
    cfg: RunConfig,
    strategy: RunStrategy,
    recorder: RoundRecorder,
    files: RunFiles,
    num_nodes: int,
) -> dict[str, Any]:
    """Score the canaries from every observer's view; audit.json; summary.json's `audit`."""
    t0 = time.monotonic()
    pids, reports = range(num_nodes), strategy.reports
    if cfg.whitebox_audit:  # canaries in the updates: scored from the nodes' increments
        audit = whitebox_audit(cfg, strategy)
    else:
        node_scores = sealed_audit_scores(cfg, strategy, num_nodes) if cfg.sealed_relay else None
        audit = run_audit(
            cfg,
            num_nodes=num_nodes,
            own_models=strategy.own_models(),
            shared=recorder.last_arrays,
            graph=getattr(strategy, "graph", None),
            node_eps={p: reports.node_eps(p) for p in pids if p in reports.metrics},
            scores_by_node=node_scores,
        )
    write_audit(files.folder, audit)
    for d in audit.get("by_distance", []):  # a white-box audit: one line per distance
        log(INFO, "Audit distance %d: ε >= %.3f over %d tests (95%% jointly; accountant: "
            "ε <= %s)", d["distance"], d["eps_lower_joint_max"], d["tests"],
            format_eps(d["eps_accountant_max"]))  # fmt: skip
    for o in [] if "by_distance" in audit else audit["observers"]:
        log(
            INFO,
            "Audit %s: %d of %d guesses correct, ε >= %.3f (accountant: ε <= %s)",
            o["observer"],
            o["correct"],
            o["guesses"],
            o["eps_lower"],
            format_eps(o["eps_accountant"]),
        )
    log(INFO, "Audit: %s (%.1fs)", files.folder / AUDIT, time.monotonic() - t0)
    return {
        "mode": cfg.audit_mode,
        "canaries_per_node": cfg.audit_canaries,
        "audit_seed": cfg.audit_seed,
        "file": AUDIT,
        # A 95% lower bound for all observers together (Bonferroni), not the max of
        # per-observer 95% bounds.
        "eps_lower_max": headline_bound(audit),
    }


def run_experiment(grid: Grid, run_config: Mapping[str, Any]) -> None:
    """One experiment: `strategy` for `num-server-rounds` rounds, then its results folder."""
    cfg, num_nodes, strategy, test = prepare(grid, run_config)
    run_name, files = run_folder(cfg)
    log(INFO, "%s", privacy_line(cfg, num_nodes))
    log(INFO, "Results: %s", files.folder)

    recorder = RoundRecorder(cfg, files, strategy, test)
    files.start(cfg.to_dict() | {"run-name": run_name, "num-nodes": num_nodes})
    t0 = time.monotonic()
    run_rounds(grid, cfg, strategy, recorder)
    wall_s = time.monotonic() - t0
    summary = summarize(
        cfg, strategy, recorder, run_name=run_name, num_nodes=num_nodes, wall_s=wall_s
    )
    if cfg.audited and summary.completed:
        summary = replace(summary, audit=audit_and_write(cfg, strategy, recorder, files, num_nodes))
    if cfg.strategy == "gossip" and summary.completed:
        doc = network_privacy(cfg, strategy)
        summary = replace(summary, network_privacy=write_network_privacy(files.folder, doc))
        log(INFO, "%s", network_line(doc))
    files.finish(summary)
    accuracy = summary.final_accuracy
    which = "final accuracy"
    if accuracy is None:  # sealed gossip: no central model, the nodes' own accuracy
        accuracy, which = summary.final_node_accuracy, "final node accuracy (mean)"
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    log(INFO, "Done: %d rounds, %s %s; results in %s", len(files.rows), which, shown, files.folder)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment the run config names, or each cell of its `cells` list in turn."""
    torch.set_num_threads(1)  # the simulated nodes use the cores; see client_app
    quiet_opacus_logging()
    one_line_rejections()
    run_config = dict(context.run_config)
    if simulated(grid):
        speed_up_message_lookup()
    grid = cast(Grid, prompt_grid(grid))
    if run_config.get("cells"):
        run_cells(grid, run_config, run_experiment)
    else:
        run_experiment(grid, run_config)
