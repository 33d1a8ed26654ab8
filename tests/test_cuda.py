"""On a CUDA GPU only (`pytest -m cuda`; scripts/gpu_check.sh runs them): exact resume with trainer.deterministic,
the fp16 + GradScaler and bf16 paths, Muon's bf16 Newton-Schulz, one RNG state in the checkpoint.

The rest of the suite hides the GPUs (conftest.py), so these are the tests that see one. Through the real CLI, as
a user runs it; tiny synthetic data, a few seconds each once CUDA is up.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli

pytestmark = pytest.mark.cuda

ARGS = [a for a in TINY if not a.startswith(("trainer.epochs=", "data.train_size="))] + [
    "data.train_size=160", "trainer.device=cuda", "aug.backend=torch"]


def train(run: Path, *extra: str) -> dict:
    """`cifar-cam train` into `run` (or a resume when `extra` holds ckpt=); returns summary.json."""
    where = [] if any(a.startswith("ckpt=") for a in extra) else [*ARGS, f"hydra.run.dir={run}"]
    result = run_cli("train", *where, *extra, cwd=run.parent, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads((run / "summary.json").read_text())


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_on_cuda_is_exact_with_deterministic(tmp_path: Path) -> None:
    exact = ["trainer.deterministic=true"]  # cuDNN autotuning and TF32 off: the same kernels after a resume
    train(tmp_path / "whole", *exact, "trainer.epochs=3")
    train(tmp_path / "split", *exact, "trainer.epochs=2")
    s = train(tmp_path / "split", f"ckpt={tmp_path / 'split'}", "trainer.epochs=3")
    assert s["device"].startswith("cuda") and s["epochs_run"] == 3
    assert metrics(tmp_path / "split") == metrics(tmp_path / "whole")
    a, b = weights(tmp_path / "whole/checkpoints/last.pt"), weights(tmp_path / "split/checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_checkpoint_holds_the_training_gpus_rng_state_alone(tmp_path: Path) -> None:
    train(tmp_path / "run", "trainer.epochs=1")
    rng = torch.load(tmp_path / "run/checkpoints/last.pt", map_location="cpu", weights_only=True)["rng"]
    assert isinstance(rng["cuda"], torch.Tensor)  # one state, not a list per visible GPU


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_cuda(precision: str, tmp_path: Path) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU only emulates bf16")
    s = train(tmp_path / "run", f"trainer.precision={precision}", "trainer.epochs=2")
    assert s["precision"] == precision and s["test_loss"] == s["test_loss"]  # not NaN
    assert s["test_acc"] > 0.2  # synthetic classes separate within two epochs


def test_muon_trains_on_cuda_with_its_newton_schulz_in_bf16(tmp_path: Path) -> None:
    from cifar_cam.training.optim import ns_dtype, orthogonalize

    g = torch.randn(4, 64, 576, device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    assert ns_dtype(g.device) == expected
    fast, exact = orthogonalize(g, dtype=expected), orthogonalize(g, dtype=torch.float32)
    assert (fast - exact).abs().max() < 0.05  # the CPU test's tolerance (tests/test_optim.py)
    s = train(tmp_path / "run", "optimizer=muon", "trainer.epochs=2")
    assert s["test_acc"] > 0.2
