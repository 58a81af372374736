"""The package and tests are ruff-clean (configured in pyproject.toml), so CI lints with the README's test command."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    done = subprocess.run([ruff, "check", "attnreuse", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


ENGINE = ["__init__.py", "schedule.py", "plan.py", "reuse.py", "state.py", "cache.py", "units.py", "wrappers.py",
          "utils.py", "attention"]
TOOLS = {"analysis", "bench", "cli", "default_model", "eval", "planner", "search", "testing"}


def _modules(paths):
    for path in paths:
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def _imported(tree) -> set[str]:
    """The attnreuse subpackages or modules a module imports, relative or absolute."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] == "attnreuse":
                parts = parts[1:]
            elif node.level == 0:
                continue
            names.update([parts[0]] if parts[0] else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("attnreuse."))
    return names


def test_the_engine_imports_no_tool():
    package = ROOT / "attnreuse"
    for module in _modules(package / name for name in ENGINE):
        tools = _imported(ast.parse(module.read_text())) & TOOLS
        assert not tools, f"{module.relative_to(ROOT)} imports the tool(s) {sorted(tools)}"


def test_functions_and_classes_stay_short():
    for module in (ROOT / "attnreuse").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            limit = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 150}.get(type(node))
            if limit:
                length = node.end_lineno - node.lineno + 1
                assert length <= limit, f"{module.relative_to(ROOT)}: {node.name} is {length} lines"
