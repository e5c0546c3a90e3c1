"""Every key of the messages and records the app exchanges, and the metrics nodes report.

Strings only, from the standard library: a strategy (or anything that reads replies) names
them without importing torch or Opacus. `records.py` turns them into Flower records.
"""

from __future__ import annotations

# RecordDict keys of a message.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
REFUSAL = "refusal"  # a reply that trained nothing: ConfigRecord {REASON, PARTITION_ID}

# Prefix of the ledger entries in a node's context.state (`records.StateLedger`).
LEDGER = "privacy-ledger"

# ConfigRecord keys: the train config the server sends, and a refusal.
SERVER_ROUND = "server-round"
REASON = "reason"

# MetricRecord keys of a train reply: the node's public facts.
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
NUM_PARTITIONS = "num-partitions"  # the node's node-config count (gossip checks it)
TRAIN_LOSS = "train-loss"  # un-noised: only a node without DP (eps=inf) sends it
# What a private node spent (its ledger), cumulative over the run's rounds.
EPS = "eps"
EPS_STRICT = "eps-strict"  # against the server (dp-mode=update: replace-one, 2C)
LIFETIME_EPS = "lifetime-eps"  # composed over every run the node trained in (with a policy)
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
ROUND_STEPS = "round-steps"
PLANNED_STEPS = "planned-steps"

# Train metrics FedAvg aggregates over a round's replies.
EPS_MAX = "eps-max"
EPS_MEAN = "eps-mean"
