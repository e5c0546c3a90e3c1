"""Record keys and conversions between Flower records and plain Python (only flwr user here)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_app.node import NodeRound
from flower_app.privacy import PrivacyLedger

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
LEDGER = "privacy-ledger"  # key in the node's context.state
NUM_EXAMPLES = "num-examples"


def ledger_to_record(ledger: PrivacyLedger) -> ConfigRecord:
    """The ledger as a ConfigRecord, to keep in `context.state` between rounds."""
    return ConfigRecord(ledger.to_dict())


def ledger_from_state(state: RecordDict) -> PrivacyLedger | None:
    """The node's ledger from `context.state`, or None before its first DP round."""
    if LEDGER not in state:
        return None
    rec = state[LEDGER]
    return PrivacyLedger(
        noise_multiplier=float(rec["noise_multiplier"]),
        sample_rate=float(rec["sample_rate"]),
        steps=int(rec["steps"]),
        delta=float(rec["delta"]),
        accountant=str(rec["accountant"]),
    )


def train_reply(out: NodeRound, partition_id: int) -> RecordDict:
    """The node's model and metrics, including what it spent on privacy so far."""
    metrics: dict[str, int | float] = {
        NUM_EXAMPLES: out.num_examples,
        "partition-id": partition_id,
        "train-loss": out.train_loss,
    }
    if out.ledger is not None:
        metrics |= {
            "eps": out.ledger.epsilon(),
            "noise-multiplier": out.ledger.noise_multiplier,
            "sample-rate": out.ledger.sample_rate,
            "steps": out.ledger.steps,
        }
    return RecordDict({ARRAYS: ArrayRecord(out.state_dict), METRICS: MetricRecord(metrics)})
