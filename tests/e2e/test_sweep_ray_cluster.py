"""`fl-sweep run --ray-address A,B`: two real Ray heads the test owns, one cell on each at once."""

import json

import pytest

import sim.launch.simulation
import sim.sweeps.cli
from sim.launch.flwr_cli import flower_env
from sim.launch.processes import processes_under
from sim.launch.ray_head import RayHead
from sim.launch.simulation import SimulationLink

pytestmark = pytest.mark.e2e


def drivers(head: RayHead) -> list[str]:
    """Ray drivers that connected to this head: one per simulation run that used it."""
    return sorted(p.name for p in head.root.glob("ray/session_latest/logs/python-core-driver-*"))


def test_a_sweep_on_two_given_ray_clusters_runs_one_cell_on_each_at_once(
    tmp_path, monkeypatch, capsys
):
    links = []

    class RecordedLink(SimulationLink):
        def __init__(self, **kwargs):
            home = tmp_path / f"link-{len(links)}"
            home.mkdir()
            super().__init__(home, **kwargs)
            links.append(self)

        def __enter__(self):
            return super().__enter__()

    monkeypatch.setattr(sim.launch.simulation, "SimulationLink", RecordedLink)
    home = tmp_path / "ray-home"
    home.mkdir()
    heads = [RayHead(flower_env(home), num_cpus=1) for _ in range(2)]
    out = tmp_path / "sweep"
    try:
        for head in heads:
            head.start()
        argv = ["run", "--strategies", "fedavg", "--eps", "2", "--seeds", "7,8"]
        argv += ["--nodes", "2", "--rounds", "2", "--timeout", "600", "--out", str(out)]
        argv += ["--set", "samples-per-node=100", "--set", "test-samples=300"]
        argv += ["--ray-address", ",".join(h.address for h in heads)]
        assert sim.sweeps.cli.main(argv) == 0
        cells = json.loads((out / "manifest.json").read_text())["cells"]
        assert [c["status"] for c in cells] == ["completed", "completed"], cells
        # Each cell's simulation joined one of the given clusters, none started its own.
        assert [link.ray_head for link in links] == [None, None]
        assert sorted(link.ray_address for link in links) == sorted(h.address for h in heads)
        used = [drivers(h) for h in heads]
        print(f"drivers per given Ray head: {used}")  # noqa: T201
        assert [len(u) for u in used] == [1, 1], f"not one cell per cluster: {used}"
        # The heads outlive the sweep: they are the user's, not the sweep's.
        assert all(h.process.poll() is None for h in heads)
        for link in links:
            assert link.process.poll() is not None and not processes_under(link.home)
    finally:
        for head in heads:
            head.stop()
    assert all(h.process.poll() is not None for h in heads)
