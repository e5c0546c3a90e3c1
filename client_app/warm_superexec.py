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

The operator, not the run, decides what code runs: `--allowed-fabs FILE` lists the SHA-256
of every FAB this node may run (one per line, `#` comments; `flwr build` and the launcher's
`allowed-fabs` file give it). A ClientApp task whose FAB is not on it is refused in the
child before the FAB is installed or any of its code imported: the child hashes the bytes it
pulled itself and replies with an error, so the run learns the node refused. Without the
file fdg-superexec does not start, unless `--allow-any-fab` says so explicitly. Flower's own
`--isolation subprocess` has no such guard: it runs whatever app a run ships.

Hand-written because flwr 1.42 has warm pools only for its Kubernetes executor, and
`flower-superexec --executor` accepts only `subprocess` and `kubernetes`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path
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


ALLOW_FLAG, ANY_FLAG = "--allowed-fabs", "--allow-any-fab"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FabRefused(RuntimeError):
    """The task's FAB is not on this node's allow-list: nothing of it was installed or run."""


def read_allow_list(path: str) -> frozenset[str]:
    """The FAB hashes in `path` (one SHA-256 hex per line; blank lines and `#` comments)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SystemExit(f"fdg-superexec: {ALLOW_FLAG} {path}: {err.strerror}") from None
    hashes = [line.split("#", 1)[0].strip().lower() for line in lines]
    hashes = [h for h in hashes if h]
    if bad := [h for h in hashes if not _SHA256.fullmatch(h)]:
        raise SystemExit(
            f"fdg-superexec: {ALLOW_FLAG} {path}: {bad[0]!r} is not a SHA-256 hex digest "
            "(64 hex characters, as `flwr build` prints a FAB's hash)"
        )
    return frozenset(hashes)


def split_args(argv: list[str]) -> tuple[frozenset[str] | None, list[str]]:
    """(the allow-list, None for any FAB; flower-superexec's own arguments)."""
    rest, allowed, any_fab = [], None, False
    args = iter(argv)
    for arg in args:
        if arg == ANY_FLAG:
            any_fab = True
        elif arg == ALLOW_FLAG or arg.startswith(ALLOW_FLAG + "="):
            path = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            allowed = read_allow_list(path)
        else:
            rest.append(arg)
    if allowed is None and not any_fab:
        raise SystemExit(
            f"fdg-superexec: {ALLOW_FLAG} FILE is required (the SHA-256 of each FAB this "
            f"node may run, one per line), or {ANY_FLAG} to run whatever app a run ships"
        )
    return (None if any_fab else allowed), rest


def check_fab(content_hash: str, claimed_hash: str | None, allowed: frozenset[str]) -> None:
    """Raise `FabRefused` unless the FAB's bytes hash to an allowed value (and its claim)."""
    if content_hash not in allowed:
        raise FabRefused(
            f"FAB {content_hash[:12]} is not on this node's allow-list ({ALLOW_FLAG}): "
            "its operator did not approve this app, nothing of it ran"
        )
    if claimed_hash is not None and claimed_hash != content_hash:
        raise FabRefused(f"FAB claims hash {claimed_hash[:12]}, its bytes hash to something else")


def guard_fab_install(allowed: frozenset[str]) -> None:
    """In a child: check the pulled FAB's own bytes before Flower installs or imports it.

    Flower's `run_clientapp` pulls the message and the FAB, then installs the FAB; a
    `FabRefused` there comes back to the run as the ClientApp's error reply.
    """
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    pull, install = runner.pull_task_input, runner.install_from_fab
    claimed: dict[str, str] = {}

    def pull_task_input(client: Any) -> Any:
        pulled = pull(client)
        claimed["hash"] = pulled[3].hash_str
        return pulled

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        check_fab(hashlib.sha256(content).hexdigest(), claimed.get("hash"), allowed)
        return install(fab_file, *args, **kwargs)

    runner.pull_task_input = pull_task_input
    runner.install_from_fab = install_from_fab


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


def make_fork_executor(allowed: frozenset[str] | None = None) -> Any:
    """A `SubprocessExecutor` whose ClientApp tasks are forked from this process.

    With `allowed`, each child refuses a FAB not on it (`guard_fab_install`).
    """
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
            if allowed is not None and spec.fab_hash and spec.fab_hash not in allowed:
                sys.stderr.write(
                    f"fdg-superexec: task {spec.task_id}: FAB {spec.fab_hash[:12]} is not "
                    "allowed; its child will refuse it\n"
                )
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _reseed_in_child()
                    if allowed is not None:
                        guard_fab_install(allowed)
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
    allowed, sys.argv[1:] = split_args(sys.argv[1:])
    preload()
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")

    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")

    executor = make_fork_executor(allowed)
    # run_superexec builds its executor with get_executor; this process supplies its own.
    loop.get_executor = lambda *args, **kwargs: executor
    cli.flower_superexec()


if __name__ == "__main__":
    main()
