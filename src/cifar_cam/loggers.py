"""Experiment trackers (`logger=`): TensorBoard, MLflow and a step-level CSV, each step written once across
kills and resumes.

Rank 0 of a training run holds one `Trackers`. It buffers records in memory (`add_train_loss`, `add_epoch`),
puts `state()` into every checkpoint, and calls `commit()` right after that checkpoint is written: commit
writes the buffered records to every tracker and clears the buffer. A process killed anywhere (before the
checkpoint, between it and commit, in the middle of commit) is resumed with
`Trackers.open(..., state=<the checkpoint's state>)`, which first discards what the killed process wrote
from the first step of the state's records on, then writes those records again:

- TensorBoard: the same directory, `SummaryWriter(purge_step=P)`: readers drop the older events at steps >= P;
- MLflow: the same run (its id is in the state); (key, step) pairs the store already holds are skipped
  (MLflow cannot delete a metric value: it keeps the first one written, which an exact resume repeats);
- csv: the rows at steps >= P are cut before the records are written again.

P is the first step of the state's records, or the step after the state's last step when it holds none. So
the trainer adds every record of a step before it commits: the step's training loss, at an epoch's end
`add_epoch` at that same step, then the checkpoint, then `commit()`.

Nothing is sent anywhere unless `logger.mlflow.tracking_uri` names a server: the MLflow store is a file in
the run dir by default, and MLflow's telemetry is switched off. torch, tensorboard and mlflow are imported
only when a tracker opens; config.validate checks that they are installed before torch loads.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.errors import CifarCamError, ConfigError
from cifar_cam.io import write_csv

log = logging.getLogger("cifar_cam.loggers")

# The trackers `logger=` may choose (conf/logger/<name>.yaml nests its keys under logger.<name>), the options
# each takes, and the python module each needs (config.validate checks it is importable before torch loads).
TRACKERS = ("tensorboard", "mlflow", "csv")
TRACKER_KEYS = {
    "tensorboard": ("hparams", "images"),
    "mlflow": ("tracking_uri", "store", "experiment_name", "run_name", "artifacts"),
    "csv": (),
}
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "csv": None}
INSTALL_HINTS = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'cifar-cam[mlflow]'"}
MLFLOW_STORES = ("sqlite", "file")  # logger.mlflow.store: the run dir's store when tracking_uri is null

STATE_VERSION = 1
STEP_LOSS = "train_loss_step"   # the metric name of add_train_loss's values (steps.csv: its train_loss column)
STEPS_CSV = Path("logs") / "steps.csv"
STEPS_FIELDS = ("step", "epoch", "train_loss")
TENSORBOARD_DIR = "tensorboard"
NOT_PARAMS = ("ckpt",)  # config keys that are no hyperparameter: a resume sets ckpt, it changes nothing trained

# One buffered record: [step, epoch, {metric: value}, wall time (time.time()), {image tag: PNG as base64}]:
# plain lists, dicts, numbers and strings, which a checkpoint read with torch.load(weights_only=True) holds.
Record = list


def missing_module_message(name: str) -> str:
    """The one line for a tracker whose python package is not installed."""
    return f"logger={name} needs {TRACKER_MODULES[name]}: {INSTALL_HINTS[name]}"


def local_mlflow_uri(run_dir: Path, store: str) -> str:
    """The tracking URI of a run dir's own MLflow store: sqlite:///<run dir>/mlflow.db or file:<run dir>/mlruns."""
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}" if store == "sqlite" else (run_dir / "mlruns").as_uri()


