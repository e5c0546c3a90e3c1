"""What a run refuses before training, without Flower: the ServerApp and a sweep's dry run.

The ServerApp (`server_app/app.py` `prepare`, and the strategies it builds) calls each check
on the nodes that connected; `fl-sweep run` (and its `--dry-run`) calls `preflight` on every
cell with the node count it will simulate, so a cell the ServerApp would refuse, or one that
would wait `round-timeout` for nodes that never come, is refused before anything runs.
Each check raises `ConfigError` (or `DatasetMissing`) with one line. Torch, Opacus and the
dataset are imported when a check runs, so importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flower_app.config import ConfigError, RunConfig
from flower_app.topology import TopologyError, build_topology

if TYPE_CHECKING:
    import networkx as nx
    import numpy as np


def check_node_count(cfg: RunConfig, num_nodes: int) -> None:
    """`num-nodes` and `min-available-nodes` against the `num_nodes` nodes the run has."""
    if cfg.num_nodes > num_nodes:
        raise ConfigError(
            f"num-nodes={cfg.num_nodes} is more than the {num_nodes} node(s) of this "
            f"federation (the run would wait round-timeout={cfg.round_timeout:g}s for them); "
            f"use at most {num_nodes}, or 0 for the nodes connected at start"
        )
    if cfg.min_available_nodes > num_nodes:
        raise ConfigError(
            f"min-available-nodes={cfg.min_available_nodes} is more than the "
            f"{num_nodes} node(s) of this federation; use at most {num_nodes}"
        )


def gossip_graph(cfg: RunConfig, num_nodes: int) -> nx.Graph:
    """The gossip graph `topology` stands for on `num_nodes` nodes; refused if it cannot be."""
    if num_nodes < 2:
        raise ConfigError(
            f"strategy=gossip needs at least 2 nodes; this federation has {num_nodes}"
        )
    try:
        return build_topology(
            cfg.topology, num_nodes, seed=cfg.seed, degree=cfg.degree, edge_prob=cfg.edge_prob
        )
    except TopologyError as err:
        raise ConfigError(str(err)) from None


def check_privacy_plan(cfg: RunConfig, num_nodes: int = 0) -> None:
    """A dp-mode=update plan needs nothing from the nodes: an eps no noise meets fails here.

    With privacy-unit=network the plan is the one every node computes for `num_nodes`.
    """
    if cfg.private and cfg.dp_mode == "update":
        from flower_app.network_calibration import node_network_plan
        from flower_app.node import plan  # Opacus's accountants: only when a run starts

        plan(cfg, num_samples=0, network=node_network_plan(cfg, num_nodes))


def evaluation_arrays(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, central indices, per-node-model indices) of the run's evaluation set.

    Raises `DatasetMissing` when the dataset (or `data-dir`) is not on this machine, and
    `ConfigError` when the sizes do not fit it (the nodes carve the same split).
    """
    from flower_app.data import evaluation_sets, load_arrays

    try:
        return evaluation_sets(
            load_arrays(cfg.dataset, cfg.data_dir),
            evaluate_on=cfg.evaluate_on,
            validation_samples=cfg.validation_samples,
            test_samples=cfg.test_samples,
            node_eval_samples=cfg.node_eval_samples,
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_run_model(cfg: RunConfig) -> None:
    """The run's model, built once: importable, fitting the data, trainable by Opacus.

    Raises `ModelError` (a `ConfigError`), e.g. for a BatchNorm under DP-SGD.
    """
    from flower_app.model import check_model  # torch and the user's module: only when checked

    check_model(cfg)


def check_device(cfg: RunConfig) -> None:
    """An explicit `device` this machine lacks (cuda on a CPU-only one) fails here, in one line.

    `auto` always passes: each node resolves it on its own hardware. Raises `DeviceError`.
    """
    from flower_app.device import resolve_device  # torch: only when a run starts

    resolve_device(cfg.device)


def preflight(cfg: RunConfig, num_nodes: int) -> None:
    """Every check the ServerApp makes before training, for a run on `num_nodes` nodes."""
    check_node_count(cfg, num_nodes)
    check_device(cfg)
    if cfg.strategy == "gossip":
        gossip_graph(cfg, num_nodes)
    check_privacy_plan(cfg, num_nodes)
    evaluation_arrays(cfg)
    check_run_model(cfg)
