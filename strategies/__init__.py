"""Strategies, by run-config name."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from flower_app.config import RunConfig
from strategies.fedavg import CentralFedAvg


def _fedavg(cfg: RunConfig, num_nodes: int) -> Strategy:
    return CentralFedAvg(min_available_nodes=num_nodes)


STRATEGIES: dict[str, Callable[[RunConfig, int], Strategy]] = {"fedavg": _fedavg}
