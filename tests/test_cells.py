"""A sweep's cells in one Flower run: the cell list, the ServerApp's loop, the node's view.

The in-process test runs the real ServerApp experiment and the real ClientApp for two cells
in one "run" (one run id, one state per node), as a sweep run does.
"""

import json
import threading

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import app
from client_app.cell import run_of
from flower_app.cells import Cell, read_cells, read_status, write_cells
from flower_app.config import ConfigError, RunConfig
from flower_app.model import build_model
from flower_app.results import RunSummary
from flower_app.wire import ARRAYS, CELL, CELL_ID, CONFIG, LEDGER, REASON, REFUSAL, SERVER_ROUND
from server_app.app import run_experiment
from server_app.cells import CellGrid, run_cells
from server_app.rejections import RunRejected
from sim.launch.flwr_cli import RunOutcome
from sim.sweeps.runner import COMPLETED, FAILED, Sweep
from sim.sweeps.runners import BatchedRunner
from sim.sweeps.spec import SweepSpec, expand
from tests.inprocess_grid import RUN_ID, InProcessGrid
from tests.inprocess_grid import TINY as INPROCESS_TINY
from tests.sweep_fakes import FakeRunner

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_cell_list_round_trips_exactly_and_a_bad_one_is_one_line(tmp_path):
    cells = [Cell("a", {"eps": float("inf"), "seed": 7}), Cell("b", {"strategy": "gossip"})]
    write_cells(tmp_path / "c.json", cells)
    assert read_cells(tmp_path / "c.json") == cells
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable cell list") as err:
        read_cells(tmp_path / "bad.json")
    assert "\n" not in str(err.value)
    write_cells(tmp_path / "twice.json", [cells[0], cells[0]])
    with pytest.raises(ConfigError, match="distinct ids"):
        read_cells(tmp_path / "twice.json")


def test_run_cells_runs_each_cell_under_its_own_config_and_goes_on_after_a_failure(tmp_path):
    path = tmp_path / "cells.json"
    write_cells(path, [Cell("ok", {"seed": 1}), Cell("refused", {}), Cell("crash", {}),
                       Cell("last", {"seed": 4})])  # fmt: skip
    seen = []

    def run_one(grid, run_config):
        seen.append((grid._cell.id, run_config["seed"], run_config["cells"]))
        if grid._cell.id == "refused":
            raise RunRejected("invalid run: eps=-1 is not valid")
        if grid._cell.id == "crash":
            raise RuntimeError("boom")

    run_cells(object(), {"cells": str(path), "seed": 9}, run_one)
    assert seen == [("ok", 1, ""), ("refused", 9, ""), ("crash", 9, ""), ("last", 4, "")]
    ended = read_status(path)
    assert {k: v["status"] for k, v in ended.items()} == {
        "ok": "completed", "refused": "failed", "crash": "failed", "last": "completed"
    }  # fmt: skip
    assert ended["refused"]["error"] == "invalid run: eps=-1 is not valid"
    assert ended["crash"]["error"] == "RuntimeError: boom"


def test_an_unreadable_cell_list_fails_the_run_in_one_line(tmp_path):
    with pytest.raises(RunRejected, match="not a readable cell list"):
        run_cells(object(), {"cells": str(tmp_path / "missing.json")}, lambda g, c: None)


def _message(content):
    return Message(content=content, dst_node_id=5, message_type="train")


def test_a_node_reads_a_cells_config_and_keeps_its_state_under_the_cells_key():
    context = Context(
        run_id=77, node_id=5, node_config={}, state=RecordDict(), run_config={"eps": 8.0, "seed": 7}
    )
    plain = _message(RecordDict())
    assert run_of(plain, context) == ({"eps": 8.0, "seed": 7}, "77")
    record = ConfigRecord({CELL_ID: "fedavg-eps2", "eps": 2.0})
    tagged = _message(RecordDict({CELL: record}))
    config, key = run_of(tagged, context)
    assert config == {"eps": 2.0, "seed": 7, "cells": ""} and key == "77:fedavg-eps2"


def test_cell_grid_tags_every_message_it_sends():
    class Inner:
        def __init__(self):
            self.pushed = []

        def push_messages(self, messages):
            self.pushed += list(messages)
            return ["1"]

        def send_and_receive(self, messages, *, timeout=None):
            self.pushed += list(messages)
            return []

    inner = Inner()
    grid = CellGrid(inner, Cell("c1", {"eps": 2.0}))
    grid.push_messages([_message(RecordDict())])
    grid.send_and_receive([_message(RecordDict())])
    assert [dict(m.content[CELL]) for m in inner.pushed] == [{CELL_ID: "c1", "eps": 2.0}] * 2


TINY = {k: v for k, v in INPROCESS_TINY.items() if k not in ("strategy", "eps")}


