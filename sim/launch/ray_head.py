"""A Ray head this process owns (`ray start --head --block`), stopped by its process group.

Flower's RayBackend calls `ray.init` in every run's simulation process; without an address
that starts a fresh local Ray (GCS, raylet, agents) and `ray.shutdown()` stops it when the
run ends, so every run of a sweep paid for a Ray start. With RAY_ADDRESS pointing at a head
that lives as long as the SimulationLink, `ray.init` only connects. The head never runs
`ray stop` (that stops every Ray on the machine): it is stopped by PID, like everything
else in `launch`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sim.launch.flwr_cli import FlowerRunError
from sim.launch.processes import console_script, free_port, stop_process_group

READY = "Ray runtime started"
# Ray gives every worker and driver a port from --min/--max-worker-port, by default 10002 up,
# whichever cluster it belongs to: two clusters on one machine hand out the same ports and a
# worker of one dies binding a port the other holds. Each head here gets its own block, below
# the kernel's ephemeral range (where free_port() and every outgoing connection take theirs).
WORKER_PORT_BLOCK = 500
WORKER_PORT_LOW = 10002
_taken_blocks: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_port_block(rng: random.Random | None = None) -> tuple[int, int]:
    """A block of ports no other head of this process uses, its first port free now."""
    rng = rng or random.Random()
    low, high = WORKER_PORT_LOW, _ephemeral_low() - WORKER_PORT_BLOCK
    blocks = [b for b in range(low, high + 1, WORKER_PORT_BLOCK) if b not in _taken_blocks]
    rng.shuffle(blocks)
    for start in blocks:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", start))
            except OSError:
                continue
        _taken_blocks.add(start)
        return start, start + WORKER_PORT_BLOCK - 1
    raise FlowerRunError(f"no free block of {WORKER_PORT_BLOCK} ports in {low}-{high}")


class RayHead:
    """`ray start --head` on 127.0.0.1 with free ports and its own temporary folder."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        num_cpus: int | None = None,
        gpus: bool = False,
        startup_timeout: float = 90.0,
    ) -> None:
        """Prepare (not start); `env` is the environment its processes inherit.

        `gpus`: offer the machine's GPUs to the runs (Ray counts the visible ones); without,
        the head offers none and hides them from its workers (CUDA_VISIBLE_DEVICES=''), so a
        simulated node that was given no GPU share cannot use one unscheduled.
        """
        self.env = env if gpus else {**env, "CUDA_VISIBLE_DEVICES": ""}
        self.gpus = gpus
        self.root: Path | None = None
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.worker_ports = worker_port_block()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What `ray.init(address=...)` and RAY_ADDRESS take."""
        return f"127.0.0.1:{self.port}"

    def command(self, temp_dir: Path) -> list[str]:
        """The `ray start --head` command line (GPUs: those Ray finds, or none)."""
        return [
            console_script("ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            *([] if self.gpus else ["--num-gpus=0"]),
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--min-worker-port={self.worker_ports[0]}",
            f"--max-worker-port={self.worker_ports[1]}",
            f"--temp-dir={temp_dir}",
        ]

    def start(self) -> RayHead:
        """Start the head and wait until it says it runs."""
        # Short, under /tmp: Ray's socket paths must stay under 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        log_path = self.root / "ray-head.out"
        log = open(log_path, "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            self.command(self.root / "ray"),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches raylet and workers
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if READY in text:
                return self
            if self.process.poll() is not None:
                self.stop()
                tail = text.strip().splitlines()
                raise FlowerRunError(
                    f"ray start --head exited with code {self.process.returncode}: "
                    f"{tail[-1] if tail else 'no output'}"
                )
            time.sleep(0.25)
        self.stop()
        raise FlowerRunError(f"the Ray head did not start within {self.startup_timeout}s")

    def stop(self) -> None:
        """Stop the head's process group by PID (then kill it if it lingers)."""
        if self.process is not None:
            stop_process_group(self.process, grace=10.0)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        _taken_blocks.discard(self.worker_ports[0])
