import json
import math

import pandas as pd
import pytest
from sweep_fakes import BASE, GOSSIP, FakeRunner, Killed

from flower_app.config import RunConfig
from sim.launch.flwr_cli import RunOutcome
from sim.sweeps.cli import main
from sim.sweeps.runner import Sweep, grid_difference, judge
from sim.sweeps.spec import SweepError, SweepSpec, expand

STRATEGIES = RunConfig.__dataclass_fields__["strategy"].metadata["choices"]
needs_gossip = pytest.mark.skipif("gossip" not in STRATEGIES, reason="gossip not accepted yet")

ARGV = [
    "run",
    "--strategies",
    "fedavg",
    "--eps",
    "inf,2",
    "--seeds",
    "7,8",
    "--rounds",
    "3",
    "--nodes",
    "3",
]
IDS = ["fedavg-epsinf-seed7", "fedavg-epsinf-seed8", "fedavg-eps2-seed7", "fedavg-eps2-seed8"]


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def statuses(out):
    return {c["id"]: c["status"] for c in manifest(out)["cells"]}


def tidy(out):
    return pd.read_csv(out / "sweep.csv")


def test_a_full_sweep_writes_manifest_tidy_csv_figures_and_report(tmp_path, capsys):
    out = tmp_path / "s"
    runner = FakeRunner()
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    assert runner.calls == IDS
    assert runner.polls == 4 * 3
    m = manifest(out)
    assert m["nodes"] == 3 and m["fixed"] == {"num-server-rounds": 3}
    assert m["swept"] == {"strategy": ["fedavg"], "eps": ["inf", 2], "seed": [7, 8]}
    assert [c["id"] for c in m["cells"]] == IDS
    cell = m["cells"][2]
    assert cell["status"] == "completed" and cell["error"] is None
    assert cell["run_id"] == "run-fedavg-eps2-seed7" and cell["wall_s"] >= 0
    assert cell["params"] == {
        "num-server-rounds": 3,
        "strategy": "fedavg",
        "eps": 2.0,
        "seed": 7,
        "noise-seed": 7,
    }
    assert "--out" in m["command"]
    df = tidy(out)
    assert len(df) == 4 * 3
    assert (out / "report.md").exists() and (out / "figures" / "accuracy_vs_round.png").exists()
    assert "**DP noise is seeded**" in (out / "report.md").read_text()
    table = capsys.readouterr().out
    assert "final accuracy" in table and "∞ (no DP)" in table


def test_csv_schema_id_columns_then_swept_keys_round_and_every_metric(tmp_path):
    out = tmp_path / "s"
    assert main([*ARGV, "--sweep", "lr=0.1,0.2", "--out", str(out)], runner=FakeRunner()) == 0
    df = tidy(out)
    metrics = [c for c in BASE if c not in ("round", "strategy")]
    assert list(df.columns) == ["cell", "strategy", "eps", "seed", "lr", "round", *metrics]
    assert len(df) == 8 * 3 and not df.duplicated(["cell", "round"]).any()
    assert df["eps"].dtype == float and math.isinf(df["eps"].max())
    assert sorted(df["lr"].unique()) == [0.1, 0.2]
    assert df.groupby("cell")["round"].apply(list).map(lambda r: r == [1, 2, 3]).all()


@needs_gossip
def test_columns_only_gossip_writes_appear_and_are_empty_for_fedavg(tmp_path):
    out = tmp_path / "s"
    argv = [
        "run",
        "--strategies",
        "fedavg,gossip",
        "--eps",
        "inf",
        "--rounds",
        "2",
        "--nodes",
        "3",
        "--sweep",
        "gossip:topology=ring,complete",
        "--out",
        str(out),
    ]
    assert main(argv, runner=FakeRunner()) == 0
    df = tidy(out)
    assert list(df.columns[:6]) == ["cell", "strategy", "eps", "seed", "topology", "round"]
    assert set(GOSSIP) <= set(df.columns)
    fed = df[df["strategy"] == "fedavg"]
    assert fed["consensus_distance"].isna().all() and fed["topology"].isna().all()
    assert df[df["strategy"] == "gossip"]["consensus_distance"].notna().all()
    assert set(df["cell"]) == {
        "fedavg-epsinf-seed7",
        "gossip-epsinf-seed7-topology-ring",
        "gossip-epsinf-seed7-topology-complete",
    }


