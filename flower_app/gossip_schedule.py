"""The gossip schedule a run actually drew, kept as it happens, for the network accountant.

A gossip strategy (open or sealed relay) tells its `ScheduleLog` which vertices trained in
each round and every mixing step it then applied, as the primitives it drew them from
(pairs, sequential edges, Metropolis weights). `schedule()` turns them into the mixing
matrices of `flower_app.network_dp.Schedule`. A step that did not happen as drawn (a sealed
exchange a node refused or never received) makes the log incomplete: the accountant is then
not applied, since an exchange left out can concentrate a model on its way to an observer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from flower_app.network_dp import (
    GossipRound,
    Pair,
    Schedule,
    edge_matrices,
    metropolis_matrix,
    pairs_matrix,
)

# The pairwise accountant's cost grows about as n^4 x rounds; beyond this many nodes it is
# skipped (the run says so) rather than holding up the end of the run.
MAX_NODES = 100


class ScheduleLog:
    """The rounds of one run: who trained, then each mixing step, as drawn and applied."""

    def __init__(self, num_nodes: int) -> None:
        """A log for vertices 0..num_nodes-1; nothing recorded beyond `MAX_NODES`."""
        self.num_nodes = num_nodes
        self.rounds: list[tuple[frozenset[int], list[tuple[str, object]]]] = []
        self.gap: str | None = None if num_nodes <= MAX_NODES else (
            f"{num_nodes} nodes: pairwise accounting is computed up to {MAX_NODES} nodes"
        )  # fmt: skip

    def start_round(self, active: Iterable[int]) -> None:
        """A new round in which the vertices `active` trained and released a noisy model."""
        if self.gap is None:
            self.rounds.append((frozenset(active), []))

    def _add(self, kind: str, value: object) -> None:
        if self.gap is None:
            if not self.rounds:
                raise RuntimeError("a gossip step was logged before any round started")
            self.rounds[-1][1].append((kind, value))

    def pairs(self, pairs: Iterable[Pair]) -> None:
        """One step in which disjoint pairs averaged at once (`matching`)."""
        self._add("pairs", [tuple(p) for p in pairs])

    def edges(self, pairs: Iterable[Pair]) -> None:
        """Edges averaged one after another (`edges`)."""
        self._add("edges", [tuple(p) for p in pairs])

    def metropolis(self, weights: Mapping[Pair, float]) -> None:
        """One Metropolis step with these weights (`metropolis`)."""
        self._add("metropolis", dict(weights))

    def broken(self, why: str) -> None:
        """A step did not happen as drawn: the schedule no longer says what nodes received."""
        self.gap = self.gap or why

    def schedule(self) -> Schedule:
        """The run as `network_dp.Schedule` (ValueError if the log is incomplete)."""
        if self.gap is not None:
            raise ValueError(f"no complete schedule: {self.gap}")
        n, rounds = self.num_nodes, []
        for active, steps in self.rounds:
            matrices: list[np.ndarray] = []
            for kind, value in steps:
                if kind == "pairs":
                    matrices.append(pairs_matrix(n, value))  # type: ignore[arg-type]
                elif kind == "edges":
                    matrices += edge_matrices(n, value)  # type: ignore[arg-type]
                else:
                    matrices.append(metropolis_matrix(n, value))  # type: ignore[arg-type]
            rounds.append(GossipRound(active, tuple(matrices)))
        return Schedule(n, tuple(rounds))
