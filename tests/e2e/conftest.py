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
