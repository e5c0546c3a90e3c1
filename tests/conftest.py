import os

import pytest

# Flower must not try to install dependencies, check for updates or phone home in tests.
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a Flower run (in-process grids) need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess_grid import RUN_ID

    for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Deployments run one after another on one xdist worker (`--dist loadgroup`).

    They spend much of their time waiting on Flower's heartbeats, so the other worker runs
    simulation and unit tests beside them.
    """
    for item in items:
        if item.get_closest_marker("deploy"):
            item.add_marker(pytest.mark.xdist_group("deploy"))
