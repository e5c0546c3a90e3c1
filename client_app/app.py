"""ClientApp: parse the run config, train the received model on this node's shard, reply."""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_app.config import RunConfig
from flower_app.node import local_round
from flower_app.records import (
    ARRAYS,
    CONFIG,
    LEDGER,
    ledger_from_state,
    ledger_to_record,
    train_reply,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local (DP-)SGD; the privacy ledger persists in `context.state`."""
    # One thread per simulated node: two nodes on two cores beat one node with two threads.
    torch.set_num_threads(int(context.node_config.get("torch-threads", 1)))
    cfg = RunConfig.from_run_config(context.run_config)
    if data_dir := context.node_config.get("data-dir"):  # a device's own copy of the data
        cfg = replace(cfg, data_dir=str(data_dir))
    pid = int(context.node_config["partition-id"])
    out = local_round(
        cfg,
        partition_id=pid,
        num_partitions=int(context.node_config["num-partitions"]),
        weights=msg.content[ARRAYS].to_torch_state_dict(),
        ledger=ledger_from_state(context.state),
        server_round=int(msg.content[CONFIG]["server-round"]),
    )
    if out.ledger is not None:
        context.state[LEDGER] = ledger_to_record(out.ledger)
    return Message(content=train_reply(out, pid), reply_to=msg)
