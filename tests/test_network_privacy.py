"""network_privacy.json from a real gossip run (in process): the schedule it drew, accounted."""

import networkx as nx
import numpy as np
import pytest

from flower_app.config import RunConfig
from flower_app.gossip_schedule import ScheduleLog
from flower_app.network_calibration import network_plan, planned_schedule
from flower_app.network_dp import ORDERS, draw_schedule, pairwise_rdp, pairwise_rho, rdp_to_eps
from flower_app.wire import SEALED
from server_app.network_privacy import LOCAL_ONLY, PAIRWISE, network_line, network_privacy
from server_app.privacy_report import privacy_line, privacy_summary
from tests.inprocess_grid import TINY as INPROCESS_TINY
from tests.inprocess_grid import run_gossip

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = 6
TINY = {**INPROCESS_TINY, "test-samples": 300, "node-eval-samples": 100,
        "dp-mode": "update", "topology": "ring"}  # fmt: skip


@pytest.mark.parametrize("relay", ["sealed", "open"])
def test_the_accountant_runs_on_the_schedule_the_run_drew(relay):
    config = {**TINY, "gossip-relay": relay, "gossip-mode": "metropolis"}
    strategy, _ = run_gossip(config, NODES)
    cfg = RunConfig.from_run_config(config)
    doc = network_privacy(cfg, strategy)
    assert doc["method"] == PAIRWISE and doc["relay"] == relay
    # Metropolis is deterministic: the recorded schedule is the one draw_schedule makes.
    sigma = float(next(iter(strategy.reports.metrics.values()))["noise-multiplier"])
    ring = nx.cycle_graph(NODES)
    expected = draw_schedule(ring, "metropolis", rounds=2, rng=np.random.default_rng(0))
    rdp = pairwise_rdp(strategy.schedule_log.schedule(), sigma)
    assert np.allclose(rdp, pairwise_rdp(expected, sigma))
    # The accountant's own releases agree with each node's Opacus ledger (independently computed).
    local = rdp_to_eps(rdp, ORDERS, cfg.delta).diagonal()
    assert np.allclose(local, [strategy.reports.node_eps(v) for v in range(NODES)], rtol=1e-6)
    rows = {d["distance"]: d for d in doc["by_distance"]}
    assert rows[0]["eps_max"] == pytest.approx(max(local))
    maxima = [rows[k]["eps_max"] for k in sorted(rows)]
    assert maxima == sorted(maxima, reverse=True) and maxima[-1] < maxima[0]
    # A vertex-transitive graph and a symmetric schedule: equal ε at equal distance.
    assert all(d["eps_max"] - d["eps_min"] < 1e-9 for d in doc["by_distance"])
    assert doc["server"]["eps_bound"] == pytest.approx(max(local)) and max(local) > 0
    line = network_line(doc)
    assert line.startswith(f"Network privacy: ε {rows[1]['eps_max']:.2f} to direct partners")
    assert ("no models (sealed relay)" in line) == (relay == "sealed")


def test_dp_sgd_gets_local_dp_for_every_observer_and_says_so():
    config = {**TINY, "dp-mode": "sample", "gossip-mode": "matching"}
    strategy, _ = run_gossip(config, NODES)
    doc = network_privacy(RunConfig.from_run_config(config), strategy)
    assert doc["method"] == LOCAL_ONLY["sample"]
    eps = np.array(doc["eps"])
    assert np.allclose(eps, eps[:, :1]) and eps[0, 0] == strategy.reports.node_eps(0) > 0


def drop_first_sealed_step():
    """A relay that loses the first sealed gossip message: (the dropped list, the hook)."""
    dropped = []

    def drop(msg):
        if SEALED in msg.content and not dropped and "seal-step" in msg.content[SEALED]:
            dropped.append(msg)
            return True
        return False

    return dropped, drop


def test_a_dropped_sealed_exchange_leaves_only_local_dp():
    dropped, drop = drop_first_sealed_step()
    config = {**TINY, "gossip-mode": "matching"}
    strategy, _ = run_gossip(config, NODES, drop=drop)
    doc = network_privacy(RunConfig.from_run_config(config), strategy)
    assert dropped and doc["method"].startswith("local DP for every observer: round 1")


def test_the_log_refuses_a_step_before_a_round_and_stops_past_its_size():
    log = ScheduleLog(4)
    with pytest.raises(RuntimeError, match="before any round"):
        log.pairs([(0, 1)])
    big = ScheduleLog(10_000)
    big.start_round(range(10_000))
    big.pairs([(0, 1)])
    assert not big.rounds and "computed up to" in big.gap


def test_a_network_unit_run_uses_the_planned_schedule_and_reports_every_class():
    """privacy-unit=network end to end in process: σ, the schedule, the file and the line."""
    config = {**TINY, "gossip-mode": "matching", "num-server-rounds": 3,
              "privacy-unit": "network"}  # fmt: skip
    strategy, _ = run_gossip(config, NODES)
    cfg = RunConfig.from_run_config(config)
    net = network_plan(cfg, NODES)
    # Every node computed the plan's σ itself, and the run drew the planned schedule.
    sigmas = {float(m["noise-multiplier"]) for m in strategy.reports.metrics.values()}
    assert sigmas == {net.noise_multiplier}
    _, planned = planned_schedule(cfg, NODES)
    assert np.allclose(pairwise_rho(strategy.schedule_log.schedule(), 1.0),
                       pairwise_rho(planned, 1.0))  # fmt: skip
    doc = network_privacy(cfg, strategy)
    plan = doc["calibration"]
    assert doc["privacy_unit"] == "network" and plan["target_met"]
    assert plan["eps_network_realized"] == pytest.approx(net.network_eps())
    assert plan["eps_network_realized"] <= 8.0
    rows = {d["distance"]: d["eps_max"] for d in doc["by_distance"]}
    # The closer observers' larger ε is in the file, never hidden: the owner's and partners'.
    assert rows[0] == pytest.approx(plan["eps_local"]) and rows[0] > 8.0
    assert rows[1] == pytest.approx(plan["eps_max_by_distance"][0]["eps_max"])
    assert network_line(doc).endswith(
        f"<= {max(v for k, v in rows.items() if k >= 2):.2f} at distance >= 2 (target 8.00: met); "
        "server: no models (sealed relay)"
    )
    line = privacy_line(cfg, NODES)
    assert f"σ={net.noise_multiplier:.4f}" in line and f"{plan['eps_local']:.2f} to anyone" in line
    summary = privacy_summary(cfg, strategy, strategy.reports.eps_spent(), NODES)
    assert summary["privacy_unit"] == "network" and summary["network_plan"] == net.report()


def test_a_network_run_whose_schedule_broke_says_it_missed_its_target():
    """A dropped sealed exchange: local ε for everyone, so the far class's target is missed."""
    dropped, drop = drop_first_sealed_step()
    config = {**TINY, "gossip-mode": "matching", "privacy-unit": "network"}
    strategy, _ = run_gossip(config, NODES, drop=drop)
    doc = network_privacy(RunConfig.from_run_config(config), strategy)
    assert dropped and not doc["calibration"]["target_met"]
    assert doc["calibration"]["eps_network_realized"] > 8.0
    assert "(target 8.00: MISSED" in network_line(doc)
