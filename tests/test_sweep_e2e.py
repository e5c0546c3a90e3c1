"""A real `fl-sweep run`: SuperLink, simulation runtime, Ray and Opacus, tiny grid."""

import json

import pandas as pd
import pytest

import sim.launch.simulation
import sim.sweeps.cli
from sim.launch.simulation import SimulationLink

pytestmark = pytest.mark.e2e

# Gossip, the strategy with more moving parts (FedAvg's sweep cells run in the audit test).
STRATEGIES = ["gossip"]


def test_a_tiny_real_sweep_completes_every_cell_and_stops_its_superlink(
    tmp_path, monkeypatch, capsys
):
    links = []

    class RecordedLink(SimulationLink):
        def __enter__(self):
            links.append(self)
            return super().__enter__()

    monkeypatch.setattr(sim.launch.simulation, "SimulationLink", RecordedLink)
    out = tmp_path / "sweep"
    argv = [
        "run",
        "--strategies",
        ",".join(STRATEGIES),
        "--eps",
        "inf,2",
        "--seeds",
        "7",
        "--nodes",
        "3",
        "--rounds",
        "2",
        "--set",
        "samples-per-node=100",
        "--set",
        "test-samples=500",
        "--timeout",
        "600",
        "--out",
        str(out),
    ]
    rc = sim.sweeps.cli.main(argv)
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    errors = {c["id"]: c["error"] for c in cells if c["status"] != "completed"}
    assert rc == 0, errors
    assert len(cells) == 2 * len(STRATEGIES) and not errors
    assert all(c["run_id"] for c in cells)
    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == len(cells) * 2
    assert sorted(df.groupby("cell")["round"].apply(list).tolist()) == [[1, 2]] * len(cells)
    # Gossip runs the sealed relay by default: no central accuracy, only its nodes' own.
    assert df["node_acc_mean"].between(0, 1).all()
    assert df.loc[df["strategy"] == "fedavg", "accuracy"].between(0, 1).all()
    for name in ("accuracy_vs_round", "final_accuracy_vs_eps", "eps_spent_vs_round"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 0
    assert (out / "report.md").exists()
    assert "Final test accuracy" in capsys.readouterr().out
    assert len(links) == 1 and links[0].process.poll() is not None, "SuperLink still running"
    # resuming a finished sweep runs nothing and starts no SuperLink
    assert sim.sweeps.cli.main(argv) == 0
    assert len(links) == 1 and len(pd.read_csv(out / "sweep.csv")) == len(cells) * 2
