"""The packages' order is a contract (pyproject.toml, [tool.importlinter]): an import that runs
back up fails the suite, and no module imports the package's top (`fpcm_jax/__init__.py`, which
leads up to the entry points). Checked with import-linter, on the tree and on a copy of it with
one upward import added."""

import os
import shutil
import subprocess
import sys

import grimp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(tree: str):
    """import-linter on the copy of fpcm_jax under `tree` with the project's contract."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = tree
    return subprocess.run([sys.executable, "-c", LINT, os.path.join(tree, "pyproject.toml"),
                           "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(os.path.join(ROOT, "fpcm_jax"), tmp_path / "fpcm_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    return tmp_path


def test_the_packages_import_only_downwards(tree):
    result = lint_imports(str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("fpcm_jax/data/datasets.py", "from fpcm_jax.training import losses"),
    ("fpcm_jax/runs/run_dir.py", "    from fpcm_jax.evaluation import accuracy"),  # in a function
    ("fpcm_jax/parallel.py", "from fpcm_jax import layers"),
    ("fpcm_jax/models/resnet.py", "from fpcm_jax.attacks import pgd"),  # siblings stay apart
])
def test_an_import_that_runs_back_up_fails(tree, module, upward):
    path = tree / module
    source = path.read_text()
    if upward.startswith(" "):  # inside a function
        source += f"\n\ndef _upward():\n{upward}\n"
    else:
        source = source.replace("\nimport ", f"\n{upward}\nimport ", 1)
    assert upward in source
    path.write_text(source)
    result = lint_imports(str(tree))
    assert result.returncode == 1, result.stdout
    assert "0 kept, 1 broken" in result.stdout


def test_nothing_imports_the_package_top():
    graph = grimp.build_graph("fpcm_jax", cache_dir=None)
    importers = graph.find_modules_that_directly_import("fpcm_jax")
    assert importers == set(), f"{importers} import fpcm_jax/__init__.py: import from a leaf"


def test_each_package_docstring_names_its_modules():
    """Each package's docstring says its job and names each of its modules (a moved or new
    module must be written into it)."""
    for package in ("data", "runs", "evaluation", "training", "reports"):
        folder = os.path.join(ROOT, "fpcm_jax", package)
        doc = open(os.path.join(folder, "__init__.py")).read()
        assert doc.startswith('"""') and "May import" in doc, package
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and name != "__init__.py":
                assert f"`{name[:-3]}`" in doc, f"fpcm_jax/{package}/__init__.py omits {name}"
