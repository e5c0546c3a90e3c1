"""The Python API (sim/api.py) on fake runs: keys, refusals, Results, figures, loading."""

import json
import math
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt
import pytest
from sweep_fakes import FakeRunner
from test_audit_report import audit_folder

from sim import api
from sim.sweeps import audit as audit_cli
from sim.sweeps import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def close_figures():
    """Figures come back open (a notebook shows them): close them after each test."""
    yield
    plt.close("all")


GRID = {"strategies": ["fedavg", "gossip"], "eps": [math.inf, 2], "nodes": 3, "rounds": 3}


def test_keys_are_kebab_case_with_their_scope_kept():
    assert api.normalize_key("num_server_rounds") == "num-server-rounds"
    assert api.normalize_key("num-server-rounds") == "num-server-rounds"
    assert api.normalize_key("gossip:gossip_mode") == "gossip:gossip-mode"


def test_values_and_options_become_the_command_line_they_stand_for():
    assert api.as_text(math.inf) == "inf" and api.as_text(True) == "true"
    assert api.as_text([math.inf, 8, 0.05]) == "inf,8,0.05" and api.as_text(1e-5) == "1e-05"
    assert api.key_flags({"samples_per_node": 200, "lr": [0.05, 0.1]}) == [
        "--set",
        "samples-per-node=200",
        "--sweep",
        "lr=0.05,0.1",
    ]
    options = {
        "preset": None,
        "strategies": ["fedavg", "gossip"],
        "set": {"gossip:gossip_mode": "edges"},
        "variants": [{"gossip:topology": "ring", "gossip:gossip-mode": "edges"}],
        "dry_run": True,
        "run_per_cell": False,
    }
    assert api.option_flags(options) == [
        "--strategies",
        "fedavg,gossip",
        "--set",
        "gossip:gossip-mode=edges",
        "--variant",
        "gossip:topology=ring gossip:gossip-mode=edges",
        "--dry-run",
    ]


def test_importing_the_api_loads_neither_torch_nor_pandas_nor_matplotlib():
    code = (
        "import sys; from sim import api; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'torch', 'opacus', 'pandas', 'matplotlib', 'flwr'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_the_version_is_the_packages():
    assert api.__version__ == metadata.version("flower-dp-gossip")


# (API call, the command line it stands for): the same one-line refusal from both.
REFUSALS = [
    (lambda out: api.sweep(eps=[-1], out=out), ["run", "--eps", "-1"]),
    (
        lambda out: api.sweep(strategies="gossip", nodes=7, topology="torus", out=out),
        ["run", "--strategies", "gossip", "--nodes", "7", "--set", "topology=torus"],
    ),
    (
        lambda out: api.sweep(seeds=[7, 8], seed=9, out=out),
        ["run", "--seeds", "7,8", "--set", "seed=9"],
    ),
    (
        lambda out: api.sweep(set={"gosip:topology": "ring"}, out=out),
        ["run", "--set", "gosip:topology=ring"],
    ),
    (lambda out: api.sweep(target_accuracy=77, out=out), ["run", "--target-accuracy", "77"]),
    (lambda out: api.sweep(timeout=-5, out=out), ["run", "--timeout", "-5"]),
    (lambda out: api.sweep(rounds="x", out=out), ["run", "--rounds", "x"]),
    (lambda out: api.run(bogus_key=1, out=out), ["run", "--set", "bogus-key=1"]),
    (lambda out: api.run(eps=0, out=out), ["run", "--set", "eps=0"]),
    (
        lambda out: api.tune(search={"lr": [0.1]}, set={"validation-samples": 0}, out=out),
        ["tune", "--search", "lr=0.1", "--set", "validation-samples=0"],
    ),
]


@pytest.mark.parametrize("call, argv", REFUSALS, ids=[" ".join(a) for _, a in REFUSALS])
def test_bad_input_raises_the_line_the_cli_prints_and_writes_nothing(tmp_path, capsys, call, argv):
    out = tmp_path / "out"
    try:
        assert cli.main([*argv, "--out", str(out)], runner=FakeRunner()) == 2
    except SystemExit as exit:  # argparse's own refusal
        assert exit.code == 2
    line = capsys.readouterr().err.strip()
    with pytest.raises(ValueError) as err:
        call(out)
    assert isinstance(err.value, api.SweepError)
    assert str(err.value) == line.removeprefix("fl-sweep: ") and "\n" not in line
    assert not out.exists()


def test_a_bad_audit_flag_raises_fl_audits_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert audit_cli.main(["run", "--canaries", "0", "--out", str(out)], runner=FakeRunner()) == 2
    line = capsys.readouterr().err.strip().removeprefix("fl-audit: ")
    with pytest.raises(api.SweepError, match="^--canaries 0 is not valid") as err:
        api.audit(canaries=0, out=out)
    assert str(err.value) == line and not out.exists()


def test_run_takes_one_value_per_key(tmp_path):
    with pytest.raises(api.SweepError, match=r"^run\(\) takes one value per key; lr has several"):
        api.run(lr=[0.1, 0.2], out=tmp_path / "out")


def test_a_sweep_gives_its_rounds_final_table_and_figures(tmp_path):
    out = tmp_path / "s"
    result = api.sweep(**GRID, samples_per_node=200, out=out, runner=FakeRunner())
    assert result.folder == out.resolve() and result.failed == []
    assert len(result.rounds) == 4 * 3
    assert list(result.final[["strategy", "eps"]].itertuples(index=False, name=None)) == [
        ("fedavg", math.inf),
        ("fedavg", 2.0),
        ("gossip", math.inf),
        ("gossip", 2.0),
    ]
    assert {"n", "mean", "half", "eps_spent"} <= set(result.final.columns)
    assert list(result.table["strategy"]) == ["fedavg", "fedavg", "gossip", "gossip"]
    assert list(result.table["ε"]) == ["∞ (no DP)", "2", "∞ (no DP)", "2"]
    assert list(result.cells["status"]) == ["completed"] * 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("fl-sweep run --nodes 3 --strategies fedavg,gossip")
    assert (
        f"--eps inf,2 --rounds 3 --set samples-per-node=200 --timeout 3600 --out {out}"
        in (manifest["command"])
    )
    assert manifest["fixed"]["samples-per-node"] == 200
    figures = result.figures()
    assert {"accuracy_vs_round", "final_accuracy_vs_eps", "consensus_distance"} <= set(figures)
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values())
    assert "4 cells, 4 completed" in repr(result)


