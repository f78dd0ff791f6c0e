"""The device agent and the protocol package run on Python 3.9 with only the agent's own dependencies.

The static checks read the source with ast. The runtime checks build a
Python 3.9 virtualenv with the agent's dependencies from pyproject.toml. In
it they import every agent module and run tests/agent. They are skipped when
no Python 3.9 interpreter is installed.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there.
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_PACKAGES = ["microupdates.device_agent", "microupdates.protocol"]
AGENT_FILES = sorted(
    path
    for package in AGENT_PACKAGES
    for path in (REPO_ROOT / package.replace(".", "/")).rglob("*.py")
    if "__pycache__" not in path.parts
)

FORBIDDEN_IMPORTS = {"temporalio", "fastapi", "sqlalchemy", "uvicorn", "starlette"}
# Third-party packages the agent may import: its declared dependencies pydantic, httpx, PyYAML and cryptography.
ALLOWED_THIRD_PARTY = {"pydantic", "pydantic_core", "httpx", "yaml", "cryptography"}

PYTHON39_GLOB = "/root/.pyenv/versions/3.9*/bin/python3.9"
VENV_TIMEOUT_SECONDS = 60
PIP_INSTALL_TIMEOUT_SECONDS = 180
# tests/agent took 52-60 s on the 2-core development machine; the bound leaves room for a slower one.
AGENT_SUITE_TIMEOUT_SECONDS = 600


def format_path(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def to_module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_imported_modules(path: Path, tree: ast.Module) -> Iterator[str]:
    """Yield the absolute name of every module an import statement of the file names, relative ones resolved.

    For `from package import name`, both `package` and `package.name` are
    yielded, because `name` may be a submodule.
    """

    package_parts = to_module_name(path).split(".")
    if path.name != "__init__.py":
        package_parts.pop()

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            for alias in node.names:
                yield f"{module}.{alias.name}"


def is_allowed_import(module: str) -> bool:
    top_level = module.split(".")[0]
    if top_level == "microupdates":
        if module == "microupdates":
            return True
        for package in AGENT_PACKAGES:
            if module == package or module.startswith(package + "."):
                return True
        # `from microupdates import __version__` names an attribute of the top-level package, not a module.
        name = module.split(".")[1]
        package_directory = REPO_ROOT / "microupdates"
        return not (package_directory / name).exists() and not (package_directory / f"{name}.py").exists()
    return top_level in sys.stdlib_module_names or top_level in ALLOWED_THIRD_PARTY


def iter_annotations(tree: ast.Module) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for argument in arguments.posonlyargs + arguments.args + arguments.kwonlyargs:
                if argument.annotation is not None:
                    yield argument.annotation
            for argument in (arguments.vararg, arguments.kwarg):
                if argument is not None and argument.annotation is not None:
                    yield argument.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def uses_union_operator(annotation: ast.expr) -> bool:
    return any(isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) for node in ast.walk(annotation))


def has_future_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=format_path(path), feature_version=(3, 9))


def test_agent_files_found():
    assert len(AGENT_FILES) > 10, [format_path(path) for path in AGENT_FILES]


@pytest.mark.parametrize("path", AGENT_FILES, ids=format_path)
def test_module_parses_as_python39(path: Path):
    parse(path)


@pytest.mark.parametrize("path", AGENT_FILES, ids=format_path)
def test_union_annotations_have_future_import(path: Path):
    tree = parse(path)
    annotations = iter_annotations(tree)
    union_lines = sorted({annotation.lineno for annotation in annotations if uses_union_operator(annotation)})

    assert not union_lines or has_future_annotations(tree), (
        f"{format_path(path)} uses X | Y in annotations (lines {union_lines}), which Python 3.9 evaluates "
        "only with `from __future__ import annotations`"
    )


@pytest.mark.parametrize("path", AGENT_FILES, ids=format_path)
def test_module_imports_no_server_code(path: Path):
    modules = set(iter_imported_modules(path, parse(path)))

    forbidden = sorted(module for module in modules if module.split(".")[0] in FORBIDDEN_IMPORTS)
    assert not forbidden, f"{format_path(path)} imports server packages: {forbidden}"
    outside = sorted(module for module in modules if not is_allowed_import(module))
    assert not outside, (
        f"{format_path(path)} imports modules the agent cannot have on a device: {outside}; "
        f"allowed are the standard library, {sorted(ALLOWED_THIRD_PARTY)}, {AGENT_PACKAGES} and `microupdates` itself"
    )


def find_python39() -> Optional[str]:
    candidates = sorted(glob.glob(PYTHON39_GLOB))
    if candidates:
        return candidates[-1]
    return shutil.which("python3.9")


def read_agent_requirements() -> List[str]:
    """Return the agent's dependencies (those without a version marker) and the pytest packages tests/agent needs.

    pyproject.toml's pytest options (asyncio_mode, timeout) need pytest-asyncio
    and pytest-timeout: without them pytest warns about unknown options, and
    the project's filterwarnings = error turns that into a failure. Installing
    them keeps the project's own pytest configuration in force.
    """

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [requirement for requirement in project["dependencies"] if ";" not in requirement]
    tests = [requirement for requirement in project["optional-dependencies"]["test"]
             if re.match(r"pytest\b", requirement)]
    return runtime + tests


def run(command: List[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def tail_output(result: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


@pytest.fixture(scope="module")
def python39(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Return the python of a new Python 3.9 virtualenv that holds only the agent's and the tests' packages."""

    interpreter = find_python39()
    if interpreter is None:
        pytest.skip(f"no Python 3.9 interpreter: none matches {PYTHON39_GLOB} and python3.9 is not on PATH")

    venv = tmp_path_factory.mktemp("python39-venv")
    created = run([interpreter, "-m", "venv", str(venv)], VENV_TIMEOUT_SECONDS)
    assert created.returncode == 0, tail_output(created)
    python = str(venv / "bin" / "python")

    requirements = read_agent_requirements()
    installed = run([python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *requirements],
                    PIP_INSTALL_TIMEOUT_SECONDS)
    assert installed.returncode == 0, f"pip install {requirements} failed:\n{tail_output(installed)}"
    return python


