"""`fdg-superexec`: Flower's SuperExec whose ClientApp tasks start warm, forked.

Flower 1.42's `flower-superexec` (what `flower-supernode --isolation subprocess` starts, and
what an operator runs beside `--isolation process`) launches every task through an
`Executor`; its `SubprocessExecutor` runs a fresh `flwr-clientapp` process per message, which
spends seconds importing torch, Opacus and flwr before it does anything. This command is
`flower-superexec`, with the same arguments, except that its executor forks each ClientApp
task from this process, which imported those libraries once at start:

- the child runs exactly what `flwr-clientapp` runs (`run_clientapp`, with the task's token,
  address and certificates) and exits; it never returns to the loop;
- this process never runs a task, so no run's state can reach another run's task: every
  task starts from the same state, that of a process that has only imported libraries. The
  app's own code comes from the run's FAB in each child, as with `flwr-clientapp`;
- other task types (ServerApp, simulation) are launched as Flower launches them.

The DP noise and Poisson sampling are keyed by a fresh OS key in each child
(`secrets.token_bytes`), which a fork does not replay; the global RNGs are reseeded in each
child all the same.

Hand-written because flwr 1.42 has warm pools only for its Kubernetes executor, and
`flower-superexec --executor` accepts only `subprocess` and `kubernetes`.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import sys
import time
import traceback
from typing import Any

# What a ClientApp of this project imports that is slow to import: loaded once, here.
PRELOAD = (
    "numpy",
    "torch",
    "opacus",
    "opacus.accountants",
    "scipy.stats",
    "networkx",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def preload() -> None:
    """Import the slow libraries (a missing one is only slower, not an error)."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _reseed_in_child() -> None:
    """Fresh global RNG states in a forked child (they are copies of the parent's)."""
    random.seed()
    seed = int.from_bytes(os.urandom(8), "little")
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def run_task_in_child(spec: Any) -> int:
    """What `flwr-clientapp` does for one task; the child's exit code."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the parent's handlers would close its client
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    t0 = time.monotonic()
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it, as flwr-clientapp would, and exit
        traceback.print_exc()
        return 1
    finally:
        sys.stderr.write(f"fdg-superexec: task {spec.task_id} ran {time.monotonic() - t0:.2f} s\n")
    return 0


def make_fork_executor() -> Any:
    """A `SubprocessExecutor` whose ClientApp tasks are forked from this process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkExecutor(SubprocessExecutor):
        """Forks a child per ClientApp task; other task types as Flower runs them."""

        def __init__(self) -> None:
            self.children: set[int] = set()

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _reseed_in_child()
                    code = run_task_in_child(spec)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            self.children.add(pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Reap the children that finished."""
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.discard(pid)

        def close(self) -> None:
            """Stop children still running (their SuperNode is going away)."""
            for pid in self.children:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    return ForkExecutor()


def main() -> None:
    """`fdg-superexec`: `flower-superexec`'s arguments, ClientApp tasks forked warm."""
    # Flower's SuperExec asks for a task every second by default: a round would wait for it.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    preload()
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")

    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")

    executor = make_fork_executor()
    # run_superexec builds its executor with get_executor; this process supplies its own.
    loop.get_executor = lambda *args, **kwargs: executor
    cli.flower_superexec()


if __name__ == "__main__":
    main()
