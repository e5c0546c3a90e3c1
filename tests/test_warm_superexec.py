"""The warm SuperExec forks each ClientApp task from a pristine parent: nothing leaks."""

import hashlib
import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.supercore.constant import TaskType

import client_app.warm_superexec as warm
from sim.launch.deploy_commands import supernode_command, warm_executor_command

STATE = {"tasks_seen": 0}


def spec(tmp_path, i, task_type=TaskType.CLIENT_APP):
    return SimpleNamespace(task_type=task_type, task_id=i, out=tmp_path / f"task-{i}.json",
                           suppress_output=False)  # fmt: skip


def fake_task(spec):
    """Stands for run_clientapp: records what the child process sees, then mutates it."""
    STATE["tasks_seen"] += 1
    spec.out.write_text(json.dumps({
        "pid": os.getpid(), "tasks_seen": STATE["tasks_seen"], "random": random.random(),
        "numpy": float(np.random.rand()), "torch": float(torch.rand(1)),
    }))  # fmt: skip
    return 0


def test_every_task_starts_from_the_parents_state_and_draws_fresh_randomness(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "run_task_in_child", fake_task)
    executor = warm.make_fork_executor()
    for i in range(3):
        assert executor.launch(spec(tmp_path, i)).status.name == "ACCEPTED"
    deadline = time.monotonic() + 30
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "children were not reaped"
    seen = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in range(3)]
    assert len({s["pid"] for s in seen} | {os.getpid()}) == 4, "a task ran in the parent"
    # A task's changes never reach the next task: each one saw only its own.
    assert [s["tasks_seen"] for s in seen] == [1, 1, 1] and STATE["tasks_seen"] == 0
    for key in ("random", "numpy", "torch"):  # global RNGs are not copies of one state
        assert len({s[key] for s in seen}) == 3, key


def test_other_task_types_are_launched_as_flower_launches_them(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        warm.make_fork_executor().__class__.__mro__[1], "launch",
        lambda self, s: calls.append(s.task_type) or "flower",
    )  # fmt: skip
    executor = warm.make_fork_executor()
    assert executor.launch(spec(tmp_path, 9, TaskType.SERVER_APP)) == "flower"
    assert calls == [TaskType.SERVER_APP] and not executor.children


def test_the_supernode_runs_in_process_isolation_beside_its_warm_superexec():
    node = supernode_command(superlink="10.0.0.1:9093", node_config="partition-id=0",
                             root_certificates=None, private_key=None, runtime_port=9100,
                             isolation="process")  # fmt: skip
    assert node[node.index("--isolation") + 1] == "process"
    cmd = warm_executor_command(runtime_port=9100, parent_pid=1234, allowed_fabs=Path("/a"))
    assert cmd[0].endswith("fdg-superexec")
    assert cmd[1:] == ["--allowed-fabs", "/a", "--runtime-api-address", "127.0.0.1:9100",
                       "--insecure", "--parent-pid", "1234"]  # fmt: skip


GOOD, OTHER = hashlib.sha256(b"the approved app").hexdigest(), "ab" * 32


def test_the_operator_must_name_the_apps_it_runs_or_say_any(tmp_path):
    listed = tmp_path / "allowed"
    listed.write_text(f"# approved by the operator\n{GOOD}\n\n{OTHER.upper()}  # v2\n")
    allowed, rest = warm.split_args(["--allowed-fabs", str(listed), "--insecure"])
    assert allowed == {GOOD, OTHER} and rest == ["--insecure"]
    assert warm.split_args([f"--allowed-fabs={listed}"])[0] == {GOOD, OTHER}
    assert warm.split_args(["--allow-any-fab", "--insecure"]) == (None, ["--insecure"])
    with pytest.raises(SystemExit, match="--allowed-fabs FILE is required"):
        warm.split_args(["--insecure"])
    listed.write_text("not-a-hash\n")
    with pytest.raises(SystemExit, match="'not-a-hash' is not a SHA-256"):
        warm.split_args(["--allowed-fabs", str(listed)])
    with pytest.raises(SystemExit, match="No such file"):
        warm.split_args(["--allowed-fabs", str(tmp_path / "missing")])


def test_a_child_refuses_a_fab_not_on_the_list_before_installing_it(monkeypatch):
    """The check hashes the bytes the child pulled, not what the task or the server claims."""
    import flwr.supernode.runtime.run_clientapp as runner

    installed = []
    monkeypatch.setattr(runner, "install_from_fab", lambda content, **kw: installed.append(content))
    monkeypatch.setattr(runner, "pull_task_input", lambda client: (None, None, None, fab))
    warm.guard_fab_install(frozenset({GOOD}))
    fab = SimpleNamespace(hash_str=GOOD)  # a server claiming the approved hash...
    runner.pull_task_input(None)
    with pytest.raises(warm.FabRefused, match="not on this node's allow-list"):
        runner.install_from_fab(b"a modified app", skip_prompt=True)  # ...for other bytes
    assert installed == []
    runner.install_from_fab(b"the approved app", skip_prompt=True)
    assert installed == [b"the approved app"]
    fab = SimpleNamespace(hash_str=OTHER)
    runner.pull_task_input(None)
    with pytest.raises(warm.FabRefused, match="claims hash"):
        runner.install_from_fab(b"the approved app", skip_prompt=True)
