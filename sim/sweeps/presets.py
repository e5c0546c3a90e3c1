"""The named sweeps `fl-sweep run --preset` knows (flags given with one override it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sim.sweeps.spec import SweepSpec


@dataclass(frozen=True)
class Preset:
    """A named spec; flags given with it override it.

    A tuning preset (`fl-sweep tune`) also has a search space and the seeds to search with;
    its grid's seeds are those of the final runs.
    """

    description: str
    spec: SweepSpec
    search: dict[str, list[Any]] = field(default_factory=dict)
    tune_seeds: list[int] = field(default_factory=list)


# The reference comparison's shape: 20 nodes, Dirichlet label skew, gossip on a ring.
REFERENCE_FIXED: dict[str, Any] = {
    "num-server-rounds": 20,
    "partitioner": "dirichlet",
    "alpha": 0.5,
    "gossip:topology": "ring",
}
REFERENCE_NODES = 20
# A twelfth of the training set, carved off before partitioning (docs/tuning.md).
VALIDATION_SAMPLES = 5000
# lr × max-grad-norm spans effective steps lr·C from 0.02 to 2; gossip may also train a
# quarter epoch (12 steps of ~47) between averagings and gossip four times a round.
REFERENCE_SEARCH: dict[str, list[Any]] = {
    "lr": [0.1, 0.5, 2.0],
    "max-grad-norm": [0.2, 1.0],
    "gossip:local-steps": [0, 12],
    "gossip:gossip-steps": [1, 4],
}


# The MarkTechPost gossip-vs-FedAvg tutorial (Feb 2026), on Fashion-MNIST (MNIST is not
# available offline): 20 clients with 2 of 40 label-sorted shards, MLP 784-256-128-10, one
# local epoch of SGD (lr 0.06, momentum 0.9, batch 64), the update clipped to C=2 and
# noised once per round; FedAvg samples 10 of 20 clients, gossip averages 10 random ring
# edges one after another; gossip's accuracy is the mean of every node's own model on the
# full test set. See docs/reproducing-the-tutorial.md.
TUTORIAL_FIXED: dict[str, Any] = {
    "num-server-rounds": 20,
    "dataset": "fashion-mnist",
    "normalize": "none",  # the tutorial's ToTensor() only: pixels in [0, 1]
    "partitioner": "shards",
    "shards-per-node": 2,
    "model": "mlp",
    "local-epochs": 1,
    "lr": 0.06,
    "momentum": 0.9,
    "batch-size": 64,
    "max-grad-norm": 2.0,
    "delta": 1e-5,
    "dp-mode": "update",
    "accounting": "per-round",
    "node-eval-samples": 0,
    "test-samples": 0,
    "fedavg:fraction-train": 0.5,
    "gossip:topology": "ring",
    "gossip:gossip-mode": "edges",
    "gossip:gossip-edges": 10,
}
TUTORIAL_GRID: dict[str, list[Any]] = {
    "strategy": ["fedavg", "gossip"],
    "eps": [math.inf, 8, 4, 2, 1],
    "seed": [7],
}
TUTORIAL_NODES = 20


# (gossip-mode, topology) pairs of the mixing study: the tutorial's 10 random ring edges,
# then a random maximal matching on graphs of growing spectral gap, then Metropolis weights.
TUTORIAL_MIXING = [
    {"gossip:gossip-mode": "edges", "gossip:topology": "ring"},
    {"gossip:gossip-mode": "matching", "gossip:topology": "ring"},
    {"gossip:gossip-mode": "matching", "gossip:topology": "torus"},
    {"gossip:gossip-mode": "matching", "gossip:topology": "exponential"},
    {"gossip:gossip-mode": "metropolis", "gossip:topology": "ring"},
]


def _tutorial(
    grid: dict[str, list[Any]] | None = None,
    variants: list[dict[str, Any]] | None = None,
    **fixed: Any,
) -> SweepSpec:
    """The tutorial's spec with some keys changed (`fixed` keys spelled with _ for -)."""
    changes = {k.replace("_", "-"): v for k, v in fixed.items()}
    spec = SweepSpec(
        fixed=TUTORIAL_FIXED | changes,
        grid=grid or dict(TUTORIAL_GRID),
        nodes=TUTORIAL_NODES,
    )
    for variant in variants or []:
        spec.vary(variant)
    return spec


