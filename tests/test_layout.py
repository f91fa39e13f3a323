"""The code's layout as rules a change can break: the study layer's floors (README, Layout), each module importing only
modules of floors below its own (so no import circles) and at its top but for matplotlib; and every third-party module
the code imports declared in pyproject.toml, so that ``pip install .`` runs it.

The sources are parsed when this module is collected: CPython 3.11's ``ast.parse`` can raise "AST constructor recursion
depth mismatch" (python/cpython#106905) when called after other tests have run in the same process."""

import ast
import importlib.metadata
import re
import sys
import tomllib

from .conftest import REPO

STUDY = REPO / "study"
FLOORS = {
    "spec": 0,  # the study file: what every other module plans, checks or names by
    "passes": 1, "statistics": 1, "plotting": 1,
    "runs": 2, "cka": 2, "barriers": 2, "criticality": 2,
    "plan": 3, "finetuning": 3,
    "launch": 4, "analyse": 4, "report": 4,
    "__main__": 5,
}
LOCAL_IMPORTS_ALLOWED = {("plotting", "matplotlib"), ("plotting", "matplotlib.pyplot")}
FIRST_PARTY = {"lightning_modules", "datamodules", "measurements", "callbacks", "study", "cli", "compat"}

STUDY_MODULES = {path.stem for path in STUDY.glob("*.py")} - {"__init__"}
TREES = {module: ast.parse((STUDY / f"{module}.py").read_text()) for module in STUDY_MODULES}
PACKAGE_TREES = [ast.parse(path.read_text()) for path in
                 [REPO / "cli.py", REPO / "compat.py", *(p for package in FIRST_PARTY for p in (REPO / package).glob("**/*.py"))]]
UPWARD = ast.parse("from .report import write_report\nfrom . import analyse\nfrom study.plan import stages\n")


def study_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(module of the study package, line) of every import of one from ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module.split(".")[0], node.lineno))
            else:
                found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("study"):
            found.append((node.module.split(".")[1] if "." in node.module else node.module, node.lineno))
    return found


def test_every_module_of_the_study_layer_has_a_floor():
    assert STUDY_MODULES == set(FLOORS), f"modules without a floor: {STUDY_MODULES - set(FLOORS)}; floors without a " \
                                         f"module: {set(FLOORS) - STUDY_MODULES}"


def test_each_module_imports_only_modules_of_lower_floors():
    wrong = [f"study/{module}.py:{line} (floor {FLOORS[module]}) imports {imported} (floor {FLOORS.get(imported)})"
             for module, tree in TREES.items() for imported, line in study_imports(tree)
             if FLOORS.get(imported, 99) >= FLOORS[module]]
    assert not wrong, "\n".join(wrong)


def test_the_floor_check_sees_an_upward_import():
    assert study_imports(UPWARD) == [("report", 1), ("analyse", 2), ("plan", 3)]


def test_imports_are_at_the_top_of_each_module_but_matplotlib():
    local = []
    for module, tree in TREES.items():
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    local += [f"study/{module}.py:{node.lineno} imports {n} in {function.name}" for n in names
                              if (module, n) not in LOCAL_IMPORTS_ALLOWED]
    assert not local, "\n".join(local)


def test_every_package_the_code_imports_is_a_declared_dependency():
    """What ``pip install .`` installs is what the code imports: each third-party module imported anywhere in the
    package (at the top or in a function) belongs to a distribution pyproject.toml's dependencies name."""
    declared = {re.split(r"[<>=!\[ ]", d)[0].lower().replace("_", "-")
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    imported = set()
    for tree in PACKAGE_TREES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - FIRST_PARTY - set(sys.stdlib_module_names)
    distributions = importlib.metadata.packages_distributions()
    undeclared = {m: distributions.get(m) for m in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml's dependencies: {undeclared}"
