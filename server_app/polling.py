"""A Grid that notices replies promptly.

In deployment, flwr 1.42 hands the ServerApp an HttpGrid whose `send_and_receive` checks
for replies every 3 s, so every round ended on the next 3-second tick after its last reply
(about 1.5 s lost per round). Simulation's InMemoryGrid already polls every 0.1 s.

In simulation, flwr 1.42's runtime looks for work every 0.1 s by asking its in-memory state,
node by node, for that node's next message, and each ask scans every stored message: with n
nodes and n messages of a round in flight that is n² checks a sweep, holding the state's
lock. At 1,000 nodes it kept one thread busy most of a round (py-spy) and competed with the
ServerApp and the replies for the GIL. So in simulation at most `SIMULATION_WINDOW` messages
are in flight: the rest are pushed as replies come back (actors are never idle for lack of
work while the window is several times their number). A deployment's SuperNodes pull their
own messages, so there every message is pushed at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

POLL_INTERVAL_S = 0.2
SIMULATION_WINDOW = 64


def collect_replies(
    msg_ids: set[str],
    pull: Callable[[set[str]], Iterable[Message]],
    *,
    timeout: float | None,
    interval: float = POLL_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    more: Callable[[int], set[str]] = lambda in_flight: set(),
) -> list[Message]:
    """Pull replies to `msg_ids` every `interval` s until all arrived or `timeout` passed.

    After each pull, `more(in_flight)` may push further messages and return their ids.
    """
    pending = set(msg_ids)
    end = None if timeout is None else clock() + timeout
    replies: list[Message] = []
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        pending |= more(len(pending))
        if not pending or (end is not None and clock() >= end):
            break
        sleep(interval if end is None else max(0.0, min(interval, end - clock())))
    return replies


class PromptGrid:
    """Wraps a Grid; `send_and_receive` polls every `interval` s, all else passes through.

    With a `window`, at most that many messages are in flight at once (simulation).
    """

    def __init__(
        self, grid: Grid, interval: float = POLL_INTERVAL_S, window: int | None = None
    ) -> None:
        """Wrap `grid`."""
        self._grid = grid
        self._interval = interval
        self.window = window

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push `messages`, then return the replies that arrive within `timeout` seconds."""
        messages = list(messages)
        if not messages:
            return []
        window = self.window or len(messages)
        queue = iter(messages)

        def more(in_flight: int) -> set[str]:
            batch = list(itertools.islice(queue, max(0, window - in_flight)))
            return set(self._grid.push_messages(batch)) if batch else set()

        return collect_replies(
            more(0), self._grid.pull_messages, timeout=timeout, interval=self._interval, more=more
        )

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped grid's."""
        return getattr(self._grid, name)


def simulated(grid: Grid) -> bool:
    """Whether `grid` is flwr's simulation grid (its runtime shares this process)."""
    return type(grid).__name__ == "InMemoryGrid"


def prompt_grid(grid: Grid) -> PromptGrid:
    """The ServerApp's grid: windowed in simulation, not in deployment."""
    return PromptGrid(grid, window=SIMULATION_WINDOW if simulated(grid) else None)
