"""A fake cell runner: writes a results folder like the ServerApp does, without Flower."""

import math
from pathlib import Path

from flower_app.config import RunConfig
from flower_app.results import RunFiles, write_json
from sim.launch.flwr_cli import RunOutcome

BASE = [
    "round",
    "strategy",
    "eps_target",
    "eps_spent",
    "accuracy",
    "loss",
    "train_loss",
    "nodes_trained",
    "bytes_sent_per_node",
    "bytes_sent_cum_per_node",
    "round_s",
    "wall_s",
]
GOSSIP = [
    "node_acc_mean",
    "node_acc_min",
    "node_acc_max",
    "consensus_distance",
]
GAPS = {"ring": 0.049, "torus": 0.2, "complete": 1.0}
MODE_GAP = {"matching": 1.0, "edges": 0.5, "metropolis": 1.5}  # a mode changes the gap


class Killed(BaseException):
    """Stands for SIGKILL/Ctrl-C: not an Exception, so the sweep does not swallow it."""


def accuracy(cfg: RunConfig, r: int) -> float:
    ceiling = 0.9 if math.isinf(cfg.eps) else 0.9 - 0.4 / cfg.eps
    if cfg.strategy == "gossip":
        ceiling -= {"ring": 0.08, "torus": 0.04}.get(cfg.topology, 0.0)
    return round(ceiling * (1 - 0.5**r) + 0.01 * (cfg.seed - 7), 4)


def network_doc(cfg: RunConfig) -> dict:
    """A network_privacy.json as a gossip run writes it: ε falling with distance."""
    rows = [
        {
            "distance": d,
            "pairs": 9,
            "eps_min": cfg.eps * 0.6**d * 0.8,
            "eps_mean": 0.0,
            "eps_max": cfg.eps * 0.6**d,
        }  # fmt: skip
        for d in range(4)
    ]
    return {"relay": cfg.gossip_relay, "method": "pairwise network DP (fake)", "by_distance": rows}


class FakeRunner:
    def __init__(
        self,
        *,
        fail=(),
        crash=(),
        kill_at=None,
        kill_mid=False,
        kill_after_done=False,
        no_summary=(),
        score=None,
    ):
        self.fail, self.crash, self.no_summary = set(fail), set(crash), set(no_summary)
        self.kill_at, self.kill_mid, self.kill_after_done = kill_at, kill_mid, kill_after_done
        self.score = score or accuracy  # (cfg, round) -> accuracy
        self.configs: list[RunConfig] = []
        self.calls: list[str] = []
        self.polls = 0

    def __call__(self, run_config, *, num_nodes, on_poll):
        cid = run_config["run-name"]
        self.calls.append(cid)
        kill_now = self.kill_at is not None and len(self.calls) == self.kill_at
        if kill_now and not (self.kill_mid or self.kill_after_done):
            raise Killed
        if cid in self.crash:
            raise RuntimeError(f"flwr run failed: cannot reach SuperLink for {cid}")
        cfg = RunConfig.from_run_config(run_config)
        self.configs.append(cfg)
        gossip = cfg.strategy == "gossip"
        files = RunFiles(Path(run_config["results-dir"]) / cid, BASE + (GOSSIP if gossip else []))
        files.start(cfg.to_dict() | {"num-nodes": num_nodes})
        for r in range(1, cfg.num_server_rounds + 1):
            acc = self.score(cfg, r)
            row = {
                "round": r,
                "strategy": cfg.strategy,
                "eps_target": cfg.eps,
                "eps_spent": 0.0 if math.isinf(cfg.eps) else cfg.eps * r / cfg.num_server_rounds,
                "accuracy": acc,
                "loss": 2 - acc,
                "train_loss": 2.1 - acc,
                "nodes_trained": num_nodes,
                # FedAvg uploads one model a round; gossip here sends half as much.
                "bytes_sent_per_node": 1000 if not gossip else 500,
                "bytes_sent_cum_per_node": (1000 if not gossip else 500) * r,
                "round_s": 1.0,
                "wall_s": float(r),
            }
            if gossip:
                row |= {
                    "node_acc_mean": acc - 0.02,
                    "node_acc_min": acc - 0.05,
                    "node_acc_max": acc,
                    "consensus_distance": 2.0 / r,
                }
            files.add_round(row)
            on_poll()
            self.polls += 1
            if kill_now and self.kill_mid:
                raise Killed
        if cid in self.fail:
            files.finish({"status": "failed", "error": "RuntimeError: boom"})
            return RunOutcome(f"run-{cid}", "finished:failed", "RuntimeError: boom", 1.0)
        if cid not in self.no_summary:
            summary = {
                "status": "completed",
                "final_accuracy": acc,
                "eps_spent": row["eps_spent"],
                "wall_s": 3.0,
                "privacy": {
                    "delta": cfg.delta,
                    "noise": "seeded" if cfg.seeded_noise else "secret",
                    "noise_seed": cfg.noise_seed if cfg.seeded_noise else None,
                    "network_plan": {"min_distance": cfg.network_min_distance}
                    if cfg.privacy_unit == "network"
                    else None,
                },
            }
            if gossip:
                summary["topology"] = {
                    "name": cfg.topology,
                    "nodes": num_nodes,
                    "spectral_gap": GAPS.get(cfg.topology, 0.5) * MODE_GAP.get(cfg.gossip_mode, 1),
                }
            if gossip:
                write_json(files.folder / "network_privacy.json", network_doc(cfg))
            files.finish(summary)
        if kill_now and self.kill_after_done:
            raise Killed
        return RunOutcome(f"run-{cid}", "finished:completed", "", 1.0)
