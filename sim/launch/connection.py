"""One SuperLink connection, as the harness talks to it: the `flwr` commands of a run, once.

The owned simulation SuperLink (`sim.launch.simulation.SimulationLink`) and the local
deployment (`sim.launch.deployment.Deployment`) are both a `Connection`: each builds its
`FlwrCli` (home, connection name, environment) and its own `submit` (which app, which
federation options); status, wait and logs are declared here and nowhere else.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from sim.launch.flwr_cli import FlwrCli, RunOutcome


class Connection:
    """A SuperLink reached through `cli`: the `flwr` CLI with one FLWR_HOME and connection."""

    def __init__(self, cli: FlwrCli) -> None:
        """Talk to the SuperLink through `cli`."""
        self.cli = cli

    @property
    def connection(self) -> str:
        """The connection name `flwr` commands use (a section of `$FLWR_HOME/config.toml`)."""
        return self.cli.connection

    @property
    def env(self) -> dict[str, str]:
        """Environment of `flwr` CLI commands: FLWR_HOME holds the connection's config.toml."""
        return self.cli.env

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `flwr` CLI command against this SuperLink."""
        return self.cli.flwr(*args, timeout=timeout)

    def status(self, run_id: str) -> RunOutcome:
        """The run's status from `flwr list`."""
        return self.cli.status(run_id)

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 3600,
        poll_s: float = 2.0,
        on_poll: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """Block until the run finishes (see `FlwrCli.wait`)."""
        return self.cli.wait(run_id, timeout=timeout, poll_s=poll_s, on_poll=on_poll)

    def logs(self, run_id: str) -> str:
        """The run's log as far as the SuperLink keeps it."""
        return self.cli.logs(run_id)
