"""SimulationLink's cheap parts: the staged app, the summary.json a run is awaited by, its env."""

import os
import time
import tomllib

from sim.launch.flwr_cli import PROJECT_DIR, SummaryMarker, flower_env, summary_path
from sim.launch.simulation import SimulationLink


def _toml(path):
    return tomllib.loads(path.read_text())


def test_staged_app_holds_the_app_files_and_not_the_virtualenv(tmp_path):
    link = SimulationLink(flwr_home=tmp_path)  # prepared, not started
    staged = link.staged_app()
    names = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "server_app/app.py", "client_app/app.py"} <= names
    assert "flower_app/config.py" in names and "strategies/gossip.py" in names
    assert not any(n.startswith((".venv/", "results/", ".git/", ".info/")) for n in names)
    # Flower re-serialises pyproject.toml into the FAB: same content, other formatting.
    assert _toml(staged / "pyproject.toml") == _toml(PROJECT_DIR / "pyproject.toml")
    assert link.staged_app() == staged  # built once per link


def testsummary_path_follows_results_dir_and_run_name(tmp_path):
    assert summary_path({"results-dir": str(tmp_path), "run-name": "a"}) == (
        tmp_path / "a" / "summary.json"
    )
    assert summary_path({"results-dir": "results/x", "run-name": "b"}) == (
        PROJECT_DIR / "results" / "x" / "b" / "summary.json"
    )
    assert summary_path({"run-name": "c"}) is None  # default folder: timestamped, unknown


def test_a_summary_counts_only_once_rewritten_after_submission(tmp_path):
    path = tmp_path / "r" / "summary.json"
    marker = SummaryMarker(path)
    assert not marker.fresh()
    path.parent.mkdir()
    path.write_text("{}")
    assert marker.fresh()
    stale = SummaryMarker(path)  # left over from an earlier run of the same cell
    assert not stale.fresh()
    later = time.time() + 5
    os.utime(path, (later, later))
    assert stale.fresh()


def test_flower_commands_never_print_forced_colours(monkeypatch, tmp_path):
    """A Jupyter kernel forces colours, which would wrap `--format json` output in ANSI codes."""
    for name in ("FORCE_COLOR", "CLICOLOR_FORCE"):
        monkeypatch.setenv(name, "1")
    env = flower_env(tmp_path)
    assert "FORCE_COLOR" not in env and "CLICOLOR_FORCE" not in env
    assert env["FLWR_HOME"] == str(tmp_path)
