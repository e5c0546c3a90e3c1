"""A sweep's folder: where it goes, its one writer, and what a killed run of it left running.

`<out>/.lock` is held by the one process writing the folder; `<out>/.launch.json` names the
FLWR_HOME of each SuperLink the sweep started, so a later run can stop what a killed one left.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from flower_app.results import (
    FolderLock,
    FolderLocked,
    atomic_write_text,
    resolve_results_dir,
)
from sim.analysis.names import MANIFEST, TIDY
from sim.launch.processes import command_line, processes_under, stop_processes
from sim.sweeps.spec import SweepError

# In the sweep folder: the lock of its one writer, and where its SuperLink lived.
SWEEP_LOCK = ".lock"
LAUNCH_RECORD = ".launch.json"


def default_out(name: str, now: datetime | None = None, root: str = "results/sweeps") -> Path:
    """`<project>/<root>/<name>-<UTC timestamp>`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return resolve_results_dir(f"{root}/{name}-{stamp}")


def out_and_command(
    args: argparse.Namespace, argv: Sequence[str], prog: str, name: str, root: str
) -> tuple[Path, str]:
    """The folder (--out, else a new timestamped one under `root`) and the command resuming it."""
    out = (args.out.expanduser().resolve()) if args.out else default_out(name, root=root)
    return out, shlex.join([prog, *argv] + ([] if args.out else ["--out", str(out)]))


def check_out(out: Path) -> None:
    """SweepError (one line) unless `out` is, or can be made, a folder this user may write.

    Writes nothing: the dry run calls it too.
    """
    for path in (out, *out.parents):
        try:
            is_dir = path.is_dir()
            if not is_dir and not path.exists():
                continue
        except OSError as err:
            raise SweepError(f"--out {out} cannot be reached: {err.strerror} ({path})") from None
        if not is_dir:
            where = "is a file" if path == out else f"cannot be made: {path} is a file"
            raise SweepError(f"--out {out} {where}, not a folder; give a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SweepError(
                f"--out {out} cannot be written: no write permission on {path}; "
                "give a folder you may write"
            )
        return


@contextmanager
def only_writer(out: Path, what: str) -> Iterator[None]:
    """Hold the folder's writer lock; a second writer gets one line naming the holder."""
    lock = FolderLock(out / SWEEP_LOCK, what)
    try:
        lock.acquire()
    except FolderLocked as err:
        raise SweepError(str(err)) from None
    except OSError as err:  # e.g. the disk filled or the permission changed since check_out
        raise SweepError(f"cannot write {what}: {err.strerror} ({err.filename})") from None
    try:
        yield
    finally:
        lock.release()


def record_links(out: Path, homes: Sequence[Path]) -> None:
    """Note the sweep's SuperLink homes: what a later run must stop if this one is killed."""
    record = {"flwr_homes": [str(h) for h in homes]}
    atomic_write_text(out / LAUNCH_RECORD, json.dumps(record) + "\n")


def stop_leftovers(out: Path, log: Callable[[str], None]) -> list[int]:
    """Stop what an earlier, killed run of this sweep left running; the PIDs stopped.

    Its processes are the ones whose environment carries the FLWR_HOME it recorded (every
    process its SuperLink, the simulation and Ray start inherits it), and that still run.
    """
    try:
        record = json.loads((out / LAUNCH_RECORD).read_text(encoding="utf-8"))
        homes = record["flwr_homes"] if "flwr_homes" in record else [record["flwr_home"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    leftovers = [pid for home in homes for pid in processes_under(Path(home)) if command_line(pid)]
    if leftovers:
        log(f"stopping {len(leftovers)} process(es) an earlier run of this sweep left: {leftovers}")
        stop_processes(leftovers, grace=5.0)
    return leftovers


def sweep_folder(path: Path) -> Path:
    """`path` resolved, if it holds a sweep (its manifest and tidy table); else `SweepError`."""
    folder = path.expanduser().resolve()
    if not (folder / MANIFEST).exists() or not (folder / TIDY).exists():
        raise SweepError(f"{folder} is not a sweep folder (no {MANIFEST} and {TIDY})")
    return folder
