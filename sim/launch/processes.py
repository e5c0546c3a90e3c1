"""Processes this project starts, found and stopped by PID (never by name pattern).

Flower detaches some of its children and Ray forks its own, so everything here walks /proc:
descendants by parent PID, and stragglers by the FLWR_HOME they inherited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (flwr, flower-superlink)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has finished: only its parent has not reaped it yet)."""
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found through /proc (Flower detaches some of them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _ppid_and_state(int(entry.name))):
            children.setdefault(info[0], []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    """The process's command line, or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_processes(pids: Iterable[int], *, grace: float = 15.0) -> list[int]:
    """SIGTERM the processes and all their descendants, SIGKILL what is left after `grace`.

    Returns the PIDs that were signalled.
    """
    targets: list[int] = []
    for pid in pids:
        if alive(pid):
            targets += [pid, *descendants(pid)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in targets:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in targets) and time.monotonic() < deadline:
            time.sleep(0.2)
    return targets


def processes_under(root: Path) -> list[int]:
    """PIDs whose FLWR_HOME lies under `root`: every process a deployment starts inherits it.

    Catches what a PID walk cannot: children orphaned when their parent was SIGKILLed.
    """
    marker = f"FLWR_HOME={Path(root).resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v == marker or v.startswith(marker + b"/") for v in environ):
            if alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def kill_now(pid: int) -> list[int]:
    """SIGKILL a process and its descendants at once, as if its device lost power."""
    targets = [pid, *descendants(pid)]
    for p in targets:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


def stop_process_group(process: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM the process group `process` leads, SIGKILL it after `grace` s, and reap it."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and Ctrl-C raise KeyboardInterrupt (so cleanup runs).

    Ctrl-C too: a background job of a non-interactive shell (`nohup`, some CI runners)
    starts with SIGINT ignored, and the block must stop on it all the same. The previous
    handlers come back afterwards; off the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
