"""The package arrows of docs/architecture.md, checked on every import of every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "flower_app",
    "client_app",
    "server_app",
    "strategies",
    "launch",
    "sweeps",
    "analysis",
    "bench",
)
ALLOWED = {
    "flower_app": set(),
    "client_app": {"flower_app"},
    "server_app": {"flower_app", "strategies"},
    "strategies": {"flower_app"},
    "launch": set(),
    "sweeps": {"launch", "analysis", "flower_app"},
    "analysis": {"flower_app"},
    "bench": {"launch", "server_app", "strategies", "flower_app"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_the_architecture_allows(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imports(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong


def test_only_records_imports_flwr_in_the_core():
    users = [
        p.name
        for p in sorted((ROOT / "flower_app").glob("*.py"))
        if any(m.split(".")[0] == "flwr" for m in imports(p))
    ]
    assert users == ["records.py"]
