import pytest

from launch.simulation import SimulationLink


@pytest.fixture(scope="session")
def superlink(tmp_path_factory):
    """One simulation SuperLink for all end-to-end tests, stopped by PID at the end."""
    with SimulationLink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield link
    assert link.process.poll() is not None, "the SuperLink is still running"
