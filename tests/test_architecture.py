"""The package arrows of docs/architecture.md, checked on every import of every module.

Also the shape of the code: no long functions, a light wire-key module that strategies
import without torch or Opacus, and no private names leaned on across modules.
"""

import ast
import subprocess
import sys
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
    "sim.bench": {
        "sim.launch",
        "sim.sweeps",
        "server_app",
        "client_app",
        "strategies",
        "flower_app",
    },
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
# The project's own top-level packages (a private name of one of them is not for the others).
PROJECT = ("flower_app", "client_app", "server_app", "strategies", "sim")
MAX_FUNCTION_LINES = 60


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


def project_sources() -> list[Path]:
    """Every .py file of the project outside tests/ (and outside .venv and other hidden dirs)."""
    found = []
    for top in sorted(ROOT.iterdir()):
        if top.name in {"tests", "build", "dist", "results"} or top.name.startswith("."):
            continue
        if top.is_dir():
            found += sorted(top.rglob("*.py"))
        elif top.suffix == ".py":
            found.append(top)
    return found


def test_no_function_outside_tests_is_longer_than_60_lines():
    """From the `def` line to the end of the body, decorators excluded."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for path in project_sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_the_wire_keys_import_only_the_standard_library():
    found = {m.split(".")[0] for m in imports(ROOT / "flower_app" / "wire.py")} - {"__future__"}
    assert found <= sys.stdlib_module_names, found - sys.stdlib_module_names


def test_importing_strategies_loads_neither_torch_nor_opacus():
    """Strategies read replies through the wire keys; only computing a bound needs Opacus."""
    code = (
        "import sys, strategies, strategies.base, strategies.fedavg, strategies.gossip; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opacus'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"importing strategies loaded {out.stdout.strip()}"


def test_no_module_imports_a_private_name_of_another_project_module():
    wrong = [
        f"{path.relative_to(ROOT)} imports {node.module}.{alias.name}"
        for path in project_sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not wrong, wrong


def test_no_class_calls_a_private_method_the_project_does_not_define():
    """`self._x` is the project's own: a subclass never leans on its base's private API
    (flwr's `FedAvg._construct_messages` can change in any release). The one exception
    replaces a flwr method and applies only to the flwr version and source it was checked
    against (its sha256), so a release that changes it gets Flower's own back."""
    defined, used = set(), []
    for path in project_sources():
        if path.relative_to(ROOT).as_posix() == "server_app/sim_runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                if isinstance(node.ctx, ast.Store):
                    defined.add(node.attr)
                else:
                    used.append((node.attr, f"{path.relative_to(ROOT)}:{node.lineno}"))
    wrong = [f"{where} self.{name}" for name, where in used if name not in defined]
    assert not wrong, wrong