def test_loading_a_folder_the_cli_wrote_gives_the_same_result(tmp_path):
    out = tmp_path / "s"
    argv = ["run", "--strategies", "fedavg,gossip", "--eps", "inf,2", "--seeds", "7,8"]
    assert (
        cli.main([*argv, "--rounds", "3", "--nodes", "3", "--out", str(out)], runner=FakeRunner())
        == 0
    )
    result = api.load(out)
    assert list(result.final["n"]) == [2, 2, 2, 2]
    assert result.final["half"].notna().all(), "two seeds: an interval"
    assert result.rounds["cell"].nunique() == 8 and result.audit.empty
    assert list(result.figures()) == list(api.load(str(out)).figures())
    with pytest.raises(api.SweepError, match="is not a sweep folder"):
        api.load(tmp_path)


def test_run_is_one_cell_with_the_same_keys_in_either_spelling(tmp_path):
    runner = FakeRunner()
    result = api.run(
        strategy="gossip", eps=2, num_server_rounds=3, **{"samples-per-node": 200}, nodes=4,
        out=tmp_path / "r", runner=runner,
    )  # fmt: skip
    assert runner.calls == ["gossip-eps2-seed7"]
    cfg = runner.configs[0]
    assert (cfg.num_server_rounds, cfg.samples_per_node, cfg.noise_seed) == (3, 200, 7)
    assert list(result.rounds["round"]) == [1, 2, 3]


FAILED, FAILED_CELL = "gossip-eps2-seed7", "fedavg-eps2-seed7"


def test_a_failed_run_raises_its_error_and_a_failed_sweep_cell_warns(tmp_path):
    with pytest.raises(api.RunFailed, match="gossip-eps2-seed7 failed: .*boom"):
        api.run(strategy="gossip", eps=2, out=tmp_path / "r", runner=FakeRunner(fail=[FAILED]))
    with pytest.warns(UserWarning, match="fedavg-eps2-seed7"):
        result = api.sweep(**GRID, out=tmp_path / "s", runner=FakeRunner(fail=[FAILED_CELL]))
    assert result.failed == ["fedavg-eps2-seed7"]


def test_a_dry_run_checks_and_returns_nothing(tmp_path, capsys):
    assert api.sweep(**GRID, out=tmp_path / "s", dry_run=True) is None
    assert "4 cells on 3 nodes: all valid" in capsys.readouterr().out
    assert not (tmp_path / "s").exists()


def test_a_tune_gives_its_final_stage_and_its_choices(tmp_path):
    from test_sweep_tune import score

    out = tmp_path / "t"
    result = api.tune(
        **GRID, seeds=[7, 8], validation_samples=500, search={"lr": [0.1, 0.5, 2.0]},
        out=out, runner=FakeRunner(score=score),
    )  # fmt: skip
    assert result.folder == (out / "final").resolve()
    assert len(result.choices) == 4 and "lr" in result.choices
    assert list(result.final["n"]) == [2, 2, 2, 2]
    assert api.load(out).choices.equals(result.choices)


def test_an_audit_folder_gives_the_audit_table_and_its_figures(tmp_path):
    folder = audit_folder(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    for cell in manifest["cells"]:
        cell["coords"] = {"strategy": cell["id"].split("-")[0], "eps": 8.0, "seed": 7}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "sweep.csv").write_text("cell,strategy,eps,seed,round,accuracy\n")
    result = api.load(folder)
    assert len(result.audit) == 6 and set(result.audit["strategy"]) == {"fedavg", "gossip"}
    assert set(result.figures()) == {"audit_bound_vs_accountant", "audit_bound_vs_distance"}


def test_an_audit_runs_its_grid_with_the_canaries_and_writes_its_report(tmp_path):
    runner = FakeRunner()
    result = api.audit(strategies="fedavg", eps=2, rounds=2, nodes=3, canaries=5,
                       out=tmp_path / "a", runner=runner)  # fmt: skip
    assert [c.audit_canaries for c in runner.configs] == [5]
    assert (tmp_path / "a" / "audit.md").is_file() and result.audit.empty  # the fake audits nothing


def test_the_link_runner_keeps_each_stages_cell_lists_in_that_stage(tmp_path):
    runner = api.LinkRunner(object(), timeout=5)
    runner.plan([{"results-dir": str(tmp_path / "search" / "runs"), "run-name": "a"}])
    assert runner.batched.folder == tmp_path / "search" / "batches"
    assert runner.batched.planned == [
        {"results-dir": str(tmp_path / "search" / "runs"), "run-name": "a"}
    ]
