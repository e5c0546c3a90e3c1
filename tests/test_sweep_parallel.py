"""`fl-sweep run --parallel-cells K`: K cells at once, one runner each, still resumable."""

import os
import threading
import time
from pathlib import Path

import pytest
from sweep_fakes import FakeRunner, Killed
from test_sweep_run import ARGV, IDS, statuses, tidy

from sim.launch.flwr_cli import flower_env
from sim.launch.ray_head import WORKER_PORT_BLOCK, RayHead
from sim.sweeps.cli import main, make_links
from sim.sweeps.runner import Sweep
from sim.sweeps.spec import SweepSpec, expand


class Meeting(FakeRunner):
    """Starts a cell only once the other runner is inside one too: fails unless they overlap."""

    def __init__(self, barrier, **kwargs):
        super().__init__(**kwargs)
        self.barrier = barrier

    def __call__(self, run_config, **kwargs):
        self.barrier.wait(timeout=20)
        return super().__call__(run_config, **kwargs)


class Slow(FakeRunner):
    """Takes a while between rounds, so it is mid-cell when the other runner dies."""

    def __call__(self, run_config, *, on_poll, **kwargs):
        def slow_poll():
            time.sleep(0.3)
            on_poll()

        return super().__call__(run_config, on_poll=slow_poll, **kwargs)


def sweep(out):
    spec = SweepSpec(
        fixed={"num-server-rounds": 3},
        grid={"strategy": ["fedavg"], "eps": [float("inf"), 2], "seed": [7, 8]},
        nodes=3,
    )
    return Sweep(out, spec, expand(spec))


def test_two_runners_run_two_cells_at_a_time_and_every_cell_once(tmp_path):
    barrier = threading.Barrier(2)
    runners = [Meeting(barrier), Meeting(barrier)]
    assert sweep(tmp_path).run(runners) == []
    calls = runners[0].calls + runners[1].calls
    assert sorted(calls) == sorted(IDS) and all(r.calls for r in runners)
    assert set(statuses(tmp_path).values()) == {"completed"}
    df = tidy(tmp_path)
    assert len(df) == 4 * 3 and not df.duplicated(["cell", "round"]).any()


def test_a_runner_killed_mid_sweep_stops_the_other_and_a_resume_loses_and_duplicates_nothing(
    tmp_path,
):
    with pytest.raises(Killed):
        sweep(tmp_path).run([FakeRunner(kill_at=1, kill_mid=True), Slow()])
    # The other cell was stopped at its next poll: pending, not failed, no rows in sweep.csv.
    assert set(statuses(tmp_path).values()) == {"pending"}
    assert not (tmp_path / "sweep.csv").read_text().strip().splitlines()[1:]
    again = [FakeRunner(), FakeRunner()]
    assert sweep(tmp_path).run(again) == []
    assert sorted(again[0].calls + again[1].calls) == sorted(IDS)
    df = tidy(tmp_path)
    assert len(df) == 4 * 3 and not df.duplicated(["cell", "round"]).any()


def test_a_failing_cell_on_one_runner_does_not_stop_the_other(tmp_path):
    runners = [FakeRunner(fail={IDS[0], IDS[1]}), FakeRunner(fail={IDS[0], IDS[1]})]
    assert sweep(tmp_path).run(runners) == IDS[:2]
    assert [statuses(tmp_path)[i] for i in IDS] == ["failed", "failed", "completed", "completed"]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--parallel-cells", "2", "--ray-address", "10.0.0.1:6379"], "needs 2 Ray clusters"),
        (["--ray-address", "10.0.0.1:6379,10.0.0.2:6379", "--parallel-cells", "3"], "got 2"),
        (["--parallel-cells", "0"], "is not valid on this machine: 1 to"),
        (["--parallel-cells", str((os.cpu_count() or 1) + 1)], "at least one CPU"),
    ],
)
def test_impossible_parallelism_is_refused_in_one_line_before_anything_is_written(
    tmp_path, capsys, flags, says
):
    out = tmp_path / "s"
    assert main([*ARGV, "--out", str(out), *flags], runner=FakeRunner()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and err[0].startswith("fl-sweep: --parallel-cells")
    assert not out.exists()


def test_local_cells_split_the_cpus_and_given_clusters_get_no_local_head():
    cpus = os.cpu_count() or 1
    links = make_links(2, [None, None]) + make_links(2, ["10.0.0.1:6379", "10.0.0.2:6379"])
    try:
        assert [link.ray_head.num_cpus for link in links[:2]] == [max(1, cpus // 2)] * 2
        assert links[0].home != links[1].home and links[0].port != links[1].port
        assert [link.ray_head for link in links[2:]] == [None, None]
        assert [link.ray_address for link in links[2:]] == ["10.0.0.1:6379", "10.0.0.2:6379"]
    finally:
        for link in links:
            link.stop()


def test_two_ray_heads_of_one_process_get_disjoint_worker_port_blocks():
    # Ray's default worker ports (10002 up) are the same for every cluster on a machine.
    heads = [RayHead(flower_env(Path("/nonexistent"))) for _ in range(3)]
    try:
        blocks = [h.worker_ports for h in heads]
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        # Below the ephemeral range, where free_port() and outgoing connections take theirs.
        assert all(hi - lo + 1 == WORKER_PORT_BLOCK and hi < ephemeral for lo, hi in blocks)
        assert len({lo for lo, _ in blocks}) == 3
    finally:
        for head in heads:
            head.stop()