PRESETS: dict[str, Preset] = {
    "reference": Preset(
        "20 nodes, Dirichlet α=0.5, ε ∈ {∞,8,4,2,1}, 20 rounds, FedAvg vs gossip (ring), 3 seeds",
        SweepSpec(
            fixed=dict(REFERENCE_FIXED),
            grid={
                "strategy": ["fedavg", "gossip"],
                "eps": [math.inf, 8, 4, 2, 1],
                "seed": [7, 8, 9],
            },
            nodes=REFERENCE_NODES,
        ),
    ),
    "reference-tuned": Preset(
        "fl-sweep tune: the reference shape with a 5,000-example validation split, ε ∈ "
        "{∞,8,2,1}; lr × max-grad-norm searched for both strategies, local-steps × "
        "gossip-steps also for gossip, on validation with seed 7; the choices run with "
        "seeds 7, 8, 9 on the test set",
        SweepSpec(
            fixed=REFERENCE_FIXED | {"validation-samples": VALIDATION_SAMPLES},
            grid={
                "strategy": ["fedavg", "gossip"],
                "eps": [math.inf, 8, 2, 1],
                "seed": [7, 8, 9],
            },
            nodes=REFERENCE_NODES,
        ),
        search=REFERENCE_SEARCH,
        tune_seeds=[7],
    ),
    "quick": Preset(
        "the reference shape shrunk to minutes on 2 CPU cores: 6 nodes, 5 rounds, ε ∈ {∞,2}",
        SweepSpec(
            fixed={
                "num-server-rounds": 5,
                "partitioner": "dirichlet",
                "alpha": 0.5,
                "samples-per-node": 1000,
                "test-samples": 1000,
                "gossip:topology": "ring",
            },
            grid={"strategy": ["fedavg", "gossip"], "eps": [math.inf, 2], "seed": [7]},
            nodes=6,
        ),
    ),
    "audit": Preset(
        "the reference shape for fl-audit: 20 nodes, Dirichlet α=0.5, 20 rounds, FedAvg vs "
        "gossip (ring), ε ∈ {∞,8,2}, seed 7",
        SweepSpec(
            fixed=dict(REFERENCE_FIXED),
            grid={"strategy": ["fedavg", "gossip"], "eps": [math.inf, 8, 2], "seed": [7]},
            nodes=REFERENCE_NODES,
        ),
    ),
    "tutorial": Preset(
        "the MarkTechPost tutorial as published: 20 nodes, shards, MLP, update-level DP with "
        "the uncomposed per-round σ (ε is a per-round label), ε ∈ {∞,8,4,2,1}, seed 7; on "
        "Fashion-MNIST, since MNIST cannot be downloaded offline (--set dataset=mnist, with "
        "data-dir=DIR when offline, for the original)",
        _tutorial(),
    ),
    "tutorial-honest": Preset(
        "the tutorial with σ calibrated so each node's ε composed over all 20 rounds meets ε",
        _tutorial(accounting="composed"),
    ),
    "tutorial-dpsgd": Preset(
        "the tutorial's grid with Opacus DP-SGD (sample-level) at the same composed ε",
        _tutorial(dp_mode="sample", accounting="composed", grad_sample_mode="ghost"),
    ),
    # DP-SGD, not update-level DP: at any ε in the tutorial's range update-level noise leaves
    # every model at chance (docs/reproducing-the-tutorial.md), which would hide the mixing.
    "tutorial-mixing": Preset(
        "the tutorial without DP and with DP-SGD at composed ε=2: gossip (mode, topology) "
        "pairs edges/ring, matching on ring, torus and exponential, metropolis/ring; FedAvg "
        "for reference",
        _tutorial(
            grid={"strategy": ["fedavg", "gossip"], "eps": [math.inf, 2], "seed": [7]},
            variants=TUTORIAL_MIXING,
            dp_mode="sample",
            accounting="composed",
            grad_sample_mode="ghost",
        ),
    ),
}
