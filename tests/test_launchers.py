"""Sweep plugins: the slurm preset composes into a real sbatch script; joblib, submitit-local and Optuna sweeps run."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cifar_cam.cli.main import failed_jobs_in_logs
from cifar_cam.io import config_dir
from cifar_cam.tasks.common import resolve_num_threads
from conftest import TINY, run_cli

CORES = len(os.sched_getaffinity(0))


def compose_hydra(overrides: list[str]) -> OmegaConf:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_preset_composes_into_an_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                         "hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=90",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 90)
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.nodes) == (8, 32, 1)  # the preset's defaults

    # Render the sbatch file the way the Hydra launcher configures submitit (a stand-in srun passes its check).
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    HydraConfig.instance().set_config(cfg)
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m cifar_cam train", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --time=90", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --job-name=train"):
        assert line in sbatch.splitlines(), f"{line!r} not in:\n{sbatch}"


def test_optuna_preset_searches_lr_weight_decay_and_aug() -> None:
    cfg = compose_hydra(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_trials == 8
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert dict(sweeper.params) == {"optimizer.lr": "tag(log, interval(0.01, 0.3))",
                                    "optimizer.weight_decay": "tag(log, interval(1.0e-5, 1.0e-3))",
                                    "aug": "choice(seed, crop_flip, none)"}


@pytest.mark.parametrize(("n_jobs", "expected"), [(2, max(1, CORES // 2)), (-1, 1), (1, None)])
def test_auto_threads_split_the_cores_among_joblib_jobs(n_jobs: int, expected: int | None) -> None:
    cfg = compose_hydra(["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"])
    HydraConfig.instance().set_config(cfg)
    assert resolve_num_threads("auto") == expected
    assert resolve_num_threads(3) == 3


def test_auto_threads_split_the_cores_among_torchrun_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    HydraConfig.instance().set_config(compose_hydra([]))
    assert resolve_num_threads("auto") is None  # alone: torch's default
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # as torchrun sets them: 2 nodes of 2 ranks
    assert resolve_num_threads("auto") == max(1, CORES // 2)


def test_bad_num_threads_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("train", *TINY, "trainer.num_threads=0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cifar-cam train: error: trainer.num_threads must be 'auto' or an integer >= 1, "
                                     "got 0")


def test_failed_jobs_of_out_of_process_launchers_are_found_in_their_logs(tmp_path: Path) -> None:
    for job, text in (("0", "[10:00:01][INFO] wrote x\n"),
                      ("1", "[10:00:01][ERROR] loss became NaN\n[10:00:01][WARNING] job #1 failed: loss became NaN\n")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "train.log").write_text(text)
    assert failed_jobs_in_logs(tmp_path, "train") == [(1, str(tmp_path / "1"), "loss became NaN", 1)]


# ----------------------------------------------------------------------------- real sweeps (slow)


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_with_split_threads(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert set(summaries(sweep)) == {"0", "1"}
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        assert f"torch threads: {max(1, CORES // 2)} (trainer.num_threads=auto)" in log
    # The same seed gives the same result as the sequential launcher (each job is its own process).
    single = run_cli("train", "seed=2", *TINY, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert summaries(sweep)["1"]["best_val_acc"] == json.loads((tmp_path / "single" / "summary.json").read_text())[
        "best_val_acc"]


@pytest.mark.slow
def test_submitit_local_sweep_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=1,2",
                     *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(summaries(sweep)) == {"0", "1"}
    assert any((sweep / ".submitit").iterdir())  # submitit's own job folders, logs and pickles


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_ddp(tmp_path: Path) -> None:
    """hydra.launcher.tasks_per_node=2: the job's two tasks become DDP ranks (as on SLURM), rank 0 writes."""
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                     "hydra.launcher.timeout_min=10", "seed=1", *TINY, "data.batch_size=16", "optimizer=adam",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summaries(sweep)["0"]
    assert summary["world_size"] == 2
    payload = torch.load(sweep / "0" / "checkpoints" / "last.pt", weights_only=True)
    # 96 training images: 48 a rank, 3 steps of 16 an epoch, 2 epochs
    assert {int(s["step"]) for s in payload["optimizer"]["state"].values()} == {6}
    log = (sweep / "0" / "train.log").read_text()
    assert log.count("epoch 2/2") == 1 and f"torch threads: {max(1, CORES // 2)}" in log


@pytest.mark.slow
def test_optuna_sweep_maximizes_val_acc_and_reports(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = summaries(sweep)
    assert set(found) == {"0", "1", "2"}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(s["best_val_acc"] for s in found.values())
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "aug"}
    for job in found:  # each trial's suggestion is in its own overrides, within the search space
        listed = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        overrides = dict(o.split("=", 1) for o in listed)
        assert 0.01 <= float(overrides["optimizer.lr"]) <= 0.3
        assert 1e-5 <= float(overrides["optimizer.weight_decay"]) <= 1e-3
        assert overrides["aug"] in ("seed", "crop_flip", "none")

    reported = run_cli("report", str(sweep), cwd=tmp_path, env={"COLUMNS": "200"})
    assert reported.returncode == 0, reported.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert "optuna best in" in reported.stdout
