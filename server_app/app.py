"""ServerApp: validate the run config, run the chosen strategy, evaluate, write results."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_app.config import ConfigError, RunConfig, claims_per_round
from flower_app.data import BatchTensorDataset, DatasetMissing, cap, load_arrays, to_tensors
from flower_app.model import build_model
from flower_app.results import RunFiles, default_run_name, format_eps, resolve_results_dir
from flower_app.train import evaluate
from server_app.polling import PromptGrid
from server_app.privacy_report import privacy_line, privacy_summary
from strategies import STRATEGIES
from strategies.fedavg import NodeRefused, QuorumError

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


def central_test_sets(cfg: RunConfig) -> tuple[BatchTensorDataset, BatchTensorDataset]:
    """The central test set (`test-samples`) and its fixed subset for per-node models."""
    arrays = load_arrays(cfg.dataset, cfg.data_dir)
    idx = cap(np.arange(len(arrays.y_test)), cfg.test_samples, cfg.seed)
    node_idx = cap(idx, cfg.node_eval_samples, cfg.seed + 1)
    return (
        to_tensors(cfg.dataset, arrays.x_test[idx], arrays.y_test[idx], cfg.normalize),
        to_tensors(cfg.dataset, arrays.x_test[node_idx], arrays.y_test[node_idx], cfg.normalize),
    )


def model_evaluator(
    cfg: RunConfig, test: BatchTensorDataset
) -> Callable[[list[np.ndarray]], tuple[float, float]]:
    """(loss, accuracy) of a model given as its list of arrays, on `test`."""
    model = build_model(cfg.model)
    keys = list(model.state_dict())

    def evaluate_arrays(arrays: list[np.ndarray]) -> tuple[float, float]:
        model.load_state_dict(
            {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
        )
        return evaluate(model, test)

    return evaluate_arrays


# Short unit for the per-round line, by dp-mode.
UNIT_SHORT = {"sample": "sample-level", "update": "client-level"}


class RoundRecorder:
    """Evaluates the model after each round, logs one line and appends a row to rounds.csv."""

    def __init__(self, cfg: RunConfig, files: RunFiles, strategy: Any, test: Any) -> None:
        """Keep what each round's row needs."""
        self.cfg, self.files, self.strategy, self.test = cfg, files, strategy, test
        self.t0 = self.t_last = time.monotonic()
        self.initial: dict[str, float] = {}
        self.last_row: dict[str, Any] = {}
        self.diverged_at: int | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's `evaluate_fn`: called with round 0 before training, then after each round."""
        t_eval = time.monotonic()
        model = build_model(self.cfg.model)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, self.test)
        now = time.monotonic()
        if server_round == 0:
            self.initial = {"accuracy": accuracy, "loss": loss}
            self.t0 = self.t_last = now
            return MetricRecord(self.initial)
        row = {
            "round": server_round,
            "strategy": self.cfg.strategy,
            "eps_target": self.cfg.eps,
            # The uncomposed per-round ε claimed (accounting=per-round); eps_spent is the truth.
            "eps_per_round_claimed": self.cfg.eps if claims_per_round(self.cfg) else None,
            "accuracy": accuracy,
            "loss": loss,
            # Where every node holds the evaluated model (FedAvg), node accuracy is its accuracy.
            "node_acc_mean": accuracy,
            "node_acc_min": accuracy,
            "node_acc_max": accuracy,
            **self.strategy.round_diagnostics(),
        }
        now = time.monotonic()  # after the per-node evaluation, which is part of the round
        row |= {
            "eval_s": round(now - t_eval, 3),  # central + per-node evaluation
            "round_s": round(now - self.t_last, 3),
            "wall_s": round(now - self.t0, 3),
        }
        self.t_last = now
        self.files.add_round(row)
        self.last_row = row
        if not math.isfinite(loss) and self.diverged_at is None:
            self.diverged_at = server_round
            log(
                WARNING,
                "round %d: the evaluated model's loss is %s: it has diverged (non-finite "
                "weights), and its accuracy from here on is that of a constant guess",
                server_round,
                loss,
            )
        if self.cfg.strategy == "gossip":
            # No global model exists: lead with the nodes' own models.
            quality = (
                f"node accuracy {row['node_acc_mean']:.4f} "
                f"({row['node_acc_min']:.3f}..{row['node_acc_max']:.3f})  "
                f"consensus {row['consensus_distance']:.3g}  "
                f"avg-model accuracy {accuracy:.4f}"
            )
        else:
            quality = f"accuracy {accuracy:.4f}  loss {loss:.4f}"
        if claims_per_round(self.cfg):
            budget = (
                f"true composed ε {row['eps_spent']:.3f} (claimed: ε={self.cfg.eps:g} per round"
            )
            budget += ", uncomposed)"
        else:
            budget = f"ε spent {row['eps_spent']:.3f} of {format_eps(self.cfg.eps)}"
        log(
            INFO,
            "round %d/%d  %s  %s (δ=%g, %s)  %.1fs",
            server_round,
            self.cfg.num_server_rounds,
            quality,
            budget,
            self.cfg.delta,
            UNIT_SHORT[self.cfg.dp_mode] + (", SEEDED noise" if self.cfg.seeded_noise else ""),
            row["round_s"],
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})


