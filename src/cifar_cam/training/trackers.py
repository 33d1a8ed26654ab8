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
only when a tracker opens (training/tracker_backends.py); config.validate checks that they are installed before
torch loads.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.config.choices import TRACKERS
from cifar_cam.errors import ConfigError
from cifar_cam.training.tracker_backends import (
    STEP_LOSS,
    CsvTracker,
    MLflowTracker,
    Record,
    TensorBoardTracker,
    png_size,
)

log = logging.getLogger("cifar_cam.trackers")

STATE_VERSION = 1
NOT_PARAMS = ("ckpt",)  # config keys that are no hyperparameter: a resume sets ckpt, it changes nothing trained


def flatten(node: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """{dotted key: value} of a (nested) config, each value as a tracker's param takes it: numbers, booleans and
    strings as they are, null as 'null', lists as Hydra writes them ('[12,16]')."""
    from cifar_cam.config.recipe import hydra_value

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
                    backends.append(TensorBoardTracker(opts, run_dir, purge_step))
                elif name == "mlflow":
                    backends.append(MLflowTracker(opts, run_dir, state.get("mlflow") if resumed else None, purge_step,
                                            run_name))
                else:
                    backends.append(CsvTracker(opts, run_dir, purge_step))
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
        png_size(data)  # a PNG, or ValueError now rather than at the commit
        if step is None:
            self._each(f"image {tag}", lambda b: b.log_image(tag, data, self.final_step))
        else:
            self._add(int(step), self._last_epoch, {}, {tag: _encode(data)})

    def log_params(self, hparams: Any) -> None:
        """The config as MLflow params (flattened: optimizer.lr=0.05; ckpt left out), at the start so a running run
        shows them; each logged once per run (see MLflowTracker.log_params)."""
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