def test_resume_after_a_kill_loses_no_cell_and_reruns_only_the_rest(tmp_path, capsys):
    out = tmp_path / "s"
    with pytest.raises(Killed):
        main([*ARGV, "--out", str(out)], runner=FakeRunner(kill_at=3))
    assert statuses(out) == dict(
        zip(IDS, ["completed", "completed", "pending", "pending"], strict=True)
    )
    assert len(tidy(out)) == 2 * 3  # only completed cells, no half rows
    runner = FakeRunner()
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    assert runner.calls == IDS[2:]  # completed cells not re-run
    df = tidy(out)
    assert len(df) == 4 * 3 and not df.duplicated(["cell", "round"]).any()
    assert set(statuses(out).values()) == {"completed"}
    assert "2 of 4 cells already completed" in capsys.readouterr().err


def test_a_cell_killed_mid_run_is_cleared_and_rerun(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(Killed):
        main([*ARGV, "--out", str(out)], runner=FakeRunner(kill_at=2, kill_mid=True))
    partial = out / "runs" / IDS[1]
    assert (partial / "rounds.csv").exists() and not (partial / "summary.json").exists()
    assert len(tidy(out)) == 3  # the half-finished cell is not in sweep.csv
    runner = FakeRunner()
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    assert runner.calls == IDS[1:]
    assert len(tidy(out)) == 12


def test_a_run_that_finished_before_the_kill_is_kept(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(Killed):
        main([*ARGV, "--out", str(out)], runner=FakeRunner(kill_at=2, kill_after_done=True))
    assert statuses(out)[IDS[1]] == "pending"  # the manifest never heard of it
    runner = FakeRunner()
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    assert runner.calls == IDS[2:]
    assert len(tidy(out)) == 12


def test_a_failing_cell_is_recorded_the_others_complete_and_exit_is_1(tmp_path, capsys):
    out = tmp_path / "s"
    runner = FakeRunner(fail={IDS[1]}, crash={IDS[2]})
    assert main([*ARGV, "--out", str(out)], runner=runner) == 1
    assert runner.calls == IDS
    cells = {c["id"]: c for c in manifest(out)["cells"]}
    assert cells[IDS[1]]["status"] == "failed"
    assert cells[IDS[1]]["error"] == "finished:failed: RuntimeError: boom"
    assert (
        cells[IDS[2]]["status"] == "failed" and "cannot reach SuperLink" in cells[IDS[2]]["error"]
    )
    assert cells[IDS[0]]["status"] == cells[IDS[3]]["status"] == "completed"
    assert set(tidy(out)["cell"]) == {IDS[0], IDS[3]}
    err = capsys.readouterr().err
    assert f"2 of 4 cells failed: {IDS[1]}, {IDS[2]}" in err
    report = (out / "report.md").read_text()
    assert "## Failed cells" in report and IDS[1] in report
    # fixed, the same command re-runs only the failed cells
    runner = FakeRunner()
    assert main([*ARGV, "--out", str(out)], runner=runner) == 0
    assert runner.calls == [IDS[1], IDS[2]]
    assert len(tidy(out)) == 12


def test_flower_completed_without_a_completed_summary_is_a_failure(tmp_path):
    out = tmp_path / "s"
    assert main([*ARGV, "--out", str(out)], runner=FakeRunner(no_summary={IDS[0]})) == 1
    error = manifest(out)["cells"][0]["error"]
    assert "finished:completed" in error and "summary.json" in error


def test_judge_needs_flower_and_summary_to_agree(tmp_path):
    ok = RunOutcome("1", "finished:completed", "", 1)
    assert "missing" in judge(ok, tmp_path)
    (tmp_path / "summary.json").write_text('{"status": "incomplete"}')
    assert "'incomplete'" in judge(ok, tmp_path)
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    assert "rounds.csv is missing" in judge(ok, tmp_path)
    (tmp_path / "rounds.csv").write_text("round,accuracy\n1,0.5\n")
    assert judge(ok, tmp_path) is None
    assert judge(RunOutcome("1", "finished:stopped", "", 1), tmp_path) == "finished:stopped"


def test_a_different_grid_in_the_same_folder_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([*ARGV, "--out", str(out)], runner=FakeRunner()) == 0
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    runner = FakeRunner()
    assert main([*ARGV, "--eps", "inf,1", "--out", str(out)], runner=runner) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a different sweep" in err
    assert "fedavg-eps1-seed7" in err
    assert not runner.calls and (out / "manifest.json").read_text() == before
    assert main([*ARGV, "--nodes", "4", "--out", str(out)], runner=runner) == 2
    assert "nodes 3 there, 4 now" in capsys.readouterr().err
    assert main([*ARGV, "--set", "lr=0.2", "--out", str(out)], runner=runner) == 2
    assert "lr=None there, 0.2 now" in capsys.readouterr().err


def test_the_same_grid_spelled_differently_resumes(tmp_path):
    out = tmp_path / "s"
    assert main([*ARGV, "--out", str(out)], runner=FakeRunner()) == 0
    argv = [a if a != "inf,2" else "2.0,inf" for a in ARGV]
    runner = FakeRunner()
    assert main([*argv, "--out", str(out)], runner=runner) == 0 and not runner.calls


def test_grid_difference_names_the_first_difference():
    old = {"nodes": 3, "cells": [{"id": "a", "params": {"eps": 2.0}}]}
    assert grid_difference(old, old) is None
    new = {"nodes": 3, "cells": [{"id": "a", "params": {"eps": 4.0}}]}
    assert grid_difference(old, new) == "cell a: eps=2.0 there, 4.0 now"


def test_sweep_class_runs_with_an_injected_runner(tmp_path):
    spec = SweepSpec(fixed={"num-server-rounds": 1}, grid={"eps": [math.inf, 2]}, nodes=2)
    sweep = Sweep(tmp_path, spec, expand(spec))
    assert sweep.run(FakeRunner()) == []
    with pytest.raises(SweepError):
        Sweep(tmp_path, SweepSpec(grid={"eps": [1]}, nodes=2), expand(SweepSpec(grid={"eps": [1]})))


def test_ctrl_c_returns_130_and_prints_the_command_to_resume(tmp_path, capsys):
    out = tmp_path / "s"

    class CtrlC(FakeRunner):
        def __call__(self, run_config, **kwargs):
            if len(self.calls) == 1:
                raise KeyboardInterrupt
            return super().__call__(run_config, **kwargs)

    assert main([*ARGV, "--out", str(out)], runner=CtrlC()) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 4 cells completed; resume with: fl-sweep run" in err
    assert statuses(out)[IDS[0]] == "completed"


def test_sigterm_becomes_an_interrupt_so_the_superlink_is_stopped():
    import os
    import signal
    import time

    from sim.launch.processes import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_python_dash_m_sweeps_is_the_cli():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sim", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--preset" in proc.stdout and "reference" in proc.stdout


def test_ctrl_c_stops_the_block_even_when_started_with_sigint_ignored():
    """A background job of a non-interactive shell (nohup, some CI runners) starts with
    SIGINT ignored; Ctrl-C must still stop a sweep or the local deployment."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time\n"
        "from sim.launch.processes import sigterm_as_interrupt\n"
        "try:\n"
        "    with sigterm_as_interrupt():\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert out.strip() == "stopped" and proc.returncode == 0


def test_the_report_says_a_network_unit_cell_spends_more_than_its_eps(tmp_path):
    def report(name, unit):
        argv = ["run", "--strategies", "gossip", "--eps", "8", "--nodes", "8", "--rounds", "8"]
        argv += ["--set", "dp-mode=update", "--set", f"privacy-unit={unit}"]
        argv += ["--set", "network-min-distance=3", "--out", str(tmp_path / name)]
        assert main(argv, runner=FakeRunner()) == 0
        return (tmp_path / name / "report.md").read_text()

    says = "privacy-unit=network`** calibrate σ so that every observer at graph distance ≥ 3"
    assert says in report("network", "network")
    assert "privacy-unit=network" not in report("local", "local")
