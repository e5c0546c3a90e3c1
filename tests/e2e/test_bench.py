"""fl-bench's code end to end at tiny sizes: every key present, the ratios computed right.

One Flower run is real (through the session's SuperLink); every other Flower run the bench
times replays its rounds, so the ratios of equal runs must be exactly 1. Each path the bench
times is tested on its own elsewhere (test_fedavg_run, test_gossip_run, test_sealed_run,
test_deployment, test_sweep_e2e); fl-bench measures, this only checks its code. The local
epochs (every Opacus mode against hooks) and the plain loops run for real.
"""

import csv
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from flower_app.config import GRAD_SAMPLE_MODES
from sim.bench.benchmarks import main
from sim.bench.sizes import Sizes
from sim.bench.table import markdown
from tests.sweep_fakes import FakeRunner

pytestmark = pytest.mark.e2e

TINY = Sizes(
    nodes=3,
    rounds=2,
    run_config={"samples-per-node": 100, "test-samples": 300, "node-eval-samples": 100},
    epoch_repeats=1,
    scale_nodes=(3, 4),
    scale_rounds=2,
    scale_config={"samples-per-node": 20, "test-samples": 200, "node-eval-samples": 50},
    deploy_config={
        "strategy": "fedavg",
        "eps": 8.0,
        "num-server-rounds": 2,
        "samples-per-node": 60,
        "test-samples": 200,
    },
    deploy_subprocess=False,
    sweep_eps=(2.0,),
    sweep_nodes=3,
    sweep_rounds=2,
    sweep_config={"samples-per-node": 60, "test-samples": 200, "node-eval-samples": 50},
)


class Replay:
    """The first Flower run for real; every later one returns its timing again."""

    def __init__(self, real):
        self.real, self.timing, self.configs = real, None, []

    def __call__(self, link, run_config, num_nodes, out):
        self.configs.append(dict(run_config))
        if self.timing is None:
            self.timing = self.real(link, run_config, num_nodes, out)
        return self.timing


class ReplayedDeployment:
    """A deployment whose run writes the replayed rounds (Deployment's submit/wait shape)."""

    def __init__(self, replay, folder, nodes, **kwargs):
        self.replay = replay

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def submit(self, config):
        folder = Path(config["results-dir"]) / config["run-name"]
        folder.mkdir(parents=True)
        rows = self.replay.timing.rows
        with (folder / "rounds.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return 1

    def wait(self, run_id, timeout):
        return SimpleNamespace(completed=True)


@pytest.fixture(scope="module")
def bench_results(superlink, tmp_path_factory):
    """One bench run shared by this module's tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield bench(superlink, tmp_path_factory.mktemp("bench"), monkeypatch)


def bench(superlink, tmp_path, monkeypatch):
    import sim.bench.benchmarks
    import sim.bench.flower_runs
    import sim.bench.sweep_timing

    replay = Replay(sim.bench.flower_runs.flower_run)
    monkeypatch.setattr(sim.bench.benchmarks, "QUICK", TINY)
    monkeypatch.setattr(sim.bench.benchmarks, "flower_run", replay)
    monkeypatch.setattr(sim.bench.flower_runs, "flower_run", replay)
    monkeypatch.setattr(
        sim.bench.flower_runs, "Deployment", lambda *a, **k: ReplayedDeployment(replay, *a, **k)
    )
    monkeypatch.setattr(sim.bench.sweep_timing, "_runner", lambda mode, link, folder: FakeRunner())
    # The session's SuperLink instead of one of its own (its owner starts and stops it).
    for module in (sim.bench.benchmarks, sim.bench.sweep_timing):
        monkeypatch.setattr(module, "SimulationLink", lambda: nullcontext(superlink))
    out = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text()), replay


def test_bench_reports_every_ratio(bench_results):
    results, replay = bench_results
    for key in (
        "flower_vs_raw",
        "gossip_flower_vs_raw",
        "dp_vs_plain",
        "dp_round_vs_plain_round",
        "eval_share",
        "deploy_round_vs_sim_round",
        "sealed_vs_open_round",
        "sweep_vs_cells",
    ):
        assert results[key] > 0, key
    # Replayed runs are equal runs: their ratios are exactly 1.
    for key in ("dp_round_vs_plain_round", "sealed_vs_open_round", "deploy_round_vs_sim_round"):
        assert results[key] == pytest.approx(1.0), key
    assert results["scale_per_node_growth"] == pytest.approx(3 / 4 - 1)
    assert 0 <= results["eval_share"] < 1
    assert [s["nodes"] for s in results["scale"]] == [3, 4]
    for s in results["scale"]:
        assert s["s_per_round"] > 0 and s["peak_rss_mb"] > 0
    # What the bench asked Flower to run: both strategies, the sealed relay, no DP, scale.
    asked = [(c["strategy"], c.get("gossip-relay"), c["eps"]) for c in replay.configs]
    assert ("gossip", "sealed", TINY.eps) in asked and ("fedavg", "open", float("inf")) in asked
    assert results["machine"]["cores"] >= 1 and results["versions"]["flwr"] == "1.42.0"


def test_bench_checks_every_opacus_mode_and_the_sweep(bench_results):
    results, _ = bench_results
    for mode in GRAD_SAMPLE_MODES:
        epoch = results["details"]["epoch"][mode]
        assert epoch["ratio"] > 0
        assert epoch["diff"] < 1e-4, f"{mode} computes another update than hooks"
    assert results["details"]["epoch"]["hooks"]["empty_batches_ok"]
    assert results["details"]["epoch"]["fast"]["empty_batches_ok"]
    assert results["details"]["fastest_correct_mode"] in GRAD_SAMPLE_MODES
    assert results["details"]["deploy"]["deploy_round_s_steady"] > 0
    sweep = results["details"]["sweep"]
    assert sweep["one_run_vs_steady_rounds"] > 0 and sweep["run_per_cell_vs_steady_rounds"] > 0
    table = markdown(results)
    assert all(k in table for k in ("flower_vs_raw", "deploy_round_vs_sim_round", "sweep_vs_cells"))


def test_bench_only_scale_reports_the_growth(bench_results, tmp_path):
    out = tmp_path / "scale.json"
    assert main(["--quick", "--only", "scale", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [s["nodes"] for s in results["scale"]] == [3, 4]
    assert results["scale_per_node_growth"] == pytest.approx(3 / 4 - 1)
    assert "flower_vs_raw" not in results
