"""`cifar-cam report`: a real 2 configs x 2 seeds sweep with one job failing, and hand-made run dirs."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cifar_cam.errors import ConfigError
from cifar_cam.tasks.report import find_jobs, mean_std, report, why_unfinished
from conftest import TINY, run_cli


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """4 jobs (optimizer.lr 0.05 / 0.1 x seed 1 / 2); job 3 fails: a file sits where its checkpoints/ goes."""
    cwd = tmp_path_factory.mktemp("sweep")
    sweep_dir = cwd / "multirun" / "lr-sweep"
    (sweep_dir / "3").mkdir(parents=True)
    (sweep_dir / "3" / "checkpoints").write_text("in the way")
    env = {"CIFAR_CAM_CACHE": str(cwd / ".cache")}
    result = run_cli("train", "-m", "optimizer.lr=0.05,0.1", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep_dir}",
                     cwd=cwd, env=env)
    assert result.returncode != 0, "a sweep with a failed job must not exit 0"
    assert (sweep_dir / "2" / "summary.json").is_file(), result.stderr[-2000:]
    reported = run_cli("report", str(sweep_dir), cwd=cwd, env={**env, "COLUMNS": "200"})
    assert reported.returncode == 0, reported.stderr
    return sweep_dir, reported.stdout


def test_report_csv_has_a_row_per_job(sweep: tuple[Path, str]) -> None:
    sweep_dir, _ = sweep
    rows = read_csv(sweep_dir / "report.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert [r["seed"] for r in rows] == ["1", "2", "1", "2"]
    assert [r["group"] for r in rows] == ["optimizer.lr=0.05"] * 2 + ["optimizer.lr=0.1"] * 2
    for row in rows[:3]:
        summary = json.loads((sweep_dir / row["job"] / "summary.json").read_text())
        assert float(row["best_val_acc"]) == pytest.approx(summary["best_val_acc"])
        assert float(row["test_acc"]) == pytest.approx(summary["test_acc"])
        assert int(row["epochs_run"]) == 2
    assert rows[3]["best_val_acc"] == "" and rows[3]["test_acc"] == ""


def test_report_groups_seeds_with_mean_and_sample_std(sweep: tuple[Path, str]) -> None:
    sweep_dir, stdout = sweep
    groups = {g["group"]: g for g in read_csv(sweep_dir / "report_groups.csv")}
    assert set(groups) == {"optimizer.lr=0.05", "optimizer.lr=0.1"}
    vals = [json.loads((sweep_dir / j / "summary.json").read_text())["best_val_acc"] for j in ("0", "1")]
    tests = [json.loads((sweep_dir / j / "summary.json").read_text())["test_acc"] for j in ("0", "1")]
    g = groups["optimizer.lr=0.05"]
    assert (g["n"], g["failed"], g["jobs"]) == ("2", "0", "0 1")
    assert float(g["val_acc_mean"]) == pytest.approx(statistics.mean(vals))
    assert float(g["val_acc_std"]) == pytest.approx(statistics.stdev(vals))
    assert float(g["test_acc_mean"]) == pytest.approx(statistics.mean(tests))
    assert float(g["test_acc_std"]) == pytest.approx(statistics.stdev(tests))
    # The failed job does not count: n=1, no std.
    g = groups["optimizer.lr=0.1"]
    assert (g["n"], g["failed"], g["val_acc_std"]) == ("1", "1", "")
    assert float(g["val_acc_mean"]) == pytest.approx(
        json.loads((sweep_dir / "2" / "summary.json").read_text())["best_val_acc"])
    # On screen: the same numbers in percent, mean ± std.
    assert f"{100 * statistics.mean(vals):.2f}% ± {100 * statistics.stdev(vals):.2f}" in stdout
    assert "1 (+1 failed)" in stdout


def test_report_lists_the_failed_job_and_why(sweep: tuple[Path, str]) -> None:
    sweep_dir, stdout = sweep
    failed = read_csv(sweep_dir / "report.csv")[3]
    assert failed["reason"].startswith("FileExistsError"), failed["reason"]
    assert "checkpoints" in failed["reason"]
    assert "1 of 4 jobs have no results" in stdout
    assert "FileExistsError" in stdout
    png = (sweep_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ----------------------------------------------------------------------------- hand-made run dirs (fast)


def fake_run(path: Path, overrides: list[str], seed: int, summary: dict | None, log: str = "") -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / ".hydra" / "config.yaml").write_text(f"command: train\nseed: {seed}\n")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "train.log").write_text(log)
    return path


def summary(val: float, test: float) -> dict:
    return {"best_val_acc": val, "test_acc": test, "test_loss": 1.0, "best_epoch": 3, "epochs_run": 3,
            "stopped_early": False, "train_seconds": 10.0, "images_per_second": 100.0}


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)


def test_report_of_several_run_dirs_goes_to_outputs_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "outputs" / "train"
    a = fake_run(runs / "a", ["aug=none"], 1, summary(0.80, 0.79))
    b = fake_run(runs / "b", ["aug=none", "seed=2"], 2, summary(0.84, 0.83))
    c = fake_run(runs / "c", ["aug=crop_flip"], 1, summary(0.90, 0.88))
    d = fake_run(runs / "d", ["aug=crop_flip", "seed=3"], 3, None,
                 "[10:00:00][INFO] run dir: d\n[10:00:05][INFO] epoch 1/50  train loss 2.1\n")
    out = report([a, b, c, d])
    assert out.parent == Path("outputs") / "report"
    groups = read_csv(out / "report_groups.csv")
    assert [(g["group"], g["n"], g["failed"]) for g in groups] == [("aug=crop_flip", "1", "1"), ("aug=none", "2", "0")]
    assert float(groups[1]["val_acc_mean"]) == pytest.approx(0.82)
    assert float(groups[1]["val_acc_std"]) == pytest.approx(statistics.stdev([0.80, 0.84]))
    rows = read_csv(out / "report.csv")
    assert rows[3]["status"] == "unfinished" and "epoch 1/50" in rows[3]["reason"]
    assert f"wrote {out / 'report.csv'}" in capsys.readouterr().out


@pytest.mark.parametrize("width", [80, 200])
def test_report_tables_fit_the_width_and_show_every_override_whole(tmp_path: Path, width: int) -> None:
    # piped stdout: rich gives the shared console (soft_wrap=True) 80 columns; configs used to end in "optimiz…"
    shared = ["trainer.epochs=30", "data.batch_size=256", "scheduler=onecycle", "trainer.precision=bf16-mixed"]
    first = ["optimizer.lr=0.05", "aug=none", "trainer.label_smoothing=0.1"]
    second = ["optimizer.lr=0.1", "aug=crop_flip", "trainer.label_smoothing=0.2"]
    runs = tmp_path / "runs"
    jobs = [fake_run(runs / "a", shared + first, 1, summary(0.80, 0.79)),
            fake_run(runs / "b", [*shared, *first, "seed=2"], 2, summary(0.84, 0.83)),
            fake_run(runs / "c", shared + second, 1, summary(0.90, 0.88)),
            fake_run(runs / "d", [*shared, *second, "seed=3"], 3, None,
                     "[10:00:00][ERROR] FileExistsError: [Errno 17] File exists: 'multirun/x/3/checkpoints'\n")]
    screen = Console(width=width, file=io.StringIO(), soft_wrap=True, highlight=False)
    report(jobs, out=tmp_path / "report", screen=screen)
    text = screen.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in text
    assert all(len(line) <= width for line in text.splitlines() if not line.startswith("wrote "))
    words = text.split()
    for token in shared + first + second:  # each override whole on one line, wherever the lines break
        assert token in words, (token, text)
    for number in ("82.00%", "2.83", "90.00%", "88.00%", "-8.00", "+0.00", "10.0", "FileExistsError:"):
        assert number in words, (number, text)
    assert "1 of 4 jobs have no results" in text
    if width == 200:  # room for everything: one table, each config on one line beside its numbers
        assert "aug=none optimizer.lr=0.05 trainer.label_smoothing=0.1" in text
        assert "82.00% ± 2.83" in text and "1: 80.00% / 79.00%, 2: 84.00% / 83.00%" in text


def test_why_unfinished_reads_the_last_error(tmp_path: Path) -> None:
    job = fake_run(tmp_path / "j", [], 1, None, "[10:00:00][INFO] start\n[10:00:01][ERROR] loss became NaN at "
                   "epoch 2\nTraceback (most recent call last):\n  File x\n")
    assert why_unfinished(job) == ("failed", "loss became NaN at epoch 2")
    (job / "train.log").write_text("[10:00:00][INFO] start\n[10:00:05][WARNING] SIGINT received: stopping after "
                                   "this step (again to abort)\n[10:00:06][WARNING] SIGINT: stopped at epoch 1, "
                                   "step 3; saved x/last.pt; resume with: cifar-cam train ckpt=x\n")
    assert why_unfinished(job) == ("stopped", "SIGINT: stopped at epoch 1, step 3; saved x/last.pt; resume with: "
                                   "cifar-cam train ckpt=x")
    (job / "train.log").write_text("[10:00:00][INFO] start\n[10:00:01][INFO] epoch 1/5  train loss 2.1\n")
    assert why_unfinished(job) == ("unfinished", "killed or still running; last log line: epoch 1/5  train loss 2.1")
    (job / "train.log").unlink()
    assert why_unfinished(job)[0] == "unfinished"


def test_report_refuses_a_dir_without_runs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no runs"):
        find_jobs([tmp_path / "empty"])
    result = run_cli("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cifar-cam report: error: {tmp_path / 'missing'} is not a directory; "
        "pass sweep dirs (multirun/train/<time>) or run dirs"]


def test_jobs_a_stopped_sweep_never_started_are_listed(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "train" / "stopped"
    fake_run(sweep / "0", ["aug=none", "seed=1"], 1, summary(0.80, 0.79))
    fake_run(sweep / "1", ["aug=none", "seed=2"], 2, None, "[10:00:00][INFO] epoch 1/50  train loss 2.1\n")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "job": {"name": "train"}, "sweep": {"subdir": "${hydra.job.num}"},
        "overrides": {"task": ["aug=none,crop_flip", "seed=1,2"]}}}))
    out = report([sweep])
    assert out == sweep
    rows = read_csv(sweep / "report.csv")
    assert [(r["job"], r["status"], r["group"], r["seed"]) for r in rows] == [
        ("0", "done", "aug=none", "1"), ("1", "unfinished", "aug=none", "2"),
        ("2", "not started", "aug=crop_flip", "1"), ("3", "not started", "aug=crop_flip", "2")]
    groups = {g["group"]: (g["n"], g["failed"]) for g in read_csv(sweep / "report_groups.csv")}
    assert groups == {"aug=none": ("1", "1"), "aug=crop_flip": ("0", "2")}
