"""`fl-bench --only epoch`: dp_vs_plain alone, without the Flower runs (the epochs faked)."""

from __future__ import annotations

from sim.bench import benchmarks
from sim.bench.cli import build_parser
from sim.bench.sizes import Sizes
from sim.bench.table import markdown

SMALL = Sizes(rounds=2, run_config={"samples-per-node": 64, "test-samples": 100}, epoch_repeats=2)


def test_only_epoch_measures_the_epochs_alone_with_at_least_five_repeats(monkeypatch):
    seen = []

    def epochs(cfg, repeats):
        seen.append(repeats)
        modes = {"fast": 0.375, "hooks": 0.5}
        return {"plain": {"s": 0.25, "ratio": 1.0}} | {
            m: {"s": s, "ratio": s / 0.25, "diff": 0.0, "empty_batches_ok": True}
            for m, s in modes.items()
        }

    def nothing_else(*args, **kwargs):
        raise AssertionError("--only epoch ran another measurement")

    monkeypatch.setattr(benchmarks, "epoch_ratios", epochs)
    monkeypatch.setattr(benchmarks, "keyed_randomness", nothing_else)
    monkeypatch.setattr(benchmarks, "SimulationLink", nothing_else)
    monkeypatch.setattr("sim.bench.local_epoch.GRAD_SAMPLE_MODES", ("fast", "hooks"))
    results = benchmarks.run_bench(SMALL, lambda line: None, only="epoch")
    assert seen == [5]
    assert results["dp_vs_plain"] == 1.5 and results["details"]["default_mode"] == "fast"
    table = markdown(results)
    assert "| dp_vs_plain (one epoch, default mode) | 1.50 | <= 1.5 |" in table
    assert "| one epoch, hooks | 0.500 s (x2.00" in table
    assert build_parser().parse_args(["--only", "epoch"]).only == "epoch"
