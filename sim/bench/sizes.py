"""How big each of `fl-bench`'s measurements is: the full sizes and `--quick`'s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
            "device": "cpu",
            "num-server-rounds": 5,
            "samples-per-node": 500,
            "test-samples": 1000,
        }
    )
    # Also time Flower's own subprocess isolation (a fresh process per message).
    deploy_subprocess: bool = True
    # sweep_vs_cells: the reference shape (both strategies x these ε), nodes and rounds.
    sweep_eps: tuple[float, ...] = (float("inf"), 2.0)
    sweep_nodes: int = 20
    sweep_rounds: int = 10
    sweep_config: Mapping[str, Any] = field(default_factory=dict)


FULL = Sizes()
QUICK = Sizes(
    nodes=20,
    rounds=3,
    run_config={"samples-per-node": 300, "test-samples": 2000},
    epoch_repeats=2,
    scale_nodes=(10, 20, 40),
    scale_rounds=3,
    deploy_subprocess=False,
    sweep_nodes=6,
    sweep_rounds=4,
    sweep_config={"samples-per-node": 300, "test-samples": 1000},
)


# The plain loop averages gossip models on the server, as the open relay does: gossip runs
# here pin it, so the ratios keep measuring what they measured before gossip-relay existed.
OPEN_RELAY = {"gossip-relay": "open"}
# The CPU ratios stay CPU ratios on a machine with a GPU: `device=auto` would put the
# ServerApp's evaluation and the plain loop on it (`fl-bench --only gpu` sets `device` itself).
ON_CPU = {"device": "cpu"}


def run_config_for(sizes: Sizes, strategy: str) -> dict[str, Any]:
    """The run config of the main measurements for `strategy`."""
    return {
        "strategy": strategy,
        "eps": sizes.eps,
        "num-server-rounds": sizes.rounds,
        **ON_CPU,
        **sizes.run_config,
        **OPEN_RELAY,
    }
