"""A plain (non-editable) wheel carries every module, the configs and the page, so `cifar-cam` works from any
directory. An editable install would hide a package left out of pyproject's list: this builds the real wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src" / "cifar_cam"


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The file names in a wheel built from a copy of the checkout (the build writes nothing into the repo);
    no build isolation: setuptools comes from this environment, nothing is downloaded."""
    tree = tmp_path_factory.mktemp("build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tree / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(tree), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(zipfile.ZipFile(next(out.glob("cifar_cam-*.whl"))).namelist())


def test_the_wheel_holds_every_module_of_every_package(wheel_files: set[str]) -> None:
    modules = {f"cifar_cam/{p.relative_to(SRC)}" for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    assert len(modules) > 50 and "cifar_cam/training/budget/planner.py" in modules
    missing = sorted(modules - wheel_files)
    assert not missing, f"left out of the wheel (add the package to pyproject's list): {missing}"


def test_the_wheel_holds_the_configs_and_the_page(wheel_files: set[str]) -> None:
    configs = {f"cifar_cam/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    page = {f"cifar_cam/serve/static/{p.name}" for p in (SRC / "serve" / "static").iterdir()}
    assert configs and page and "cifar_cam/serve/static/index.html" in page
    assert not (configs | page) - wheel_files, sorted((configs | page) - wheel_files)


def test_config_dir_holds_the_main_configs() -> None:
    from cifar_cam.cli.commands import COMMANDS
    from cifar_cam.io import config_dir

    for name, _, _ in COMMANDS.values():
        assert (Path(config_dir()) / f"{name}.yaml").is_file(), name


def test_every_script_with_a_shebang_is_executable_in_git() -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-s", "scripts", ".ci"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    not_executable = [line.split("\t")[1] for line in listed
                      if (REPO / line.split("\t")[1]).read_bytes()[:2] == b"#!" and not line.startswith("100755")]
    assert listed and not not_executable, f"chmod +x and `git update-index --chmod=+x`: {not_executable}"
