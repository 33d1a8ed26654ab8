"""Shared fixtures: composed configs, the real CLI in a subprocess, a tiny trained run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from cifar_cam.io import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
# Tiny and fast: width-8 ResNet18 on 96+32 synthetic images.
TINY = ["data=synthetic", "data.train_size=128", "data.val_size=32", "data.test_size=64", "data.batch_size=32",
        "model.width=8", "trainer.epochs=2", "eval.batch_size=64"]


def selects_cuda_tests(markexpr: str) -> bool:
    """Whether `pytest -m EXPR` asks for the CUDA tests (`-m cuda`, `-m "cuda or slow"`, not `-m "not cuda"`)."""
    return re.search(r"(?<!not )\bcuda\b", markexpr or "") is not None


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs on the CPU, GPU or not: `trainer.device=auto` would pick CUDA, whose autotuned kernels make a
    resumed run differ from an uninterrupted one. `pytest -m cuda` runs the tests marked for CUDA, on the GPU."""
    if not selects_cuda_tests(config.getoption("markexpr")):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first touched; subprocesses inherit it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip without a visible GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test in its own cwd and cache dir; Hydra state cleared."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR_CAM_CACHE", str(tmp_path / ".cache"))
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def compose_cfg(command: str, overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The config `cifar-cam <command> <overrides>` would run with; HydraConfig set so tasks can run in-process."""
    from cifar_cam.cli.commands import COMMANDS

    name = COMMANDS[command][0] if command in COMMANDS else command.replace("-", "_")
    overrides = list(overrides or [])
    if run_dir is not None:
        overrides.append(f"hydra.run.dir={run_dir}")
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # as Hydra does before a task starts
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=command):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    # tasks read hydra.runtime.output_dir, which only a real run fills in
    with read_write(cfg.hydra):  # set_config made it read-only
        cfg.hydra.runtime.output_dir = str(run_dir) if run_dir else str(Path.cwd())
    HydraConfig.instance().set_config(cfg)
    task_cfg = cfg.copy()  # a real run hands the task its config without the hydra node
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def cam_test_model() -> Any:
    """A width-8 ResNet18 in eval mode whose blocks are not identities (the init zeroes each block's last
    BatchNorm): the CAM tests' model, compared with pytorch-grad-cam."""
    import torch

    from cifar_cam.models import build_model

    torch.manual_seed(0)
    m = build_model("resnet18", num_classes=10, width=8)
    for module in m.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return m.eval()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Runs the real `cifar-cam` CLI (python -m cifar_cam) and captures its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cifar_cam", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def only_run_dir(root: Path) -> Path:
    """The single run dir under outputs/<command>/ (fails if there are several)."""
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic training run through the real CLI, shared by tests that need a checkpoint."""
    cwd = tmp_path_factory.mktemp("trained")
    env = {"CIFAR_CAM_CACHE": str(cwd / ".cache")}
    result = run_cli("train", *TINY, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    run = only_run_dir(cwd / "outputs" / "train")
    assert json.loads((run / "summary.json").read_text())["test_acc"] > 0
    return run


# -- the shared HTTP server (tests/test_serve.py, tests/test_browser.py) ----------------------------------
MAX_UPLOAD_MB = 1
MAX_PIXELS = 1_000_000
MAX_BATCH_IMAGES = 8


@dataclass
class Served:
    url: str
    predictor: Any
    settings: Any
    app: Any
    calls: list[int]           # images per backend.run call (each forward pass)
    client: Any


@pytest.fixture(scope="session")
def served(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The one server of the test run (test_serve, test_browser): the tiny run's model on a loopback port."""
    import httpx

    from cifar_cam.inference.predictor import Predictor
    from cifar_cam.serve.app import create_app
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings

    predictor = Predictor.load(trained_run, batch_size=64)
    calls: list[int] = []
    run = predictor.backend.run

    def counted(images: Any) -> Any:
        calls.append(len(images))
        return run(images)

    predictor.backend.run = counted  # type: ignore[method-assign]
    settings = Settings(max_upload_mb=MAX_UPLOAD_MB, max_pixels=MAX_PIXELS, max_batch_images=MAX_BATCH_IMAGES,
                        max_wait_ms=20, max_batch=32, topk=3,
                        access_log=str(tmp_path_factory.mktemp("served") / "access.jsonl"))
    app = create_app(predictor, settings)
    with running(app) as (url, _server), httpx.Client(base_url=url, timeout=30) as client:
        yield Served(url, predictor, settings, app, calls, client)
