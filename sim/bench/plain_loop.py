"""The plain loop `fl-bench` measures Flower against: the same run, in-process, no transport."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from client_app.replies import train_reply
from flower_app.config import RunConfig
from flower_app.gossip import apply_pairs, mean_model, random_matching
from flower_app.model import build_model
from flower_app.node import local_round
from flower_app.topology import build_topology
from flower_app.wire import ARRAYS, NUM_EXAMPLES
from server_app.evaluation import central_test_sets, model_evaluator
from strategies.gossip import Layout


def raw_run(run_config: Mapping[str, Any], num_nodes: int) -> tuple[float, list[float]]:
    """Seconds for the whole run, and per round, as a plain loop (as the tutorial does it).

    Same data, model, DP, rounds, node count and seed as the Flower run; nodes train one
    after another with torch's default threads. Aggregation, gossip averaging and
    evaluation are the app's own code (Flower's FedAvg sum, the Gossip strategy's layout
    and pairing, the ServerApp's test sets and evaluator); only the transport is missing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default: one thread per core
    try:
        t0 = time.perf_counter()
        cfg = RunConfig.from_run_config(run_config)
        test, node_test = central_test_sets(cfg)
        evaluate_central, evaluate_node = (
            model_evaluator(cfg, test),
            model_evaluator(cfg, node_test),
        )
        start = ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict())
        layout = Layout(start)
        models = dict.fromkeys(range(num_nodes), start)
        ledgers: dict[int, Any] = dict.fromkeys(range(num_nodes))
        graph = build_topology(cfg.topology, num_nodes, seed=cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        round_s = []
        for server_round in range(1, cfg.num_server_rounds + 1):
            t_round = time.perf_counter()
            replies = {}
            for v in range(num_nodes):
                out = local_round(
                    cfg,
                    partition_id=v,
                    num_partitions=num_nodes,
                    weights=models[v].to_torch_state_dict(),
                    ledger=ledgers[v],
                    server_round=server_round,
                )
                ledgers[v] = out.ledger
                replies[v] = train_reply(out, v)
            if cfg.strategy == "fedavg":
                avg = aggregate_arrayrecords(list(replies.values()), NUM_EXAMPLES)
                models = dict.fromkeys(range(num_nodes), avg)
                evaluate_central(avg.to_numpy_ndarrays())
            else:
                flat = {v: layout.flatten(r[ARRAYS]) for v, r in replies.items()}
                flat = apply_pairs(flat, random_matching(graph, rng), sequential=False)
                models = {v: layout.to_record(x) for v, x in flat.items()}
                evaluate_central(layout.unflatten(mean_model(flat)))
                for x in flat.values():
                    evaluate_node(layout.unflatten(x))
            round_s.append(time.perf_counter() - t_round)
        return time.perf_counter() - t0, round_s
    finally:
        torch.set_num_threads(threads)
