"""What `fl-sweep` refuses before anything runs: one line, exit code 2, nothing written.

The dry run makes the same checks as a run (the ServerApp's too, `flower_app.preflight`), so
each bad input is refused with and without `--dry-run`. No Flower run, no simulation.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import sim.sweeps.folders
from flower_app.config import ConfigError, RunConfig
from flower_app.preflight import check_node_count, gossip_graph, preflight
from sim.bench.cli import main as bench_main
from sim.sweeps.audit import main as audit_main
from sim.sweeps.cli import main
from sim.sweeps.spec import DEFAULT_NODES

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    (
        ["--set", "gosip:topology=ring"],
        "gosip:topology: 'gosip' is not a strategy; scope a key with one of: fedavg, gossip",
    ),
    (
        ["--target-accuracy", "77"],
        "--target-accuracy 77 is not valid; expected a fraction in (0, 1] (0.77 for 77%)",
    ),
    (["--target-accuracy", "0"], "--target-accuracy 0 is not valid; expected a fraction in (0, 1]"),
    (["--timeout", "-5"], "--timeout -5 is not valid; expected seconds > 0"),
    (["--timeout", "inf"], "--timeout inf is not valid; expected seconds > 0"),
    (["--seeds", "7,8", "--set", "seed=9"], "--seeds 7,8 and --set seed=9 both give seed"),
    (
        ["--strategies", "gossip", "--set", "topology=torus", "--nodes", "7"],
        "cell gossip-eps8-seed7 on 7 nodes: topology=torus needs a node count that factors",
    ),
    (
        ["--strategies", "gossip", "--set", "topology=erdos-renyi", "--set", "edge-prob=0.05"]
        + ["--nodes", "10"],
        "topology=erdos-renyi with 10 nodes is disconnected",
    ),
    (
        ["--set", "num-nodes=30", "--nodes", "10"],
        "num-nodes=30 is more than the 10 node(s) of this federation (the run would wait "
        "round-timeout=3600s for them)",
    ),
    (
        ["--set", "min-available-nodes=12", "--nodes", "10"],
        "min-available-nodes=12 is more than the 10 node(s) of this federation; use at most 10",
    ),
    (["--set", "data-dir=/nonexistent/idx"], "dataset=fashion-mnist: expected the idx files"),
    (["--nodes", "abc"], "fl-sweep run: argument --nodes: invalid int value: 'abc'"),
]


def refused(capsys, argv, out):
    """The command's exit code and its one line, after checking nothing else was written."""
    rc = main(argv, runner=lambda *a, **k: pytest.fail("a cell ran"))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == "" and not out.exists()
    return rc, lines[0]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(("flags", "line"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_each_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, line, dry):
    out = tmp_path / "sweep"
    argv = ["run", "--eps", "8", "--out", str(out), *flags, *(["--dry-run"] if dry else [])]
    try:
        rc, said = refused(capsys, argv, out)
    except SystemExit as stop:  # argparse's own refusals
        rc, said = stop.code, capsys.readouterr().err.strip()
        assert len(said.splitlines()) == 1 and not out.exists()
    assert rc == 2 and line in said, said


def test_an_out_under_a_file_or_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, line in (
        (afile / "sweep", f"--out {afile / 'sweep'} cannot be made: {afile} is a file"),
        (afile, f"--out {afile} is a file, not a folder"),
    ):
        for dry in ([], ["--dry-run"]):
            rc, said = refused(capsys, ["run", "--out", str(out), *dry], afile / "sweep")
            assert rc == 2 and line in said, said


def test_an_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    # The tests may run as root, whom permission bits do not stop: ask access() to say no.
    monkeypatch.setattr(sim.sweeps.folders.os, "access", lambda *a: False)
    out = tmp_path / "sweep"
    rc, said = refused(capsys, ["run", "--out", str(out)], out)
    assert rc == 2 and f"--out {out} cannot be written: no write permission on {tmp_path}" in said


def test_tune_and_audit_refuse_the_same_way(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["tune", "--strategies", "gossip", "--set", "topology=torus", "--nodes", "7"]
    argv += ["--set", "validation-samples=500"]
    rc, said = refused(capsys, [*argv, "--search", "lr=0.1,0.2", "--out", str(out)], out)
    assert rc == 2 and "topology=torus needs a node count" in said
    rc = audit_main(["run", "--timeout", "-5", "--out", str(out), "--dry-run"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines == ["fl-audit: --timeout -5 is not valid; expected seconds > 0"]


def test_the_server_and_the_dry_run_share_their_checks():
    cfg = RunConfig.from_run_config({"strategy": "gossip", "topology": "torus"})
    with pytest.raises(ConfigError, match="topology=torus needs"):
        gossip_graph(cfg, 7)
    assert gossip_graph(cfg, 9).number_of_nodes() == 9
    with pytest.raises(ConfigError, match="num-nodes=5 is more than the 4 node"):
        check_node_count(RunConfig(num_nodes=5), 4)
    check_node_count(RunConfig(num_nodes=4, min_available_nodes=4), 4)
    preflight(RunConfig(), 3)  # the default run is fine on 3 nodes


@pytest.mark.parametrize(
    ("entry", "prog"), [(main, "fl-sweep"), (audit_main, "fl-audit"), (bench_main, "fl-bench")]
)
def test_version_comes_from_the_package_metadata(capsys, entry, prog):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        entry(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {version('flower-dp-gossip')}"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stop a cell after S seconds (default: 3600)" in text
    assert f"else {DEFAULT_NODES}, as `flwr run .` simulates" in text
    assert "fraction in (0, 1] (0.77 for 77%; default: 90%" in text


def test_the_command_lines_import_neither_torch_nor_flower_nor_plotting():
    """`--help` answers at once because the CLI modules load the heavy stack lazily."""
    code = (
        "import sys, sim.sweeps.cli, sim.sweeps.audit, sim.bench.cli; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'torch', 'opacus', 'flwr', 'pandas', 'matplotlib'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"importing the CLIs loaded {out.stdout.strip()}"


def test_a_sweep_simulates_as_many_nodes_as_plain_flwr_run():
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.findall(r"options\.num-supernodes = (\d+)", setup) == [str(DEFAULT_NODES)]
