"""The trackers' own files and services: TensorBoard event files, MLflow runs and steps.csv, each written by one
class with the same five calls (write, log_image, log_params, log_final, close); `trackers.Trackers` drives them.
torch, tensorboard and mlflow are imported only when a tracker opens."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifar_cam.config.choices import missing_tracker_message
from cifar_cam.errors import CifarCamError, ConfigError
from cifar_cam.io import write_csv

log = logging.getLogger("cifar_cam.trackers")

STEP_LOSS = "train_loss_step"   # the metric name of add_train_loss's values (steps.csv: its train_loss column)
STEPS_CSV = Path("logs") / "steps.csv"
STEPS_FIELDS = ("step", "epoch", "train_loss")
TENSORBOARD_DIR = "tensorboard"

# One buffered record: [step, epoch, {metric: value}, wall time (time.time()), {image tag: PNG as base64}]:
# plain lists, dicts, numbers and strings, which a checkpoint read with torch.load(weights_only=True) holds.
Record = list


def local_mlflow_uri(run_dir: Path, store: str) -> str:
    """The tracking URI of a run dir's own MLflow store: sqlite:///<run dir>/mlflow.db or file:<run dir>/mlruns."""
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}" if store == "sqlite" else (run_dir / "mlruns").as_uri()


def png_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from a PNG's header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height, {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(data[25], 3)


