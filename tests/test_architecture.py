"""The package arrows of docs/architecture.md, checked on every import of every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The app (what a FAB ships to SuperNodes) and the harness under sim/, by job.
PACKAGES = (
    "flower_app",
    "client_app",
    "server_app",
    "strategies",
    "sim.launch",
    "sim.sweeps",
    "sim.analysis",
    "sim.bench",
)
ALLOWED = {
    "flower_app": set(),
    "client_app": {"flower_app"},
    "server_app": {"flower_app", "strategies"},
    "strategies": {"flower_app"},
    "sim.launch": set(),
    "sim.sweeps": {"sim.launch", "sim.analysis", "flower_app"},
    "sim.analysis": {"flower_app"},
    "sim.bench": {"sim.launch", "server_app", "strategies", "flower_app"},
}
TOP_LEVEL = {
    "flower_app",
    "client_app",
    "server_app",
    "strategies",
    "sim",
    "tests",
    "scripts",
    "docs",
}


def package_of(module: str) -> str | None:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return "sim" if module == "sim" else None


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
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        for module in imports(path):
            target = package_of(module)
            if target and target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong


def test_nothing_outside_sim_imports_sim():
    app = [
        p
        for top in ("flower_app", "client_app", "server_app", "strategies")
        for p in (ROOT / top).rglob("*.py")
    ]
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted(app)
        for module in imports(path)
        if module.split(".")[0] == "sim"
    ]
    assert not wrong, wrong


def test_the_top_level_is_the_design_cards():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= TOP_LEVEL, packages - TOP_LEVEL
    assert {p.name for p in (ROOT / "sim").iterdir() if (p / "__init__.py").exists()} == {
        "launch",
        "sweeps",
        "analysis",
        "bench",
    }


def test_only_records_imports_flwr_in_the_core():
    users = [
        p.name
        for p in sorted((ROOT / "flower_app").glob("*.py"))
        if any(m.split(".")[0] == "flwr" for m in imports(p))
    ]
    assert users == ["records.py"]
