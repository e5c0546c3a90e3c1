"""The suite's own scheduling: deployments must run one at a time under pytest-xdist."""

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def test_deploy_tests_share_one_xdist_worker_in_turn(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    deploy: a deployment\n")
    (tmp_path / "test_groups.py").write_text(
        "import os, pytest\n"
        "@pytest.mark.deploy\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_deploy(i):\n"
        "    print('worker', os.environ['PYTEST_XDIST_WORKER'])\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_other(i):\n"
        "    pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
         "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    deploy = [line for line in lines if "::test_deploy[" in line and "PASSED" in line]
    assert len(deploy) == 4, proc.stdout
    # xdist names a grouped test `...@deploy`; every one ran on the same worker.
    assert all(line.rstrip().endswith("@deploy") for line in deploy), deploy
    assert len({line.split("]")[0] for line in deploy}) == 1, deploy
