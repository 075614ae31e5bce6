"""The wheel works outside a clone: the packaged studies ship with it; and the docs' list of modules is
kbench's."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"  # a copy: building in the clone would leave build/ there
    shutil.copytree(os.path.join(REPO, "kbench"), source / "kbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(folder),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = [folder / name for name in os.listdir(folder) if name.endswith(".whl")]
    return path


def test_wheel_ships_the_studies_and_runs_them_from_another_folder(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"kbench/studies/{name}.toml" for name in ("demo", "seed", "modern")} <= set(names)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys; from kbench.study.config import load_config; "
        "c = load_config('demo', data=sys.argv[1], test_data='', answers=''); "
        "import kbench; print(kbench.__file__); print(c.name, [m.name for m in c.backbones])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(elsewhere)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    location, study = done.stdout.strip().splitlines()
    assert location.startswith(str(site))  # the installed copy, not the clone
    assert study.startswith("demo ['small_cnn'")


def test_the_code_layout_in_the_docs_names_every_module_once():
    """docs/development.md lists kbench's stage packages and their modules one a line: a module added,
    renamed, moved or removed without its line fails here, so the list can't go stale."""
    text = open(os.path.join(REPO, "docs", "development.md"), encoding="utf-8").read()
    block = text[text.index("```\nkbench/\n") :]
    block = block[: block.index("```", 3)]
    listed, package = [], ""
    for line in block.splitlines():
        found = re.match(r"^  (\w+)/ ", line)
        if found:
            package = found.group(1)
        found = re.match(r"^  (\w+)\.py ", line)
        if found and found.group(1) != "__init__":
            listed.append(f"./{found.group(1)}")
        found = re.match(r"^    (\w+)\.py ", line)
        if found:
            listed.append(f"{package}/{found.group(1)}")
    modules = []
    for folder, _, names in os.walk(os.path.join(REPO, "kbench")):
        package = os.path.relpath(folder, os.path.join(REPO, "kbench"))
        modules += [f"{package}/{name[:-3]}" for name in names if name.endswith(".py") and name != "__init__.py"]
    top = sorted(m for m in modules if m.startswith("./") and m != "./__main__")
    assert top == [], "a module at the top of kbench/ outside the stage packages"
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert sorted(listed) == sorted(m for m in modules if m != "./__main__")
    for package in {m.split("/")[0] for m in listed if not m.startswith("./")}:
        docstring = open(os.path.join(REPO, "kbench", package, "__init__.py"), encoding="utf-8").read()
        assert docstring.startswith('"""') and len(docstring) > 100, f"kbench/{package} says nothing of its stage"


MAX_FUNCTION_LINES = 80  # docs/development.md: a longer function holds two ideas; split it along them


def test_no_function_in_kbench_is_longer_than_80_lines():
    import ast

    long = []
    for folder, _, names in os.walk(os.path.join(REPO, "kbench")):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "functions over 80 lines: " + "; ".join(long)
