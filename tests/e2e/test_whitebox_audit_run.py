"""`fl-audit run --set audit-mode=whitebox` through the real app (sealed relay, dp-mode=update)."""

import json

import pytest

import sim.sweeps.audit

pytestmark = pytest.mark.e2e


def test_a_whitebox_audit_sees_dp_at_the_owner_and_never_crosses_the_accountant(
    lent_superlink, tmp_path
):
    out = tmp_path / "audit"
    argv = ["run", "--strategies", "gossip", "--eps", "8", "--seeds", "7", "--nodes", "6"]
    argv += ["--rounds", "3", "--canaries", "150", "--audit-seed", "3"]
    argv += ["--set", "audit-mode=whitebox", "--set", "dp-mode=update"]
    argv += ["--set", "gossip-relay=sealed", "--set", "model=mlp"]
    argv += ["--set", "samples-per-node=100", "--set", "test-samples=300"]
    argv += ["--set", "node-eval-samples=100", "--set", "partitioner=iid"]
    argv += ["--timeout", "600", "--out", str(out)]
    rc = sim.sweeps.audit.main(argv)
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert rc == 0, {c["id"]: c["error"] for c in cells}
    folder = out / "runs" / cells[0]["id"]
    audit = json.loads((folder / "audit.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert audit["mode"] == "whitebox" and summary["audit"]["mode"] == "whitebox"
    owner = audit["observers"][0]
    assert owner["observer"] == "owner" and owner["canaries"] == 6 * 150
    assert owner["eps_lower"] > 0.3, owner  # a DP run's owner: clearly above 0 at ε = 8
    for row in audit["observers"]:
        assert row["eps_lower"] <= float(row["eps_accountant"]), row
    assert [d["distance"] for d in audit["by_distance"]][:2] == [0, 1]  # owner, one observer
    assert (folder / "network_privacy.json").is_file()