def flatten(node: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """{dotted key: value} of a (nested) config, each value as a tracker's param takes it: numbers, booleans and
    strings as they are, null as 'null', lists as Hydra writes them ('[12,16]')."""
    from cifar_cam.recipe import hydra_value

    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that does not resolve here: logged as written
            node = OmegaConf.to_container(node, resolve=False)
    flat: dict[str, str | int | float | bool] = {}
    for key, value in (node or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(dict(value), name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is None or isinstance(value, list | tuple | Mapping):
            flat[name] = hydra_value(list(value) if isinstance(value, tuple) else value)
        else:
            flat[name] = str(value)
    return flat


def _params(config: Any) -> dict[str, str | int | float | bool]:
    """The config as params: flattened, without NOT_PARAMS."""
    return {k: v for k, v in flatten(config).items() if k.split(".", 1)[0] not in NOT_PARAMS}


def _plain(logger_cfg: Any) -> dict[str, Any]:
    """cfg.logger as {tracker: {option: value}} ({} for None / none)."""
    if logger_cfg is None:
        return {}
    if isinstance(logger_cfg, DictConfig):
        logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
    if not isinstance(logger_cfg, Mapping):
        raise ConfigError(f"logger must be a mapping of trackers (logger=tensorboard, logger=[tensorboard,mlflow]), "
                          f"got {logger_cfg!r}")
    unknown = [name for name in logger_cfg if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"logger.{unknown[0]} is not a tracker; trackers: {', '.join(TRACKERS)} "
                          "(logger=[tensorboard,mlflow] chooses several)")
    return {name: dict(logger_cfg[name] or {}) for name in TRACKERS if name in logger_cfg}


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_size(data: bytes) -> tuple[int, int, int]:
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


class _TensorBoard:
    """Event files in <run dir>/tensorboard, one directory for the whole run (resumes included)."""

    name = "tensorboard"

    def __init__(self, options: dict[str, Any], run_dir: Path, purge_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(missing_module_message("tensorboard")) from e

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

        width, height, channels = _png_size(data)
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


class _Csv:
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
        raise ConfigError(missing_module_message("mlflow")) from e
    mlflow.telemetry.set_telemetry_client()  # mlflow imported earlier: drops a client started then
    return mlflow.tracking


class _MLflow:
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


class Trackers:
    """The trackers `cfg.logger` chose, fed by rank 0 of a training run; no trackers: every call a no-op."""

    def __init__(self, backends: list[Any], records: list[Record], last_step: int) -> None:
        self._backends = backends
        self._records = records                     # added since the last commit (or not yet written by a tracker)
        self._written = {b.name: 0 for b in backends}   # how many of _records each tracker has written
        self._last_step = last_step                 # the highest step of any record added
        self._last_epoch = max((r[1] for r in records), default=0)
        self._committed_step = 0                    # the highest step of a record no longer buffered

    @classmethod
    def open(cls, logger_cfg: Any, run_dir: Path, state: dict[str, Any] | None, run_name: str) -> Trackers:
        """The trackers of `logger_cfg` (cfg.logger) for the run in `run_dir`; `state`: what state() returned, as the
        run's last checkpoint saved it (None: a fresh run). A resume discards what a killed process wrote past the
        checkpoint and writes the state's records again (each step once), then continues."""
        options = _plain(logger_cfg)
        if not options:
            return cls([], [], 0)
        run_dir = Path(run_dir)
        state = state or {}
        records = [[int(s), int(e), dict(m), float(t), dict(i)] for s, e, m, t, i in state.get("records", [])]
        last_step = int(state.get("step", 0))
        resumed = bool(state)
        purge_step = (min(r[0] for r in records) if records else last_step + 1) if resumed else None
        backends: list[Any] = []
        try:
            for name, opts in options.items():
                if name == "tensorboard":
                    backends.append(_TensorBoard(opts, run_dir, purge_step))
                elif name == "mlflow":
                    backends.append(_MLflow(opts, run_dir, state.get("mlflow") if resumed else None, purge_step,
                                            run_name))
                else:
                    backends.append(_Csv(opts, run_dir, purge_step))
        except BaseException:
            for b in backends:
                b.close("FAILED")
            raise
        trackers = cls(backends, records, last_step)
        trackers._committed_step = purge_step - 1 if purge_step is not None else 0
        if resumed:
            log.info("trackers %s: resuming at step %d", ", ".join(trackers.names), purge_step)
        trackers.commit()  # the state's records, written again: each tracker skips or replaces what it holds
        return trackers

    @property
    def names(self) -> list[str]:
        """The open trackers, e.g. ['tensorboard', 'mlflow']."""
        return [b.name for b in self._backends]

    def _add(self, step: int, epoch: int, metrics: dict[str, float], images: dict[str, str] | None = None) -> None:
        if step <= self._committed_step:
            raise ValueError(f"a record at step {step}, but records up to step {self._committed_step} are committed: "
                             "add every record of a step before the commit() that follows its checkpoint")
        self._records.append([int(step), int(epoch), metrics, time.time(), images or {}])
        self._last_step, self._last_epoch = max(self._last_step, int(step)), int(epoch)

    def add_train_loss(self, step: int, epoch: int, loss: float) -> None:
        """The training loss after optimizer step `step` (1-based, counted over the whole run), buffered."""
        if self._backends:
            self._add(step, epoch, {STEP_LOSS: float(loss)})

    def add_epoch(self, epoch: int, step: int, metrics: dict[str, float | None]) -> None:
        """An epoch's metrics (train_loss, val_acc, lr, ...; None skipped) at the step that ended it, and `epoch`
        itself, buffered."""
        if self._backends:
            values = {k: float(v) for k, v in metrics.items() if v is not None}
            self._add(step, epoch, {**values, "epoch": float(epoch)})

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves, plain python only: the records not yet committed, the last step, each
        tracker's ids ({'mlflow': {'run_id': ...}}). {} without trackers."""
        if not self._backends:
            return {}
        state: dict[str, Any] = {
            "version": STATE_VERSION, "trackers": self.names, "step": self._last_step,
            "records": [[s, e, dict(m), t, dict(i)] for s, e, m, t, i in self._records],
        }
        for b in self._backends:
            if b.state():
                state[b.name] = b.state()
        return state

    def commit(self) -> None:
        """Writes the buffered records to every tracker and flushes; called right after the checkpoint that holds
        state(). A tracker that fails (a server away) keeps its records for the next commit, with a warning."""
        for b in self._backends:
            todo = self._records[self._written[b.name]:]
            if not todo:
                continue
            try:
                b.write(todo)
            except Exception as e:
                log.warning("logger=%s: could not write %d records (%s: %s); the next commit tries again", b.name,
                            len(todo), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            self._written[b.name] = len(self._records)
        done = min(self._written.values(), default=len(self._records))
        if done:
            self._committed_step = max(self._committed_step, *(r[0] for r in self._records[:done]))
            del self._records[:done]
            self._written = {name: n - done for name, n in self._written.items()}

    @property
    def final_step(self) -> int:
        """Where log_final (and log_image without a step) write: the step after the last record's. A resume purges
        from there, so a run evaluated again, or trained further, replaces them."""
        return self._last_step + 1

    def _each(self, what: str, call: Any) -> None:
        for b in self._backends:
            try:
                call(b)
            except Exception as e:  # a tracker's failure costs its record, not the run
                log.warning("logger=%s: could not log %s (%s: %s)", b.name, what, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")

    def log_image(self, tag: str, path: Path, step: int | None = None) -> None:
        """A PNG (the confusion matrix, the curves): TensorBoard's IMAGES tab, the MLflow artifact
        images/<tag>/step_<step>.png. At a training step: buffered with that step's records (its bytes in state(),
        written by commit()); `step` None: written now at final_step, as log_final."""
        if not self._backends:
            return
        data = Path(path).read_bytes()
        _png_size(data)  # a PNG, or ValueError now rather than at the commit
        if step is None:
            self._each(f"image {tag}", lambda b: b.log_image(tag, data, self.final_step))
        else:
            self._add(int(step), self._last_epoch, {}, {tag: _encode(data)})

    def log_params(self, hparams: Any) -> None:
        """The config as MLflow params (flattened: optimizer.lr=0.05; ckpt left out), at the start so a running run
        shows them; each logged once per run (see _MLflow.log_params)."""
        if self._backends:
            params = _params(hparams)
            self._each("params", lambda b: b.log_params(params))

    def log_final(self, hparams: Any, metrics: dict[str, float | None]) -> None:
        """The config (flattened) and the final metrics (test_acc, ...; None skipped) at final_step: TensorBoard's
        HPARAMS tab and scalars, MLflow params and metrics."""
        if self._backends:
            params = _params(hparams)
            values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            self._each("the final metrics", lambda b: b.log_final(params, values, self.final_step))

    def close(self, status: str = "FINISHED") -> None:
        """Flushes and closes every tracker (records not committed stay unwritten: the next resume adds them).
        `status`: the MLflow run's, FINISHED | FAILED | KILLED."""
        for b in self._backends:
            try:
                b.close(status)
            except Exception as e:
                log.warning("logger=%s: could not close (%s: %s)", b.name, type(e).__name__, e)
        self._backends = []
