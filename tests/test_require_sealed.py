"""A node whose operator requires the sealed relay never hands its model to the server.

The attack: the server asks such a node for a FedAvg round, or for gossip through the open
relay (where the server reads and averages every model). The node must refuse and send no
model; through the sealed relay it trains and still sends no model.
"""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import app
from flower_app.config import RunConfig
from flower_app.model import build_model
from flower_app.policy import NodePolicy, PolicyError
from flower_app.wire import ARRAYS, CONFIG, REASON, REFUSAL, SEALED, SERVER_ROUND

pytestmark = pytest.mark.usefixtures("task_identity")

RUN = {"model": "mlp", "samples-per-node": 64, "batch-size": 32, "local-steps": 1,
       "num-server-rounds": 2, "eps": 4.0, "partitioner": "iid"}  # fmt: skip


def _train(run_config, tmp_path):
    node_config = {
        "partition-id": 0,
        "num-partitions": 4,
        "max-eps": 8.0,
        "ledger-dir": str(tmp_path / "ledger"),
        "require-sealed-relay": "true",
    }
    context = Context(run_id=5, node_id=9, node_config=node_config, state=RecordDict(),
                      run_config=RunConfig.from_run_config(run_config).to_dict())  # fmt: skip
    content = RecordDict({ARRAYS: ArrayRecord(build_model("mlp", seed=0).state_dict()),
                          CONFIG: ConfigRecord({SERVER_ROUND: 1})})  # fmt: skip
    return app(Message(content=content, dst_node_id=9, message_type="train"), context)


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ({"strategy": "fedavg"}, "strategy=fedavg sends this node's model to the server"),
        ({"strategy": "gossip", "gossip-relay": "open"}, "gossip-relay=open"),
    ],
)
def test_a_run_that_shows_the_server_the_model_is_refused(tmp_path, keys, why):
    reply = _train(RUN | keys, tmp_path)
    assert ARRAYS not in reply.content and REFUSAL in reply.content
    reason = str(reply.content[REFUSAL][REASON])
    assert why in reason and "require-sealed-relay=true" in reason


def test_the_sealed_relay_trains_and_sends_no_model(tmp_path):
    reply = _train(RUN | {"strategy": "gossip", "gossip-relay": "sealed"}, tmp_path)
    assert REFUSAL not in reply.content and ARRAYS not in reply.content
    assert SEALED in reply.content  # only its public key


def test_the_key_is_a_boolean():
    with pytest.raises(PolicyError, match="require-sealed-relay='yes' is not valid"):
        NodePolicy.from_node_config({"require-sealed-relay": "yes"})
