"""logger=: TensorBoard, MLflow and steps.csv, read back; each step once after a kill anywhere and a resume."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cifar_cam.config.merge import merge_with_checkpoint
from cifar_cam.config.validate import validate
from cifar_cam.errors import ConfigError
from cifar_cam.io import config_dir
from cifar_cam.training.tracker_backends import STEP_LOSS, local_mlflow_uri
from cifar_cam.training.trackers import Trackers

STEPS = 4  # optimizer steps per simulated epoch
TB = {"hparams": True, "images": True}


def mlflow_cfg(store: str) -> dict[str, Any]:
    return {"tracking_uri": None, "store": store, "experiment_name": "cifar-cam", "run_name": None, "artifacts": True}


def loss(step: int, session: int = 0) -> float:
    """The loss a simulated step reports; `session` tells a killed process's values from the resumed one's."""
    return 1.0 / step + 10 * session


def train(trackers: Trackers, epoch: int, steps: range | None = None, session: int = 0,
          end: bool = True) -> None:
    """One simulated epoch: the steps' losses, then (`end`) the epoch's metrics at its last step."""
    for step in steps or range((epoch - 1) * STEPS + 1, epoch * STEPS + 1):
        trackers.add_train_loss(step, epoch, loss(step, session))
    if end:
        trackers.add_epoch(epoch, epoch * STEPS, {"train_loss": 1.0 / epoch + 10 * session, "train_acc": 0.1 * epoch,
                                                  "val_loss": None, "lr": 0.1, "images_per_second": 100.0})


def tb_events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()  # applies the purge a resumed writer's START event asks for
    return acc


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = tb_events(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(run_dir: Path, store: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(local_mlflow_uri(run_dir, store))


def mlflow_scalars(run_dir: Path, store: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow_client(run_dir, store)
    (run,) = client.search_runs([client.get_experiment_by_name("cifar-cam").experiment_id])
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


def csv_steps(run_dir: Path) -> list[tuple[int, int, float]]:
    lines = (run_dir / "logs" / "steps.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,train_loss"
    return [(int(s), int(e), float(v)) for s, e, v in (line.split(",") for line in lines[1:])]


def steps_of(series: list[tuple[int, float]]) -> list[int]:
    return sorted(step for step, _ in series)


def assert_once(scalars: dict[str, list[tuple[int, float]]], epochs: int) -> None:
    """Every step's loss and every epoch's metrics, each exactly once."""
    assert steps_of(scalars[STEP_LOSS]) == list(range(1, epochs * STEPS + 1))
    for key in ("train_loss", "train_acc", "lr", "images_per_second", "epoch"):
        assert steps_of(scalars[key]) == [e * STEPS for e in range(1, epochs + 1)], key
    assert "val_loss" not in scalars  # None: skipped
    assert sorted(scalars["epoch"]) == [(e * STEPS, float(e)) for e in range(1, epochs + 1)]


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, made once (MLflow creates its tables in seconds): copied into run dirs."""
    from cifar_cam.training.tracker_backends import _import_mlflow, _quiet_mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    with _quiet_mlflow():
        _import_mlflow(file_store=False).MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach another machine fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a network call: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def run_dir_for(tmp_path: Path, store: str, mlflow_db: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if store == "sqlite":
        shutil.copyfile(mlflow_db, run_dir / "mlflow.db")
    return run_dir


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_a_resume_after_a_kill_writes_each_step_once(store: str, tmp_path: Path, mlflow_db: Path, no_network: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    run_dir = run_dir_for(tmp_path, store, mlflow_db)
    cfg = {"tensorboard": TB, "mlflow": mlflow_cfg(store), "csv": {}}
    first = Trackers.open(OmegaConf.create(cfg), run_dir, None, "run")
    assert first.names == ["tensorboard", "mlflow", "csv"] and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    train(first, 1)
    first.commit()  # after the epoch-1 checkpoint
    train(first, 2)
    at_epoch_2 = first.state()  # saved in the epoch-2 checkpoint
    first.commit()
    train(first, 3, range(9, 11), session=1, end=False)  # half of epoch 3, written (a commit between checkpoints)
    first.commit()
    del first  # kill -9: no close, no checkpoint after epoch 2

    second = Trackers.open(cfg, run_dir, at_epoch_2, "run")
    assert second.state()["mlflow"]["run_id"] == at_epoch_2["mlflow"]["run_id"]  # the same MLflow run
    for epoch in (3, 4):
        train(second, epoch)
        second.state()
        second.commit()
    second.close()

    tb, ml, rows = tb_scalars(run_dir), mlflow_scalars(run_dir, store), csv_steps(run_dir)
    assert_once(tb, 4)
    assert_once(ml, 4)
    assert [r[0] for r in rows] == list(range(1, 17)) and [r[1] for r in rows] == [e for e in range(1, 5)
                                                                                  for _ in range(STEPS)]
    # the resumed session's values replace the killed one's in TensorBoard and the csv; MLflow keeps the first
    # one written (an exact resume writes the same)
    assert dict(tb[STEP_LOSS])[9] == pytest.approx(loss(9)) and rows[8][2] == loss(9)  # TensorBoard: float32
    assert dict(ml[STEP_LOSS])[9] == loss(9, session=1) and dict(ml[STEP_LOSS])[11] == loss(11)
    client = mlflow_client(run_dir, store)
    assert client.get_run(at_epoch_2["mlflow"]["run_id"]).info.status == "FINISHED"
    if store == "sqlite":
        assert not (Path.cwd() / "mlartifacts").exists()  # the run dir's store keeps its artifacts beside it


@pytest.mark.parametrize("where", ["between the checkpoint and commit", "in the middle of commit"])
def test_a_kill_around_commit_loses_and_doubles_nothing(where: str, tmp_path: Path, mlflow_db: Path) -> None:
    run_dir = run_dir_for(tmp_path, "file", mlflow_db)
    cfg = {"tensorboard": TB, "mlflow": mlflow_cfg("file"), "csv": {}}
    first = Trackers.open(cfg, run_dir, None, "run")
    train(first, 1)
    first.commit()
    train(first, 2)
    at_epoch_2 = first.state()  # the epoch-2 checkpoint is written, then:
    if where == "in the middle of commit":  # each tracker got part of the epoch's records
        for backend in first._backends:
            backend.write(first._records[:3])
    del first

    second = Trackers.open(cfg, run_dir, at_epoch_2, "run")
    train(second, 3)
    second.commit()
    second.close()
    assert_once(tb_scalars(run_dir), 3)
    assert_once(mlflow_scalars(run_dir, "file"), 3)
    assert [r[0] for r in csv_steps(run_dir)] == list(range(1, 13))


def test_a_failed_write_is_retried_at_the_next_commit(tmp_path: Path, mlflow_db: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    run_dir = run_dir_for(tmp_path, "file", mlflow_db)
    trackers = Trackers.open({"mlflow": mlflow_cfg("file"), "csv": {}}, run_dir, None, "run")
    mlflow = trackers._backends[0]
    real = mlflow.client.log_batch

    def half_then_fail(run_id: str, metrics: list[Any] = (), **kwargs: Any) -> None:
        real(run_id, metrics=metrics[:2], **kwargs)  # the server took part, then went away
        raise ConnectionError("server away")

    mlflow.client.log_batch = half_then_fail
    train(trackers, 1)
    trackers.commit()
    assert "logger=mlflow: could not write 5 records" in caplog.text
    assert len(trackers.state()["records"]) == 5  # kept for MLflow (a checkpoint now saves them too)
    mlflow.client.log_batch = real
    train(trackers, 2)
    trackers.commit()
    assert trackers.state()["records"] == []
    trackers.close()
    assert_once(mlflow_scalars(run_dir, "file"), 2)
    assert [r[0] for r in csv_steps(run_dir)] == list(range(1, 9))


def test_a_record_after_its_step_was_committed_is_refused(tmp_path: Path) -> None:
    trackers = Trackers.open({"csv": {}}, tmp_path, None, "run")
    train(trackers, 1)
    trackers.commit()
    with pytest.raises(ValueError, match="add every record of a step before the commit"):
        trackers.add_epoch(1, STEPS, {"val_acc": 0.5})
    trackers.close()


@pytest.mark.parametrize("logger_cfg", [None, {}, OmegaConf.create({})])
def test_no_trackers_is_a_no_op_that_writes_nothing(logger_cfg: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = Trackers.open(logger_cfg, run_dir, {"step": 3, "records": []}, "run")
    train(trackers, 1)
    trackers.commit()
    png = tmp_path / "confusion_matrix.png"
    png.write_bytes(tiny_png())
    trackers.log_image("confusion_matrix", png, 4)
    trackers.log_params({"a": 1})
    trackers.log_final({"a": 1}, {"test_acc": 0.5})
    assert trackers.state() == {} and trackers.names == []
    trackers.close()
    assert list(run_dir.iterdir()) == []


def tiny_png(width: int = 3, height: int = 2) -> bytes:
    """A red RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def test_images_hparams_and_params_read_back(tmp_path: Path, mlflow_db: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    caplog.set_level(logging.INFO, logger="cifar_cam.trackers")
    run_dir = run_dir_for(tmp_path, "file", mlflow_db)
    png = tmp_path / "confusion_matrix.png"
    png.write_bytes(tiny_png())
    cfg = {"tensorboard": TB, "mlflow": mlflow_cfg("file")}
    config = {"optimizer": {"lr": 0.05, "_target_": "torch.optim.SGD"}, "trainer": {"progressive_resize": [12, 16]},
              "data": {"subset": None}, "ckpt": None}
    trackers = Trackers.open(cfg, run_dir, None, "2026-12-02_13-22-22")
    trackers.log_params(config)
    train(trackers, 1)
    trackers.log_image("confusion_matrix", png, STEPS)
    at_epoch_1 = trackers.state()
    trackers.commit()
    trackers.log_final(config, {"test_acc": 0.75, "test_loss": 0.5, "best_val_acc": None})
    trackers.log_image("gradcam", png)  # after the training: at the final step, written now
    trackers.close()

    # resumed with another lr: the param keeps the run's first value, the tag holds this session's
    again = Trackers.open(cfg, run_dir, at_epoch_1, "2026-12-02_13-22-22")
    changed = {**config, "optimizer": {"lr": 0.01, "_target_": "torch.optim.SGD"}, "ckpt": str(run_dir)}
    again.log_params(changed)
    again.log_final(changed, {"test_acc": 0.75, "test_loss": 0.5})  # evaluated again: at the same step
    again.log_image("gradcam", png)
    again.close()
    assert "param optimizer.lr=0.05 is the run's first value" in caplog.text

    acc = tb_events(run_dir)
    (image,) = acc.Images("confusion_matrix")  # buffered with epoch 1: written again by the resume, once
    assert (image.step, image.width, image.height, image.encoded_image_string) == (STEPS, 3, 2, png.read_bytes())
    assert [e.step for e in acc.Images("gradcam")] == [STEPS + 1]
    assert [(e.step, e.value) for e in acc.Scalars("test_acc")] == [(STEPS + 1, 0.75)]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    # the HPARAMS tab keeps the first values written (a reader takes a tag's metadata from its first event), as
    # MLflow keeps the first params
    assert hparams["optimizer.lr"].number_value == 0.05 and hparams["data.subset"].string_value == "null"
    assert hparams["trainer.progressive_resize"].string_value == "[12,16]"

    client = mlflow_client(run_dir, "file")
    run = client.get_run(at_epoch_1["mlflow"]["run_id"])
    assert run.info.run_name == "2026-12-02_13-22-22" and run.data.tags["cifar_cam.run_dir"] == str(run_dir.resolve())
    assert run.data.params["optimizer.lr"] == "0.05" and run.data.tags["param_changed.optimizer.lr"] == "0.01"
    assert run.data.params["optimizer._target_"] == "torch.optim.SGD" and "ckpt" not in run.data.params
    assert [k for k in run.data.tags if k.startswith("param_changed.")] == ["param_changed.optimizer.lr"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_acc")] == [(STEPS + 1, 0.75)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "images/confusion_matrix")] == [
        f"images/confusion_matrix/step_{STEPS}.png"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "images/gradcam")] == [
        f"images/gradcam/step_{STEPS + 1}.png"]


def compose_train(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("overrides", "trackers"), [
    ([], []),
    (["logger=tensorboard"], ["tensorboard"]),
    (["logger=[tensorboard,mlflow]"], ["tensorboard", "mlflow"]),
    (["logger=many"], ["tensorboard", "mlflow", "csv"]),
    (["experiment=fast", "logger=csv"], ["csv"]),
])
def test_logger_choices_compose_and_validate(overrides: list[str], trackers: list[str]) -> None:
    cfg = compose_train(overrides)
    assert list(cfg.logger) == trackers
    validate(cfg, "train")


@pytest.mark.parametrize(("override", "message"), [
    ("+logger.wandb={}", "logger.wandb is not a tracker; trackers: tensorboard, mlflow, csv"),
    ("logger.mlflow.store=s3", "logger.mlflow.store must be one of ['sqlite', 'file'], got 's3'"),
    ("logger.mlflow.tracking_uri=''", "logger.mlflow.tracking_uri must be null (a store in the run dir) or a tracking"),
    ("+logger.mlflow.password=x", "logger.mlflow.password is not an option of mlflow (its options: tracking_uri"),
    ("+logger.csv.path=x", "logger.csv.path is not an option of csv (its options: none)"),
])
def test_bad_logger_values_are_refused_in_one_line(override: str, message: str) -> None:
    cfg = compose_train(["logger=[mlflow,csv]", override])
    with pytest.raises(ConfigError) as e:
        validate(cfg, "train")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_without_mlflow_logger_mlflow_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from cifar_cam.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["train", "logger=many", "--cfg", "job"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("cifar-cam train: error: logger=mlflow needs mlflow: "
                                         "pip install 'cifar-cam[mlflow]'\n")
    validate(compose_train(["logger=[tensorboard,csv]"]), "train")  # the others do not need it
    monkeypatch.setitem(sys.modules, "mlflow", None)  # and at run time, an import that fails says the same
    with pytest.raises(ConfigError, match=r"^logger=mlflow needs mlflow: pip install 'cifar-cam\[mlflow\]'$"):
        Trackers.open({"mlflow": mlflow_cfg("file")}, tmp_path, None, "run")


def resumed_config(stored: Any, choices: dict[str, str], typed: list[str],
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    """The config `cifar-cam train ckpt=RUN <typed>` runs with, for a checkpoint holding `stored` and `choices`."""
    import cifar_cam.training.checkpoint
    from cifar_cam.cli.precheck import inherit_choices

    payload = {"config": OmegaConf.to_container(stored), "choices": choices}
    monkeypatch.setattr(cifar_cam.training.checkpoint, "cached_checkpoint", lambda *a: payload)
    overrides = inherit_choices("train", ["ckpt=RUN", *typed])
    cfg = compose_train(overrides)
    return merge_with_checkpoint(cfg, payload["config"], overrides, None, choices)


def test_a_list_of_trackers_round_trips_through_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig

    from cifar_cam.config.recipe import choices_of, overrides_for

    typed = ["logger=[tensorboard,csv]", "logger.tensorboard.images=false", "data=synthetic"]
    cfg = compose_train(typed)
    HydraConfig.instance().set_config(cfg)  # as in a running train: group_choices() reads it
    choices = choices_of(cfg.hydra.runtime.choices)
    assert choices["logger"] == "[tensorboard,csv]" and choices["data"] == "synthetic"
    stored = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])

    resumed = resumed_config(stored, choices, [], monkeypatch)  # cifar-cam train ckpt=RUN
    assert OmegaConf.to_container(resumed.logger) == {"tensorboard": {"hparams": True, "images": False}, "csv": {}}
    # a tracker's key on the resume's command line composes (the list is inherited), and wins
    resumed = resumed_config(stored, choices, ["logger.tensorboard.hparams=false"], monkeypatch)
    assert OmegaConf.to_container(resumed.logger) == {"tensorboard": {"hparams": False, "images": False}, "csv": {}}
    # another choice of trackers on the command line replaces the run's
    resumed = resumed_config(stored, choices, ["logger=mlflow"], monkeypatch)
    assert list(resumed.logger) == ["mlflow"]
    validate(resumed, "train")

    derived = overrides_for(stored, "train", choices)  # the config as a command line (lr-find's printed command)
    assert "logger=[tensorboard,csv]" in derived
    assert OmegaConf.to_container(compose_train(derived).logger) == OmegaConf.to_container(stored.logger)


def test_a_checkpoint_without_trackers_resumes_with_none(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_train(["data=synthetic"])
    stored = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "logger")])  # before logger= existed
    resumed = resumed_config(stored, {"data": "synthetic"}, [], monkeypatch)
    assert OmegaConf.to_container(resumed.logger) == {}
    validate(resumed, "train")
