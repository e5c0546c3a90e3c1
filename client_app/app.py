"""ClientApp: the node's policy and ledger, then one round of local (DP-)SGD, then the reply."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.cell import run_of
from client_app.replies import refusal_reply, train_reply
from client_app.sealed import (
    SealedState,
    evaluate_own,
    gossip_step,
    score_canaries,
    sealed_train_reply,
)
from flower_app.config import ConfigError, RunConfig
from flower_app.data import DeviceDataError
from flower_app.ledger import FileLedger, LedgerError
from flower_app.node import Refused, serve_train
from flower_app.policy import NodePolicy, PolicyError, torch_threads
from flower_app.records import StateLedger
from flower_app.train import GradientCheckError, quiet_opacus_logging
from flower_app.wire import ARRAYS, CONFIG, SERVER_ROUND

app = ClientApp()
# gossip-relay=sealed: a gossip exchange (seal for partners, open and mix), and node accuracy.
app.train("gossip")(gossip_step)
app.evaluate()(evaluate_own)
app.query("audit")(score_canaries)  # an audit: the node scores canaries on its own model


def shard_of(node_config: dict[str, Any]) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, checked."""
    try:
        pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise PolicyError(
            f"node config needs integers partition-id and num-partitions (got {dict(node_config)})"
        ) from None
    if not 0 <= pid < count:
        raise PolicyError(f"partition-id={pid} is not valid for num-partitions={count}")
    return pid, count


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train if the node's policy accepts the run; otherwise reply why, having trained nothing."""
    quiet_opacus_logging()
    pid = -1
    sealed: SealedState | None = None
    try:
        pid, num_partitions = shard_of(dict(context.node_config))  # first: refusals name it
        policy = NodePolicy.from_node_config(context.node_config)
        # One thread per simulated node: two nodes on two cores beat one with two threads.
        torch.set_num_threads(torch_threads(context.node_config))
        run_config, run_id = run_of(msg, context)  # a sweep cell's config and key, or the run's
        cfg = RunConfig.from_run_config(run_config)
        own_data = str(context.node_config.get("data-dir", ""))  # the device's own files
        store = FileLedger(policy.ledger_dir) if policy.ledger_dir else StateLedger(context.state)
        sealed = SealedState(context, run_id) if cfg.sealed_relay else None  # the node's model
        out = serve_train(
            cfg,
            policy,
            store,
            run_id=run_id,
            partition_id=pid,
            num_partitions=num_partitions,
            weights=(
                sealed.start_weights(msg) if sealed else msg.content[ARRAYS].to_torch_state_dict()
            ),
            server_round=int(msg.content[CONFIG][SERVER_ROUND]),
            own_data=own_data,
        )
    except DeviceDataError as err:
        out = Refused(f"node config data-dir: {err}")
    except (PolicyError, ConfigError, LedgerError, GradientCheckError) as err:
        out = Refused(str(err))
    if isinstance(out, Refused):
        return Message(content=refusal_reply(out, pid), reply_to=msg)
    if sealed:
        return Message(content=sealed_train_reply(out, pid, sealed), reply_to=msg)
    return Message(content=train_reply(out, pid), reply_to=msg)
