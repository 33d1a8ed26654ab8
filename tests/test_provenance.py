"""provenance.json: what produced a run dir; a resume appends; report shows the commit."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import torch  # noqa: F401  (imported, as in a task: the hardware record then names torch's devices)

from cifar_cam.provenance import record, short_commit
from conftest import REPO


def test_record_appends_versions_git_and_hardware(tmp_path: Path) -> None:
    record(tmp_path, "train", ["train", "seed=1"])
    record(tmp_path, "train", ["train", "ckpt=x"])
    entries = json.loads((tmp_path / "provenance.json").read_text())["entries"]
    assert [e["argv"][-1] for e in entries] == ["seed=1", "ckpt=x"]
    first = entries[0]
    assert set(first["versions"]) == {"cifar-cam", "torch", "torchvision", "albumentations", "hydra-core", "numpy"}
    assert all(isinstance(v, str) for v in first["versions"].values())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert first["git"]["commit"] == head.strip() and isinstance(first["git"]["dirty"], bool)
    assert first["hardware"]["cores"] >= 1 and first["hardware"]["cpu"]
    assert first["hardware"]["torch_cpu_capability"]  # torch is imported here, as in a task


def test_a_cli_run_has_provenance_and_report_shows_its_commit(trained_run: Path, tmp_path: Path) -> None:
    from cifar_cam.tasks.report import report

    entries = json.loads((trained_run / "provenance.json").read_text())["entries"]
    assert len(entries) == 1 and entries[0]["command"] == "train" and entries[0]["hardware"]["gpus"] == []
    out = report([trained_run], out=tmp_path / "report")
    with (out / "report.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["commit"] == short_commit(trained_run) != ""
    assert row["commit"].split("-")[0] == entries[0]["git"]["commit"][:10]
