"""The ClientApp's train replies: what a node sends back after a round, or why it refused."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_app.device import cuda_index
from flower_app.node import NodeRound, Refused
from flower_app.wire import (
    ARRAYS,
    CANARY_INCREMENTS,
    DEVICE,
    EPS,
    EPS_STRICT,
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


def train_reply(out: NodeRound, partition_id: int) -> RecordDict:
    """The node's model and its public facts: dataset size and what it spent on privacy.

    Nothing computed from the raw data without noise leaves a private node: the training
    loss is sent only without DP (eps=inf).
    """
    metrics: dict[str, int | float] = {NUM_EXAMPLES: out.num_examples, PARTITION_ID: partition_id}
    metrics[DEVICE] = cuda_index(out.device)  # where it trained, so a run shows it
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
