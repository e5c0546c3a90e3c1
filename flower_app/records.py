"""Conversions between Flower records and plain Python (the only flwr user in the core).

The keys themselves live in `wire.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_app.ledger import Decision
from flower_app.node import NodeRound, Refused
from flower_app.privacy import PrivacyLedger
from flower_app.wire import (
    ARRAYS,
    CANARY_INCREMENTS,
    EPS,
    EPS_STRICT,
    LEDGER,
    LIFETIME_EPS,
    METRICS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PLANNED_STEPS,
    REASON,
    REFUSAL,
    ROUND_STEPS,
    SAMPLE_RATE,
    STEPS,
    TRAIN_LOSS,
)

T = TypeVar("T")


class StateLedger:
    """A node's ledgers in `context.state` (no `ledger-dir`), one entry per `ledger_key`.

    It lasts as long as the SuperNode process: enough for simulation, where nodes have no
    policy; a node whose policy sets an ε limit must set `ledger-dir` (`FileLedger`). Flower
    shares `context.state` across a run series, so each run's entry keeps its own key.
    """

    def __init__(self, state: RecordDict) -> None:
        """Wrap the node's `context.state`."""
        self.state = state

    def runs(self) -> dict[str, PrivacyLedger]:
        """Every entry the node recorded in this state, by `ledger_key`."""
        prefix = f"{LEDGER}:"
        return {
            name.removeprefix(prefix): PrivacyLedger.from_dict(record)
            for name, record in self.state.items()
            if name.startswith(prefix)
        }

    def put(self, key: str, ledger: PrivacyLedger) -> None:
        """Record the entry's ledger for its next round."""
        self.state[f"{LEDGER}:{key}"] = ConfigRecord(ledger.to_dict())

    def reserve(self, key: str, decide: Callable[[dict[str, PrivacyLedger]], Decision[T]]) -> T:
        """`decide` on the entries and record what it returns (one process: no lock)."""
        record, result = decide(self.runs())
        if record is not None:
            self.put(key, record)
        return result


def train_reply(out: NodeRound, partition_id: int) -> RecordDict:
    """The node's model and its public facts: dataset size and what it spent on privacy.

    Nothing computed from the raw data without noise leaves a private node: the training
    loss is sent only without DP (eps=inf).
    """
    metrics: dict[str, int | float] = {NUM_EXAMPLES: out.num_examples, PARTITION_ID: partition_id}
    if out.num_partitions:  # gossip's graph has one vertex per partition: checked there
        metrics[NUM_PARTITIONS] = out.num_partitions
    if out.ledger is None:
        metrics[TRAIN_LOSS] = out.train_loss
    else:
        led = out.ledger
        metrics |= {
            EPS: led.epsilon(),
            EPS_STRICT: led.strict_epsilon(),
            NOISE_MULTIPLIER: led.noise_multiplier,
            SAMPLE_RATE: led.sample_rate,
            STEPS: led.steps,
            ROUND_STEPS: out.round_steps,
            PLANNED_STEPS: led.planned_steps,
        }
        if out.lifetime_eps is not None:
            metrics[LIFETIME_EPS] = out.lifetime_eps
    content = RecordDict({ARRAYS: ArrayRecord(out.state_dict), METRICS: MetricRecord(metrics)})
    if out.canary_increments is not None:  # a white-box audit (flower_app/whitebox_audit.py)
        content[CANARY_INCREMENTS] = ArrayRecord(
            {CANARY_INCREMENTS: Array(np.ascontiguousarray(out.canary_increments))}
        )
    return content


def refusal_reply(refused: Refused, partition_id: int) -> RecordDict:
    """A reply that carries no model, only why the node refused."""
    return RecordDict(
        {
            REFUSAL: ConfigRecord({REASON: refused.reason, PARTITION_ID: partition_id}),
        }
    )