def _after_existing_event_files(log_dir: Path) -> None:
    """Waits, if need be, until the clock is past the second in the names of the event files in `log_dir`.

    Readers take a directory's event files in the order of their names, events.out.tfevents.<seconds>.<host>.
    <pid>.<n>: a file started in the same second as an older one (a resume right after a kill) could sort
    before it, and its purge would then come before the events it discards.
    """
    newest = 0
    for path in log_dir.glob("events.out.tfevents.*"):
        with contextlib.suppress(IndexError, ValueError):
            newest = max(newest, int(path.name.split(".")[3]))
    if newest >= int(time.time()):
        time.sleep(newest + 1 - time.time() + 0.01)


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard, one directory for the whole run (resumes included)."""

    name = "tensorboard"

    def __init__(self, options: dict[str, Any], run_dir: Path, purge_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(missing_tracker_message("tensorboard")) from e

        self.options = options
        self.dir = run_dir / TENSORBOARD_DIR
        _after_existing_event_files(self.dir)
        # purge_step: a START event at that step; readers then drop the earlier files' events at steps >= it
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step, max_queue=1000)

    def write(self, records: list[Record]) -> None:
        for step, _, metrics, wall_time, images in records:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step, walltime=wall_time)
            for tag, data in images.items():
                self._image(tag, base64.b64decode(data), step, wall_time)
        self.writer.flush()

    def _image(self, tag: str, data: bytes, step: int, wall_time: float) -> None:
        if not self.options.get("images", True):
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        width, height, channels = png_size(data)
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step, wall_time)

    def log_image(self, tag: str, data: bytes, step: int) -> None:
        self._image(tag, data, step, time.time())
        self.writer.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        pass  # the HPARAMS tab takes the config with the final metrics (log_final)

    def log_final(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        if self.options.get("hparams", True):
            from torch.utils.tensorboard.summary import hparams

            # SummaryWriter.add_hparams would write into a new timestamped subdirectory: these go into the run's own
            for summary in hparams(params, metrics):
                self.writer.file_writer.add_summary(summary, step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def state(self) -> dict[str, Any]:
        return {}

    def close(self, status: str) -> None:
        self.writer.close()


class CsvTracker:
    """<run dir>/logs/steps.csv: step, epoch, train_loss of every add_train_loss."""

    name = "csv"

    def __init__(self, options: dict[str, Any], run_dir: Path, purge_step: int | None) -> None:
        self.path = run_dir / STEPS_CSV
        if purge_step is not None and self.path.is_file():  # the rows a killed process wrote from purge_step on
            write_csv(self.path, self._rows_before(purge_step), STEPS_FIELDS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", newline="")  # noqa: SIM115  (open until close())
        if self.file.tell() == 0:
            self.file.write(",".join(STEPS_FIELDS) + "\n")
            self.file.flush()

    def _rows_before(self, step: int) -> list[dict[str, str]]:
        rows = []
        with open(self.path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if int(row["step"]) < step and None not in row.values():
                        rows.append(row)
                except (TypeError, ValueError):  # a row a kill cut short
                    continue
        return rows

    def write(self, records: list[Record]) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for step, epoch, metrics, *_ in records:
            if STEP_LOSS in metrics:
                writer.writerow([step, epoch, repr(float(metrics[STEP_LOSS]))])
        if text.tell():
            self.file.write(text.getvalue())  # one write: a kill leaves whole rows or one cut row, cut on resume
            self.file.flush()

    def log_image(self, tag: str, data: bytes, step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_final(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def close(self, status: str) -> None:
        self.file.close()


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's and its database layer's chatter (table creation, SQLAlchemy deprecations) kept out of the log."""
    for name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _import_mlflow(file_store: bool) -> Any:
    """mlflow's client module, telemetry off (decided when mlflow is imported: the variable goes first)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if file_store:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses its file store without it
    try:
        import mlflow.telemetry
        import mlflow.tracking
    except ImportError as e:
        raise ConfigError(missing_tracker_message("mlflow")) from e
    mlflow.telemetry.set_telemetry_client()  # mlflow imported earlier: drops a client started then
    return mlflow.tracking


class MLflowTracker:
    """One MLflow run for the whole training run: created by the first session, continued by each resume."""

    name = "mlflow"

    def __init__(self, options: dict[str, Any], run_dir: Path, state: dict[str, Any] | None, purge_step: int | None,
                 run_name: str) -> None:
        store = options.get("store", "sqlite")
        self.options = options
        self.uri = options.get("tracking_uri") or local_mlflow_uri(run_dir, store)
        tracking = _import_mlflow(file_store=self.uri.startswith("file:"))
        from mlflow.exceptions import MlflowException

        self._error = MlflowException
        self.present: set[tuple[str, int]] = set()  # (key, step) pairs the store held when this session began
        try:
            with _quiet_mlflow():
                self.client = tracking.MlflowClient(tracking_uri=self.uri)
                run_id = (state or {}).get("run_id")
                if run_id and self._exists(run_id):
                    self.run_id = run_id
                    self.client.update_run(run_id, status="RUNNING")
                    self.present = self._stored(purge_step or 0)
                else:
                    if run_id:
                        log.warning("logger=mlflow: the run's MLflow run %s is not in %s: a new MLflow run holds "
                                    "what this session logs", run_id, self.uri)
                    self.run_id = self._create_run(options, run_dir, run_name)
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        except MlflowException as e:
            raise CifarCamError(f"logger=mlflow: cannot use the MLflow store {self.uri}: "
                                f"{str(e).splitlines()[0]}") from e
        self._stale_from: int | None = None  # a write failed: the store may hold part of it from this step on

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except self._error as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _create_run(self, options: dict[str, Any], run_dir: Path, run_name: str) -> str:
        name = options.get("experiment_name") or "cifar-cam"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # the run dir's own store keeps the artifacts beside it (MLflow's default: ./mlartifacts of the cwd)
            location = (Path(run_dir).resolve() / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") and \
                not options.get("tracking_uri") else None
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            except self._error:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        tags = {"cifar_cam.run_dir": str(Path(run_dir).resolve()), "mlflow.source.name": "cifar-cam train"}
        return self.client.create_run(experiment_id, tags=tags, run_name=options.get("run_name") or run_name
                                      ).info.run_id

    def _stored(self, since: int) -> set[tuple[str, int]]:
        """The (key, step) pairs of this run at steps >= `since`."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {(key, m.step) for key in keys for m in self.client.get_metric_history(self.run_id, key)
                if m.step >= since}

    def _log_metrics(self, triples: list[tuple[str, float, int, float]]) -> None:
        """(key, value, step, wall time) each, but the pairs the store holds already."""
        from mlflow.entities import Metric

        if self._stale_from is not None:
            self.present |= self._stored(self._stale_from)
            self._stale_from = None
        metrics = [Metric(key, float(value), int(wall_time * 1000), step) for key, value, step, wall_time in triples
                   if (key, step) not in self.present]
        try:
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)
        except Exception:
            self._stale_from = min((step for _, _, step, _ in triples), default=0)
            raise

    def write(self, records: list[Record]) -> None:
        self._log_metrics([(key, value, step, wall_time) for step, _, metrics, wall_time, _ in records
                           for key, value in metrics.items()])
        for step, _, _, _, images in records:
            for tag, data in images.items():
                self.log_image(tag, base64.b64decode(data), step)

    def log_image(self, tag: str, data: bytes, step: int) -> None:
        if not self.options.get("artifacts", True):
            return
        with tempfile.TemporaryDirectory() as tmp:  # images/<tag>/step_<step>.png: written again, the same file
            named = Path(tmp) / f"step_{step}.png"
            named.write_bytes(data)
            self.client.log_artifact(self.run_id, str(named), artifact_path=f"images/{tag}")

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are the run's values when it started: MLflow refuses to change one. A value changed on resume
        goes into the tag `param_changed.<key>` (the latest resume's), with a log line."""
        from mlflow.entities import Param, RunTag

        values = {key: str(value)[:6000] for key, value in params.items()}  # MLflow's longest param value
        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in values.items() if k not in have]
        changed = [RunTag(f"param_changed.{k}", v) for k, v in values.items() if k in have and have[k] != v]
        for tag in changed:
            key = tag.key.split(".", 1)[1]
            log.info("logger=mlflow: param %s=%s is the run's first value (MLflow keeps it); this session's %s is "
                     "the tag %s", key, have[key], tag.value, tag.key)
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100], synchronous=True)

    def log_final(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.log_params(params)
        now = time.time()
        self._log_metrics([(key, value, step, now) for key, value in metrics.items()])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
