"""`fl-sweep compare`: several stored sweeps side by side."""

import pytest

from sim.sweep import main
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
    assert "Rounds to reach 90% of the same sweep's non-private final accuracy" in text
    assert "- left: target 90%" in text


def test_compare_refuses_a_name_count_mismatch(two_sweeps, capsys):
    assert main(["compare", *map(str, two_sweeps), "--names", "only-one"]) == 2
    assert "--names gives 1 names for 2 folders" in capsys.readouterr().err