def build_checkout_environment() -> dict:
    """Return an environment that imports microupdates from this checkout and writes no bytecode into it."""

    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONDONTWRITEBYTECODE="1")
    environment.pop("PYTEST_ADDOPTS", None)
    return environment


@pytest.mark.package_registry
def test_agent_modules_import_on_python39(python39: str):
    script = (
        "import importlib, pkgutil\n"
        f"for package_name in {AGENT_PACKAGES!r}:\n"
        "    package = importlib.import_module(package_name)\n"
        "    for module in pkgutil.walk_packages(package.__path__, package_name + '.'):\n"
        "        importlib.import_module(module.name)\n"
        "print('imported')\n"
    )
    result = run([python39, "-c", script], 120, cwd=REPO_ROOT, env=build_checkout_environment())

    assert result.returncode == 0, tail_output(result)


@pytest.mark.package_registry
def test_agent_suite_passes_on_python39(python39: str, tmp_path: Path):
    # --confcutdir keeps pytest from loading tests/conftest.py, whose fixtures
    # start the server stack and import server packages that this virtualenv
    # lacks on purpose. tests/agent needs none of them.
    command = [
        python39, "-m", "pytest", "tests/agent", "-q", "-x", "-p", "no:cacheprovider",
        "--confcutdir", "tests/agent", "--basetemp", str(tmp_path / "basetemp"),
    ]
    result = run(command, AGENT_SUITE_TIMEOUT_SECONDS, cwd=REPO_ROOT, env=build_checkout_environment())

    assert result.returncode == 0, tail_output(result)
    assert re.search(r"\d+ passed", result.stdout), tail_output(result)
