"""fl-bench's pieces at tiny sizes: every key present and positive (no time is asserted).

A smoke test of the benchmark's code, through the session's SuperLink; fl-bench measures.
"""

import json
from contextlib import nullcontext

import pytest

from flower_app.config import GRAD_SAMPLE_MODES
from sim.bench.benchmarks import main
from sim.bench.sizes import Sizes
from sim.bench.table import markdown

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]  # it starts a deployment too

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


def test_bench_reports_every_ratio(superlink, tmp_path, monkeypatch):
    import sim.bench.benchmarks
    import sim.bench.sweep_timing

    monkeypatch.setattr(sim.bench.benchmarks, "QUICK", TINY)
    # The session's SuperLink instead of one of its own (its owner starts and stops it).
    for module in (sim.bench.benchmarks, sim.bench.sweep_timing):
        monkeypatch.setattr(module, "SimulationLink", lambda: nullcontext(superlink))
    out = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
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
    assert results["eval_share"] < 1
    assert [s["nodes"] for s in results["scale"]] == [3, 4]
    assert results["scale_per_node_growth"] > -1
    for s in results["scale"]:
        assert s["s_per_round"] > 0 and s["peak_rss_mb"] > 0
    assert results["machine"]["cores"] >= 1 and results["versions"]["flwr"] == "1.42.0"
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
