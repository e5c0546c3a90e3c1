"""A run refused on purpose (bad config, a node's policy) ends in one log line."""

from __future__ import annotations

import logging
from logging import ERROR
from typing import NoReturn

from flwr.common import log


class RunRejected(RuntimeError):
    """The run cannot start or go on; the message is the one line the user needs."""


def _rejection(exc: BaseException | None) -> RunRejected | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RunRejected):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class OneLineRejections(logging.Filter):
    """Keep a rejected run to the one line `fail` logged.

    Flower logs a failing ServerApp with its traceback, then an "Exit Code: 700 ... An
    unhandled exception occurred" help text; for a run refused on purpose (bad config, a
    node's policy) both only bury the reason. Other failures keep their tracebacks.
    """

    def __init__(self) -> None:
        """Nothing rejected yet."""
        super().__init__()
        self.rejected = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Flower's traceback and exit-code text of a rejected run."""
        if record.exc_info and _rejection(record.exc_info[1]) is not None:
            self.rejected = True
            return False
        return not (self.rejected and str(record.msg).startswith("Exit Code:"))


def one_line_rejections() -> None:
    """Install `OneLineRejections` on Flower's logger (once per process)."""
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineRejections) for f in flwr_logger.filters):
        flwr_logger.addFilter(OneLineRejections())


def fail(message: str) -> NoReturn:
    """Log `message` as the run's one error line and stop the run."""
    log(ERROR, "%s", message)
    # An exception, not sys.exit: Flower marks the run failed only when main raises.
    raise RunRejected(message)
