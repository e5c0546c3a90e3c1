"""fl-audit's table, figures and command line, on stored folders and a fake runner."""

import json

import pandas as pd
import pytest
from sweep_fakes import FakeRunner

from flower_app.results import to_json
from sim.analysis.audit import collect, markdown, violations, write_audit_report
from sim.sweeps.audit import main


def observer(name, distance, lower, accountant):
    return {
        "observer": name,
        "distance": distance,
        "guesses": 100,
        "correct": 80,
        "eps_lower": lower,
        "eps_accountant": accountant,
    }


def audit_folder(tmp_path, gossip_owner_lower=1.2):
    cells = []
    for strategy, eps, observers in [
        ("fedavg", "inf", [observer("owner", 0, 2.5, "inf"), observer("global", None, 0.4, "inf")]),
        (
            "gossip",
            8.0,
            [
                observer("owner", 0, gossip_owner_lower, 8.0),
                observer("distance-1", 1, 0.6, 8.0),
                observer("distance-2", 2, 0.1, 8.0),
                observer("average", None, 0.0, 8.0),
            ],
        ),
    ]:
        cid = f"{strategy}-eps{eps}-seed7"
        cells.append(
            {"id": cid, "params": {"strategy": strategy, "seed": 7}, "status": "completed"}
        )
        folder = tmp_path / "runs" / cid
        folder.mkdir(parents=True)
        audit = {"strategy": strategy, "eps_target": eps, "observers": observers}
        (folder / "audit.json").write_text(to_json(audit))
    cells.append({"id": "gossip-eps2-seed7", "params": {}, "status": "failed"})
    (tmp_path / "manifest.json").write_text(json.dumps({"cells": cells}))
    return tmp_path


def test_the_table_has_a_row_per_observer_of_every_completed_cell(tmp_path):
    df = collect(audit_folder(tmp_path))
    assert list(df["observer"]) == [
        "owner",
        "global",
        "owner",
        "distance-1",
        "distance-2",
        "average",
    ]
    assert df["eps"].tolist()[:2] == [float("inf")] * 2 and df["distance"].isna().sum() == 2
    assert violations(df).empty
    text = markdown(df)
    assert "| gossip | 8 | distance-1 | 1 | 100 | 80 | 0.60 | 8 |" in text
    assert "| fedavg | ∞ | global | – |" in text


def test_runs_that_share_strategy_and_eps_are_named_in_the_table(tmp_path):
    df = collect(audit_folder(tmp_path))
    assert "| run |" not in markdown(df)  # one run per (strategy, ε, seed): no column
    twin = df[df["strategy"] == "gossip"].assign(cell="gossip-eps8.0-seed7-topology-torus")
    text = markdown(pd.concat([df, twin], ignore_index=True))
    assert text.startswith("| run | strategy |")
    assert "| gossip-eps8.0-seed7-topology-torus | gossip | 8 | distance-1 | 1 |" in text


def test_a_bound_above_the_accountant_is_flagged(tmp_path):
    df, files = write_audit_report(audit_folder(tmp_path, gossip_owner_lower=9.0))
    assert violations(df)["observer"].tolist() == ["owner"]
    assert "accounting or the audit is wrong" in (tmp_path / "audit.md").read_text()
    for name in ("audit_bound_vs_accountant", "audit_bound_vs_distance"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "audit.csv") in files


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--canaries", "0"], "--canaries 0 is not valid"), (["--audit-seed", "-1"], "--audit-seed")],
)
def test_bad_audit_flags_are_one_line_and_nothing_is_written(tmp_path, capsys, flags, says):
    out = tmp_path / "a"
    argv = ["run", "--strategies", "fedavg", "--eps", "2", "--nodes", "3", "--out", str(out)]
    assert main([*argv, *flags], runner=FakeRunner()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not out.exists()


def test_every_cell_of_an_audit_grid_carries_the_canaries_and_the_seed(tmp_path):
    runner = FakeRunner()
    out = tmp_path / "a"
    argv = ["run", "--strategies", "fedavg,gossip", "--eps", "inf,2", "--nodes", "3"]
    argv += ["--rounds", "2", "--canaries", "40", "--audit-seed", "9", "--out", str(out)]
    assert main(argv, runner=runner) == 0
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert len(cells) == 4
    assert all(
        c["params"]["audit-canaries"] == 40 and c["params"]["audit-seed"] == 9 for c in cells
    )
    assert "fl-audit run" in json.loads((out / "manifest.json").read_text())["command"]


def test_a_whitebox_audit_says_its_canaries_are_update_directions(tmp_path):
    folder = audit_folder(tmp_path)
    path = folder / "runs" / "gossip-eps8.0-seed7" / "audit.json"
    audit = json.loads(path.read_text())
    path.write_text(to_json(audit | {"mode": "whitebox"}))
    df, _ = write_audit_report(folder)
    assert df.groupby("strategy")["mode"].first().to_dict() == {
        "fedavg": "canaries",
        "gossip": "whitebox",
    }
    text = (folder / "audit.md").read_text()
    assert "whitebox: directions C·c_i added to the owner's clipped update" in text
    assert "canaries: images of random sparse pixels" in text


def test_whitebox_puts_update_canaries_and_update_mode_in_every_cell(tmp_path):
    out = tmp_path / "a"
    argv = ["run", "--strategies", "gossip", "--eps", "8", "--nodes", "3", "--rounds", "2"]
    argv += ["--whitebox", "--out", str(out)]
    assert main(argv, runner=FakeRunner()) == 0
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert cells and all(
        c["params"]["audit-mode"] == "whitebox" and c["params"]["dp-mode"] == "update"
        for c in cells
    )
