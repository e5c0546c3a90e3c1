"""A Grid whose nodes run the real ClientApp in this process, recording every message.

No Flower run: each node is a `Context` of its own (its `context.state` is its memory, as on
a SuperNode), and `send_and_receive` hands each message to `client_app.app.app`, exactly as
a SuperNode would, optionally through a `tamper` hook that plays a malicious relay.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo

from client_app.app import app
from flower_app.config import RunConfig
from flower_app.model import build_model
from server_app.evaluation import central_test_sets, model_evaluator
from strategies import STRATEGIES

RUN_ID = 4242
# Small and fast, with DP on and seeded noise, so two runs can be compared bit for bit.
TINY = {
    "strategy": "gossip",
    "model": "mlp",
    "partitioner": "iid",
    "samples-per-node": 64,
    "batch-size": 32,
    "local-steps": 2,
    "num-server-rounds": 2,
    "eps": 8.0,
    "noise-seed": 11,
    "test-samples": 400,
    "node-eval-samples": 200,
}


class InProcessGrid:
    """`num_nodes` simulated SuperNodes; `sent`/`received` hold every message, in order."""

    def __init__(
        self,
        run_config: dict,
        num_nodes: int,
        tamper: Callable[[Message], Message] | None = None,
        drop: Callable[[Message], bool] | None = None,
    ) -> None:
        self.node_ids = [10_000 + 37 * i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node in enumerate(self.node_ids)
        }
        self.tamper = tamper
        self.drop = drop  # a message it returns True for never reaches its node: no reply
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def get_nodes(self):
        start = datetime(2026, 1, 1, tzinfo=UTC)
        return [
            NodeInfo(node_id=n, registered_at=(start + timedelta(milliseconds=i)).isoformat())
            for i, n in enumerate(self.node_ids)
        ]

    def push_messages(self, messages):
        """Deliver now (as `send_and_receive`); `pull_messages` hands the replies back."""
        self._replies = getattr(self, "_replies", {})
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            for reply in self.send_and_receive([msg]):
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            if self.drop and self.drop(msg):
                continue
            delivered = self.tamper(msg) if self.tamper else msg
            reply = app(delivered, self.contexts[msg.metadata.dst_node_id])
            self.received.append(reply)
            replies.append(reply)
        return replies

    def node_model(self, partition_id: int) -> np.ndarray:
        """A sealed node's own model, flattened as the open relay holds it (float64)."""
        state = self.contexts[self.node_ids[partition_id]].state
        return np.concatenate(
            [a.ravel() for a in state[f"sealed-model:{RUN_ID}"].to_numpy_ndarrays()]
        )


def run_gossip(run_config: dict, num_nodes: int, *, tamper=None, drop=None, after_round=None):
    """Run STRATEGIES['gossip'] for the config's rounds against an InProcessGrid."""
    cfg = RunConfig.from_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes, tamper, drop)
    _, node_test = central_test_sets(cfg)
    strategy = STRATEGIES["gossip"](cfg, num_nodes, model_evaluator(cfg, node_test))

    def evaluate_fn(server_round, arrays):
        if server_round and after_round is not None:
            after_round(server_round, strategy, grid)

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict()),
        num_rounds=cfg.num_server_rounds,
        timeout=60,
        evaluate_fn=evaluate_fn,
    )
    return strategy, grid