class RunRejected(RuntimeError):
    """The run cannot start or go on; the message is the one line the user needs."""


def _rejection(exc: BaseException | None) -> RunRejected | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RunRejected):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class OneLineRejections(logging.Filter):
    """Keep a rejected run to the one line `_fail` logged.

    Flower logs a failing ServerApp with its traceback, then an "Exit Code: 700 ... An
    unhandled exception occurred" help text; for a run refused on purpose (bad config, a
    node's policy) both only bury the reason. Other failures keep their tracebacks.
    """

    def __init__(self) -> None:
        """Nothing rejected yet."""
        super().__init__()
        self.rejected = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Flower's traceback and exit-code text of a rejected run."""
        if record.exc_info and _rejection(record.exc_info[1]) is not None:
            self.rejected = True
            return False
        return not (self.rejected and str(record.msg).startswith("Exit Code:"))


def _one_line_rejections() -> None:
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineRejections) for f in flwr_logger.filters):
        flwr_logger.addFilter(OneLineRejections())


def _fail(message: str) -> None:
    log(ERROR, "%s", message)
    # An exception, not sys.exit: Flower marks the run failed only when main raises.
    raise RunRejected(message)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `strategy` for `num-server-rounds` rounds and write the run's results folder."""
    torch.set_num_threads(1)  # the simulated nodes use the cores; see client_app
    _one_line_rejections()
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        random.seed(cfg.seed)  # for anything that draws from the global `random`
        node_ids = wait_for_nodes(grid, cfg.num_nodes, cfg.round_timeout)
        if cfg.min_available_nodes > len(node_ids):
            raise ConfigError(
                f"min-available-nodes={cfg.min_available_nodes} is more than the "
                f"{len(node_ids)} node(s) of this federation; use at most {len(node_ids)}"
            )
        test, node_test = central_test_sets(cfg)
        strategy = STRATEGIES[cfg.strategy](cfg, len(node_ids), model_evaluator(cfg, node_test))
    except (ConfigError, DatasetMissing) as err:
        _fail(f"invalid run: {err}")
        return
    run_name = cfg.run_name or default_run_name(cfg.strategy, cfg.eps, cfg.seed)
    try:
        files = RunFiles(resolve_results_dir(cfg.results_dir) / run_name)
    except FileExistsError as err:
        _fail(str(err))
        return

    log(INFO, "%s", privacy_line(cfg))
    log(INFO, "Results: %s", files.folder)

    recorder = RoundRecorder(cfg, files, strategy, test)
    files.start(cfg.to_dict() | {"run-name": run_name, "num-nodes": len(node_ids)})
    t0 = time.monotonic()
    try:
        strategy.start(
            grid=cast(Grid, PromptGrid(grid)),
            initial_arrays=ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict()),
            num_rounds=cfg.num_server_rounds,
            train_config=ConfigRecord(),
            evaluate_fn=recorder,
            timeout=cfg.round_timeout,
        )
    except (NodeRefused, QuorumError) as err:
        if files.rows:
            files.finish({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        else:  # refused before any round: nothing was trained, nothing is kept
            files.discard()
        _fail(f"run stopped: {err}")
        return
    except BaseException as err:
        files.finish({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        raise
    last = recorder.last_row
    files.finish(
        {
            "status": "completed" if len(files.rows) == cfg.num_server_rounds else "incomplete",
            "run_name": run_name,
            "strategy": cfg.strategy,
            "rounds_completed": len(files.rows),
            "final_accuracy": last.get("accuracy"),
            # What a node actually holds: the global model (FedAvg) or its own (gossip).
            "final_node_accuracy": last.get("node_acc_mean"),
            # First round whose evaluated model had a non-finite loss (None: never).
            "diverged_at_round": recorder.diverged_at,
            "final_loss": last.get("loss"),
            "initial_accuracy": recorder.initial.get("accuracy"),
            "eps_target": cfg.eps,
            "eps_spent": last.get("eps_spent", 0.0),
            "wall_s": round(time.monotonic() - t0, 3),
            "num_nodes": len(node_ids),
            "privacy": privacy_summary(cfg, strategy, last.get("eps_spent", 0.0)),
            **strategy.run_summary(),
        }
    )
    log(
        INFO,
        "Done: %d rounds, final accuracy %.4f; results in %s",
        len(files.rows),
        last.get("accuracy", float("nan")),
        files.folder,
    )
