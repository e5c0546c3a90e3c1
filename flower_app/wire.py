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
# Where the node trained (run-config `device` resolved on the node): its CUDA index, -1 for
# the CPU (a MetricRecord holds numbers; `flower_app.device.device_name` names it).
DEVICE = "device"
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

# gossip-relay=sealed: a node's public key; a gossip step's routing and sealed blobs; node
# accuracy as counts; an audit query's canaries and their scores.
SEALED = "sealed"  # ConfigRecord: a node's public key; a gossip step's routing and blobs
PUBLIC_KEY = "public-key"
APPLY_STEP = "apply-step"
APPLY_SELF_WEIGHT = "apply-self-weight"
APPLY_FROM = "apply-from"  # sender node ids, in the order the mean sums them
APPLY_KEYS = "apply-keys"  # their public keys
APPLY_WEIGHTS = "apply-weights"
APPLY_BLOBS = "apply-blobs"  # b"" where the sender's blob did not arrive
SEAL_STEP = "seal-step"
SEAL_TO = "seal-to"  # receiver node ids
SEAL_KEYS = "seal-keys"
BLOBS = "blobs"  # a node's reply: one blob per SEAL_TO entry
REFUSED = "refused"  # a node's reply: one line per exchange it did not apply
CORRECT = "correct"  # node accuracy as counts, on the public node test set
TOTAL = "total"
CANARIES = "canaries"  # an audit query: which canaries the node scores on its own model
SCORES = "scores"  # its reply: one score per canary asked
# A white-box audit's train reply: the release minus the model trained from, along every
# canary (an ArrayRecord with one array under this key).
CANARY_INCREMENTS = "canary-increments"

# One cell of a sweep run (flower_app/cells.py): the cell's id and its run-config keys, on
# every message of that cell (a ConfigRecord under CELL). A message without it belongs to
# the run itself.
CELL = "cell"
CELL_ID = "cell-id"
