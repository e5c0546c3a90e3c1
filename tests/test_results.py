import csv
import json
import math
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flower_app.results import (
    ROUND_COLUMNS,
    RunFiles,
    RunSummary,
    default_run_name,
    is_completed,
    resolve_results_dir,
    write_json,
)


def test_default_run_name_has_strategy_eps_seed_and_timestamp():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert default_run_name("fedavg", 2.0, 7, now).startswith("fedavg-eps2-seed7-20260102T030405")
    assert default_run_name("gossip", math.inf, 1, now).startswith("gossip-epsinf-seed1-")


def test_run_files_write_rounds_then_summary_last(tmp_path):
    files = RunFiles(tmp_path / "run")
    files.start({"eps": math.inf})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"eps": "inf"}
    for r in (1, 2):
        files.add_round({"round": r, "accuracy": 0.5})
    assert not is_completed(tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(ROUND_COLUMNS)
    files.finish({"status": "completed"})
    assert is_completed(tmp_path / "run")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_completed_run_is_never_overwritten_but_an_interrupted_one_is(tmp_path):
    done = RunFiles(tmp_path / "done")
    done.start({})
    done.finish({"status": "completed"})
    with pytest.raises(FileExistsError, match="completed run"):
        RunFiles(tmp_path / "done")
    crashed = RunFiles(tmp_path / "crashed")
    crashed.start({})
    crashed.add_round({"round": 1})
    again = RunFiles(tmp_path / "crashed")
    again.start({"fresh": 1})
    assert not (tmp_path / "crashed" / "rounds.csv").exists()


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_default_results_dir_is_in_the_project_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = resolve_results_dir("")
    assert root.name == "results" and not str(root).startswith(str(tmp_path))
    assert (root.parent / "pyproject.toml").exists()
    assert resolve_results_dir("/abs/where").as_posix() == "/abs/where"
    assert re.search(r"/mine$", resolve_results_dir("mine").as_posix())


SUMMARY_KEYS = [
    "status",
    "run_name",
    "strategy",
    "rounds_completed",
    "final_accuracy",
    "final_node_accuracy",
    "diverged_at_round",
    "final_loss",
    "initial_accuracy",
    "eps_target",
    "eps_spent",
    "wall_s",
    "num_nodes",
    "privacy",
    "aggregation",
]


def test_run_summary_writes_the_same_keys_and_reads_them_back(tmp_path):
    summary = RunSummary(
        status="completed",
        run_name="r",
        strategy="gossip",
        rounds_completed=3,
        final_accuracy=0.5,
        final_loss=math.nan,
        eps_target=math.inf,
        privacy={"unit": "none"},
        aggregation="gossip (matching), plain pairwise means",
        topology={"name": "ring"},
    )
    assert list(summary.to_dict()) == [*SUMMARY_KEYS, "topology"]
    assert list(RunSummary(status="completed").to_dict()) == SUMMARY_KEYS
    files = RunFiles(tmp_path / "run")
    files.start({})
    files.finish(summary)
    back = RunSummary.read(tmp_path / "run")
    assert back is not None and back.completed and is_completed(tmp_path / "run")
    assert back.eps_target == math.inf and math.isnan(back.final_loss)
    assert back.to_dict().keys() == summary.to_dict().keys()


def test_run_summary_reads_failed_and_older_summaries(tmp_path):
    failed = RunSummary.failed(RuntimeError("boom"))
    assert failed.to_dict() == {"status": "failed", "error": "RuntimeError: boom"}
    assert RunSummary.from_dict(failed.to_dict()) == failed
    older = {"status": "completed", "rounds_completed": 2, "privacy": {}, "gone": 1}
    summary = RunSummary.from_dict(older)
    assert summary.completed and summary.diverged_at_round is None
    assert summary.final_node_accuracy is None
    assert RunSummary.read(tmp_path) is None
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert RunSummary.read(tmp_path) is None and not is_completed(tmp_path)


def test_config_json_does_not_record_where_the_machine_kept_the_folder(tmp_path):
    files = RunFiles(tmp_path / "r", ["round"])
    files.start({"eps": 2.0, "results-dir": str(tmp_path), "run-name": "r"})
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"eps": 2.0, "run-name": "r"}


# An absolute path of the machine that made a file: /work/..., /home/..., /tmp/..., ...
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|root|tmp|Users|mnt|var|opt|srv)/")


def test_no_committed_result_holds_an_absolute_path_of_the_machine_that_made_it():
    project = Path(__file__).resolve().parent.parent
    listed = subprocess.run(
        ["git", "ls-files", "docs/results"], cwd=project, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed.stdout.split():
        path = project / name
        if path.suffix in {".png", ".svg", ".pdf"} or not path.is_file():
            continue
        if MACHINE_PATH.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(name)
    assert offenders == [], f"{len(offenders)} files, e.g. {offenders[:3]}"
