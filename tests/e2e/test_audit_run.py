"""`fl-audit run` through the real app: canaries, observers, bounds, audit.json, figures."""

import json
import math

import pandas as pd
import pytest

import sim.sweeps.audit

pytestmark = pytest.mark.e2e

KEYS = {"observer", "distance", "guesses", "correct", "eps_lower", "eps_accountant"}


def test_a_tiny_audit_finds_leakage_without_dp_and_never_more_than_the_accountant_with_it(
    lent_superlink, tmp_path, capsys
):
    out = tmp_path / "audit"
    argv = ["run", "--strategies", "fedavg,gossip", "--eps", "inf,1", "--seeds", "7"]
    argv += ["--nodes", "5", "--rounds", "3", "--canaries", "60", "--audit-seed", "3"]
    argv += ["--set", "samples-per-node=200", "--set", "test-samples=300"]
    argv += ["--set", "node-eval-samples=100", "--set", "partitioner=iid"]
    argv += ["--set", "local-epochs=2", "--timeout", "600", "--out", str(out)]
    rc = sim.sweeps.audit.main(argv)
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert rc == 0, {c["id"]: c["error"] for c in cells}
    bounds = {}
    for cell in cells:
        folder = out / "runs" / cell["id"]
        audit = json.loads((folder / "audit.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        assert audit["audit"] is True and summary["audit"]["file"] == "audit.json"
        assert json.loads((folder / "config.json").read_text())["audit-canaries"] == 60
        for o in audit["observers"]:
            assert KEYS <= set(o) and 0 <= o["correct"] <= o["guesses"] <= 5 * 60
            assert o["distance"] is None or isinstance(o["distance"], int)
        by_name = {o["observer"]: o for o in audit["observers"]}
        strategy, eps = audit["strategy"], float(audit["eps_target"])
        expected = (
            ["owner", "global"]
            if strategy == "fedavg"
            else ["owner", "distance-1", "distance-2", "average"]  # a 5-node ring
        )
        assert list(by_name) == expected
        assert by_name["owner"]["distance"] == 0
        bounds[strategy, eps] = by_name
    for strategy in ("fedavg", "gossip"):
        owner = bounds[strategy, math.inf]["owner"]
        print(f"{strategy} eps=inf owner: {owner}")  # noqa: T201
        assert owner["eps_lower"] > 0.5, f"no leakage found without DP: {owner}"
        for o in bounds[strategy, 1.0].values():
            assert 0 < float(o["eps_accountant"]) <= 1.0 + 1e-9
            assert o["eps_lower"] <= float(o["eps_accountant"]), o
    table = pd.read_csv(out / "audit.csv")
    assert len(table) == sum(len(v) for v in bounds.values())
    for name in ("audit_bound_vs_accountant", "audit_bound_vs_distance"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    assert "| gossip | ∞ | owner | 0 |" in (out / "audit.md").read_text()
    assert "Privacy audit" in capsys.readouterr().out