def test_two_cells_in_one_run_are_two_experiments_to_the_nodes(tmp_path):
    """Real ServerApp experiments, real ClientApp: one run id, one state per node."""
    base = RunConfig().to_dict() | TINY | {"results-dir": str(tmp_path)}
    cells = [
        Cell("fedavg-eps4", {"strategy": "fedavg", "eps": 4.0, "run-name": "fedavg-eps4"}),
        Cell("gossip-eps4", {"strategy": "gossip", "eps": 4.0, "run-name": "gossip-eps4"}),
    ]
    write_cells(tmp_path / "cells.json", cells)
    grid = InProcessGrid(base | {"cells": str(tmp_path / "cells.json")}, 3)
    run_cells(grid, base | {"cells": str(tmp_path / "cells.json")}, run_experiment)

    assert {k: v["status"] for k, v in read_status(tmp_path / "cells.json").items()} == {
        "fedavg-eps4": "completed", "gossip-eps4": "completed"
    }  # fmt: skip
    for cell in cells:
        folder = tmp_path / cell.id
        config = json.loads((folder / "config.json").read_text())
        assert config["strategy"] == cell.run_config["strategy"] and config["cells"] == ""
        assert RunSummary.read(folder).completed
    # Each node planned and spent a ledger per cell (ε 4 each), never one shared by both.
    state = grid.contexts[grid.node_ids[0]].state
    ledgers = sorted(k for k in state.keys() if k.startswith(LEDGER))
    assert ledgers == [
        f"{LEDGER}:run-{RUN_ID}:fedavg-eps4/partition-0",
        f"{LEDGER}:run-{RUN_ID}:gossip-eps4/partition-0",
    ]
    assert f"sealed-node:{RUN_ID}:gossip-eps4" in state.keys()  # fresh keys for the cell


class FakeLink:
    """A SuperLink whose 'Flower run' runs the ServerApp's cell loop with a fake experiment."""

    connection = "fake"

    def __init__(self, crash_at=()):
        self.crash_at, self.runs, self.stopped = set(crash_at), [], []
        self.threads = {}

    def submit(self, run_config, *, num_nodes):
        run_id = str(len(self.runs) + 1)
        self.runs.append([c.id for c in read_cells(run_config["cells"])])
        fake = FakeRunner()

        def server_app():
            def run_one(grid, cfg):
                if cfg["run-name"] in self.crash_at:
                    self.crash_at.discard(cfg["run-name"])
                    raise SystemExit  # the ServerApp's process dies mid-cell
                fake(cfg, num_nodes=num_nodes, on_poll=lambda: None)

            try:
                run_cells(object(), run_config, run_one)
            except SystemExit:
                pass

        self.threads[run_id] = threading.Thread(target=server_app)
        self.threads[run_id].start()
        return run_id

    def status(self, run_id):
        alive = self.threads[run_id].is_alive()
        return RunOutcome(run_id, "running" if alive else "finished:completed", "", 1.0)

    def flwr(self, *args, timeout=120):
        self.stopped.append(args[1])

    def logs(self, run_id):
        return f"log of run {run_id}"


def test_a_sweep_runs_all_its_cells_in_one_flower_run_and_resumes_after_a_crash(tmp_path):
    spec = SweepSpec(grid={"strategy": ["fedavg"], "eps": [8.0, 2.0], "seed": [7, 8]},
                     fixed={"num-server-rounds": 2}, nodes=3)  # fmt: skip
    cells = expand(spec)
    link = FakeLink(crash_at={cells[1].id})
    failed = Sweep(tmp_path, spec, cells).run(BatchedRunner(link, tmp_path / "batches"))
    # The run died in cell 2: it failed, and one more run took the two cells after it.
    assert link.runs == [[c.id for c in cells], [c.id for c in cells[2:]]]
    assert failed == [cells[1].id]
    again = FakeLink()
    assert Sweep(tmp_path, spec, cells).run(BatchedRunner(again, tmp_path / "batches")) == []
    assert again.runs == [[cells[1].id]]  # only the failed cell ran again
    entries = json.loads((tmp_path / "manifest.json").read_text())["cells"]
    assert [e["status"] for e in entries] == [COMPLETED] * 4
    assert FAILED not in {e["status"] for e in entries}


def _train_message(cell_keys, model="mlp"):
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(build_model(model, seed=0).state_dict()),
            CONFIG: ConfigRecord({SERVER_ROUND: 1}),
            CELL: ConfigRecord({CELL_ID: "c", **cell_keys}),
        }
    )
    return Message(content=content, dst_node_id=5, message_type="train")


def test_a_cell_cannot_carry_a_config_past_the_nodes_floor(tmp_path):
    """The attack: a run config within the node's max-eps, a cell's keys far past it."""
    node_config = {"partition-id": 0, "num-partitions": 2, "max-eps": 4.0,
                   "ledger-dir": str(tmp_path / "ledger")}  # fmt: skip
    context = Context(run_id=9, node_id=5, node_config=node_config, state=RecordDict(),
                      run_config=RunConfig(eps=2.0, model="mlp").to_dict())  # fmt: skip
    for keys, why in (
        ({"eps": 100.0}, "eps=100 exceeds this node's max-eps=4"),
        ({"eps": float("inf")}, "eps=inf (no DP) exceeds this node's max-eps=4"),
        ({"noise-seed": 3}, "noise-seed"),
    ):
        reply = app(_train_message(keys), context)
        assert REFUSAL in reply.content, keys
        assert why in str(reply.content[REFUSAL][REASON])
    ledger = tmp_path / "ledger"
    assert not ledger.exists() or "partition" not in "".join(
        p.read_text() for p in ledger.glob("*.json")
    )


def test_a_new_cell_drops_the_earlier_cells_keys_and_model_from_the_node():
    import numpy as np

    from client_app.sealed import SealedState

    context = Context(run_id=77, node_id=5, node_config={}, state=RecordDict(), run_config={})
    first = SealedState(context, "77:a")
    first.store(["w"], [np.ones(3)])
    assert {"sealed-node:77:a", "sealed-model:77:a"} <= set(context.state.keys())
    second = SealedState(context, "77:b")
    assert not any(k.endswith(":77:a") for k in context.state.keys())
    assert second.keys.public_bytes() != first.keys.public_bytes()
    assert SealedState(context, "77:b").keys.public_bytes() == second.keys.public_bytes()
