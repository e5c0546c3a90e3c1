"""`fl-sweep compare`: several stored sweeps side by side."""

import math

import pytest

from sim.analysis.compare import retained, verdicts
from sim.analysis.report import preset_of
from sim.sweeps.cli import main
from tests.sweep_fakes import FakeRunner


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    outs = []
    for name, eps in (("a", "inf,8,2"), ("b", "inf,2")):
        out = root / name
        argv = ["run", "--strategies", "fedavg", "--eps", eps, "--seeds", "7"]
        argv += ["--rounds", "4", "--nodes", "3", "--out", str(out)]
        assert main(argv, runner=FakeRunner()) == 0
        outs.append(out)
    return outs


def test_compare_lines_up_series_and_eps_and_marks_missing_cells(two_sweeps, capsys):
    capsys.readouterr()
    assert main(["compare", *map(str, two_sweeps), "--names", "left,right"]) == 0
    text = capsys.readouterr().out
    assert "| strategy | ε | left: accuracy (%) | left: ε spent | right: accuracy (%) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| fedavg | 8 |")]
    assert len(rows) == 2 and rows[0].rstrip(" |").endswith("–")  # eps 8 only in `left`
    assert "Rounds to reach 90% of the same sweep's best non-private final accuracy" in text
    assert "for every series: 90% of the best non-private" in text.split("- left: target ")[1]


def test_compare_draws_one_panel_per_sweep(two_sweeps, tmp_path):
    png = tmp_path / "fig" / "cmp.png"
    assert main(["compare", *map(str, two_sweeps), "--figure", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_compare_refuses_a_name_count_mismatch(two_sweeps, capsys):
    assert main(["compare", *map(str, two_sweeps), "--names", "only-one"]) == 2
    assert "--names gives 1 names for 2 folders" in capsys.readouterr().err


INF = math.inf


def test_retained_share_of_the_gain_over_chance():
    assert retained(0.55, 1.0) == pytest.approx(0.5)
    assert retained(0.05, 0.9) == 0.0  # below chance counts as nothing kept
    assert math.isnan(retained(0.3, 0.1))  # no gain to keep


def test_verdicts_confirm_the_tutorials_claims_when_the_numbers_do():
    finals = {"fedavg": {INF: 0.9, 8: 0.85, 1: 0.3}, "gossip": {INF: 0.8, 8: 0.7, 1: 0.6}}
    rounds = {"fedavg": {INF: 3, 8: 4, 1: math.nan}, "gossip": {INF: 9, 8: 12, 1: 15}}
    claim1, claim2 = verdicts(finals, rounds)
    assert claim1.startswith("- FedAvg converges faster under weak privacy: holds")
    assert "ε=8: FedAvg 4 rounds, gossip 12 rounds" in claim1
    assert claim2.startswith("- gossip degrades more gracefully as noise grows: holds")
    assert "FedAvg 25%, gossip 71%" in claim2


def test_verdicts_refute_and_call_all_chance_evidence_untestable():
    finals = {"fedavg": {INF: 0.9, 2: 0.1, 1: 0.1}, "gossip": {INF: 0.5, 2: 0.1, 1: 0.09}}
    rounds = {"fedavg": {INF: 10}, "gossip": {INF: 4}}
    claim1, claim2 = verdicts(finals, rounds)
    assert "does not hold" in claim1 and "ε=2: FedAvg never, gossip never" in claim1
    assert "untestable: both strategies are at chance" in claim2
    assert verdicts({"fedavg": {INF: 0.9}}, {}) == ["- needs both fedavg and gossip cells"]
    claim1, _ = verdicts(finals, {"fedavg": {INF: 3}, "gossip": {INF: 7}})
    assert "holds only without DP" in claim1


def test_report_names_the_preset_a_sweep_ran():
    assert preset_of("fl-sweep run --preset tutorial --out x") == "tutorial"
    assert preset_of("fl-sweep run --preset=quick") == "quick"
    assert preset_of("fl-sweep run --eps 2") is None
    assert preset_of("fl-sweep run --preset") is None
