import pytest

from sim.launch.processes import processes_under
from sim.launch.simulation import SimulationLink


@pytest.fixture(scope="session")
def superlink(tmp_path_factory):
    """One simulation SuperLink for all end-to-end tests, stopped by PID at the end."""
    with SimulationLink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield link
    assert link.process.poll() is not None, "the SuperLink is still running"
    assert link.ray_head is not None, "the link should share one Ray head across its runs"
    assert link.ray_head.process.poll() is not None, "the Ray head is still running"
    assert not processes_under(link.home), "processes of the link outlived it"


class Borrowed:
    """The session's SuperLink lent to a tool that would start its own: entering and
    leaving it does nothing (its owner, the `superlink` fixture, stops it)."""

    def __init__(self, link):
        self._link = link

    def __getattr__(self, name):
        return getattr(self._link, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.fixture
def lent_superlink(superlink, monkeypatch):
    """fl-sweep / fl-audit run their cells through the session's SuperLink (one start-up
    less each); the sweep test that checks a sweep starts and stops its own does not use this.
    """
    import sim.sweeps.cli

    monkeypatch.setattr(
        sim.sweeps.cli, "make_links", lambda k, addresses, **_: [Borrowed(superlink)] * k
    )
    return superlink
