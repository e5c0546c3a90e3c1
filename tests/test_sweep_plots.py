import logging
import math

import numpy as np
import pytest
from scipy import stats
from sweep_fakes import FakeRunner

from flower_app.config import RunConfig
from flower_app.privacy import PRIVACY_UNIT, TRUST_MODEL
from sim.analysis.final_figures import choose_targets, rounds_table
from sim.analysis.plots import FIGURE_NAMES, draw_all, plot_all
from sim.analysis.report import format_accuracy, write_report
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import t_interval
from sim.sweeps.cli import main

STRATEGIES = RunConfig.__dataclass_fields__["strategy"].metadata["choices"]
HAS_GOSSIP = "gossip" in STRATEGIES


@pytest.mark.parametrize("values", [[0.5, 0.7], [0.81, 0.79, 0.84], [1.0, 2.0, 4.0, 8.0, 3.5]])
def test_t_interval_matches_scipy(values):
    mean, half = t_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (mean - half, mean + half) == (pytest.approx(lo), pytest.approx(hi))


def test_t_interval_has_no_width_with_one_value_and_ignores_nan():
    mean, half = t_interval([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert t_interval([0.5, math.nan, 0.7])[0] == pytest.approx(0.6)
    assert all(math.isnan(x) for x in t_interval([]))
    assert format_accuracy(0.7, math.nan) == "70.0"
    assert format_accuracy(0.7, 0.012) == "70.0 ± 1.2"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A small stored sweep: strategies × ε × 2 seeds (+ topologies when gossip exists)."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    strategies = "fedavg,gossip" if HAS_GOSSIP else "fedavg"
    argv = [
        "run",
        "--strategies",
        strategies,
        "--eps",
        "inf,8,2",
        "--seeds",
        "7,8",
        "--rounds",
        "4",
        "--nodes",
        "9",  # a torus needs rows x cols, both >= 3
        "--out",
        str(out),
    ]
    if HAS_GOSSIP:
        argv += ["--sweep", "gossip:topology=ring,torus"]
    assert main(argv, runner=FakeRunner()) == 0
    return out


def test_every_figure_is_drawn_as_non_empty_png_and_svg(stored):
    figures, skipped = plot_all(stored)
    names = {f.name for f in figures}
    expected = (
        set(FIGURE_NAMES)
        if HAS_GOSSIP
        else set(FIGURE_NAMES) - {"consensus_distance", "topologies"}
    )
    assert names == expected, skipped
    for fig in figures:
        png, svg = fig.files
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert "<svg" in svg.read_text()[:1000]
        assert fig.caption


def test_skipped_figures_are_logged_with_a_reason(tmp_path, caplog):
    out = tmp_path / "s"
    argv = [
        "run",
        "--strategies",
        "fedavg",
        "--eps",
        "2",
        "--rounds",
        "2",
        "--nodes",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv, runner=FakeRunner()) == 0
    caplog.clear()
    logger = logging.getLogger("sim")
    logger.addHandler(caplog.handler)  # main() stops "sim" from propagating to the root
    try:
        with caplog.at_level("INFO", logger="sim"):
            figures, skipped = plot_all(out)
    finally:
        logger.removeHandler(caplog.handler)
    assert [f.name for f in figures] == [
        "accuracy_vs_round",
        "eps_spent_vs_round",
        "accuracy_vs_bytes",
    ]
    reasons = {s.name: s.reason for s in skipped}
    assert "two values of ε" in reasons["final_accuracy_vs_eps"]
    assert "--target-accuracy" in reasons["rounds_to_target"]
    assert "topology is not swept" in reasons["topologies"]
    assert "figure consensus_distance skipped" in caplog.text
    report = (out / "report.md").read_text()
    assert "One seed per cell, so no confidence interval is shown." in report


def test_rounds_to_target_marks_not_reached_instead_of_dropping(stored):
    data = SweepData.load(stored)
    table = rounds_table(data, choose_targets(data))
    assert len(table) == len(data.series) * 3  # every series × ε, reached or not
    fed = table[table["strategy"] == "fedavg"].set_index("eps")
    # fake: 0.9·(1-2^-r) at ε=∞ ends at 0.849; target 0.764 is passed at round 3 (0.79);
    # ε=2 tops out at 0.7·(1-2^-4) = 0.66, so never
    assert fed.loc[math.inf, "rounds"] == 3 and math.isnan(fed.loc[2.0, "rounds"])
    targets = choose_targets(data, target=0.5)
    assert "a fixed 50.0% for all" in targets.how
    assert rounds_table(data, targets)["rounds"].notna().all()


def test_report_embeds_figures_tables_privacy_unit_and_delta(stored):
    path = write_report(stored)
    text = path.read_text()
    assert PRIVACY_UNIT in text and TRUST_MODEL in text and "δ = 1e-05" in text
    assert "| strategy |" in text and "final accuracy (%)" in text and "∞ (no DP)" in text
    assert " ± " in text  # two seeds: intervals
    assert "for every series: 90% of the best non-private (ε = ∞) final accuracy" in text
    for name in ("accuracy_vs_round", "final_accuracy_vs_eps", "rounds_to_target"):
        assert f"](figures/{name}.png)" in text
        assert (stored / "figures" / f"{name}.png").exists()
    if HAS_GOSSIP:
        assert "| gossip | ring |" in text and "spectral gap" in text


def test_plot_and_report_commands_regenerate_from_stored_results(stored, tmp_path, capsys):
    for f in (stored / "figures").iterdir():
        f.unlink()
    assert main(["plot", str(stored)]) == 0
    assert (stored / "figures" / "final_accuracy_vs_eps.svg").exists()
    assert main(["report", str(stored), "--target-accuracy", "0.6"]) == 0
    assert "a fixed 60.0% for all" in (stored / "report.md").read_text()
    assert "Final test accuracy" in capsys.readouterr().out
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_delta_label_falls_back_to_the_default_a_cell_ran_with(stored):
    data = SweepData.load(stored)
    data.cells.drop(columns=["delta"], errors="ignore", inplace=True)
    assert data.delta_text() == f"{RunConfig().delta:g}"


def run_fake_sweep(out, *options):
    """A small FedAvg sweep (ε ∈ {∞, 2}, 2 nodes) through the CLI with the fake runner."""
    argv = ["run", "--strategies", "fedavg", "--eps", "inf,2", "--nodes", "2"]
    assert main([*argv, *options, "--out", str(out)], runner=FakeRunner()) == 0
    return out


def test_a_validation_sweep_never_labels_its_accuracy_as_test_accuracy(tmp_path, capsys):
    out = run_fake_sweep(
        tmp_path / "s",
        *("--seeds", "7,8", "--rounds", "3"),
        *("--set", "validation-samples=100", "--set", "evaluate-on=validation"),
    )
    text = (out / "report.md").read_text()
    assert "test accuracy" not in text.lower()
    assert "Final validation accuracy" in text and "### Validation accuracy per round" in text
    figures, _ = plot_all(out)
    assert all("test accuracy" not in f.caption.lower() for f in figures)
    assert "Final test accuracy" not in capsys.readouterr().out


def test_a_sweep_mixing_test_and_validation_runs_names_both(tmp_path):
    out = run_fake_sweep(
        tmp_path / "s",
        *("--rounds", "2", "--set", "validation-samples=100"),
        *("--sweep", "evaluate-on=test,validation"),
    )
    assert SweepData.load(out).split == "test or validation (per cell)"


def _texts(figure):
    """Every string drawn in a matplotlib figure (notes, titles, labels, legend)."""
    return " ".join(t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")))


def test_every_figure_says_inside_itself_its_seeds_interval_and_what_it_measures(stored):
    drawn = [f for f in draw_all(SweepData.load(stored)) if not hasattr(f, "reason")]
    assert drawn and all(f.files == () for f in drawn)  # drawn, not saved: a notebook shows them
    for f in drawn:
        text = _texts(f.figure)
        assert "seeds 7, 8" in text, f.name
        assert "95% Student-t interval" in text or "no interval" in text, f.name
    accuracy = _texts(next(f for f in drawn if f.name == "accuracy_vs_round").figure)
    assert "fedavg: the global model on the 10,000 test images" in accuracy
    if HAS_GOSSIP:
        assert "gossip: mean over the nodes of each node's own model" in accuracy
    rounds = _texts(next(f for f in drawn if f.name == "rounds_to_target").figure)
    target = choose_targets(SweepData.load(stored))
    assert len(set(target.values.values())) == 1  # one target for every series
    assert f"target: {next(iter(target.values.values())):.1%}" in rounds


def test_a_fedavg_only_sweep_draws_no_panel_of_zeros_and_links_only_files_written(tmp_path):
    out = run_fake_sweep(tmp_path / "s", "--rounds", "2")
    data = SweepData.load(out)
    data.tidy["consensus_distance"] = 0.0  # FedAvg holds one model: distance 0 every round
    names = {r.name: r for r in draw_all(data)}
    assert "non-zero" in names["consensus_distance"].reason
    figures, skipped = plot_all(out, formats=("png",), dpi=40)
    for svg in (out / "figures").glob("*.svg"):
        svg.unlink()
    text = write_report(out, figures=(figures, skipped)).read_text()
    assert "[SVG]" not in text and "](figures/accuracy_vs_round.png)" in text


def test_eps_vs_distance_draws_each_gossip_series_against_local_dp(stored):
    from server_app.network_privacy import NETWORK_PRIVACY
    from sim.analysis.network_figures import NETWORK_PRIVACY as READ

    assert READ == NETWORK_PRIVACY
    figure = next(f for f in draw_all(SweepData.load(stored)) if f.name == "eps_vs_distance")
    if not HAS_GOSSIP:
        assert "network_privacy.json" in figure.reason
        return
    text = " ".join(_texts(figure.figure).split())  # notes are wrapped
    assert "target ε = 8" in text and "target ε = 2" in text and "target ε = ∞" not in text
    assert "Accounted, not audited" in text and "Method: pairwise network DP" in text
    lines = [ln for ax in figure.figure.axes for ln in ax.get_lines() if ln.get_label()[0] != "_"]
    assert {ln.get_label() for ln in lines} == {"gossip (topology=ring)", "gossip (topology=torus)"}
    for line in lines:  # the fake's ε: the target at distance 0, falling by 0.6 a hop
        assert list(line.get_xdata()) == [0, 1, 2, 3]
        assert line.get_ydata()[0] in (8.0, 2.0) and np.all(np.diff(line.get_ydata()) < 0)


def test_eps_vs_distance_draws_a_whitebox_audit_below_the_accountant(stored, tmp_path):
    """A cell with a white-box audit.json gets its lower bound per distance, dashed."""
    import json
    import shutil

    from sim.analysis.network_figures import AUDIT, NETWORK_PRIVACY

    if not HAS_GOSSIP:
        pytest.skip("no gossip strategy")
    out = tmp_path / "s"
    shutil.copytree(stored, out)
    for doc in out.glob(f"runs/*/{NETWORK_PRIVACY}"):
        rows = [{"distance": d, "eps_lower_joint_max": 0.5 / (d + 1)} for d in range(4)]
        (doc.parent / AUDIT).write_text(json.dumps({"mode": "whitebox", "by_distance": rows}))
    figure = next(f for f in draw_all(SweepData.load(out)) if f.name == "eps_vs_distance")
    text = " ".join(_texts(figure.figure).split())
    assert "white-box audit's empirical lower bound" in text and "not audited" not in text
    lines = [ln for ax in figure.figure.axes for ln in ax.get_lines()]
    dashed = [ln for ln in lines if ln.get_label() == "_audit"]
    assert dashed and all(list(ln.get_ydata()) == [0.5, 0.25, 0.5 / 3, 0.125] for ln in dashed)
