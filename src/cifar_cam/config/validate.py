"""Config checks that run before any work starts: one validator a section, values only (no files, no torch).

Every check raises ConfigError with the key, the bad value and what would be valid; the CLI
prints it as one line and exits 2. What needs the disk (a calibration file, a plan, the data root) is
checked by the CLI's pre-check after these.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.config.choices import (
    BACKENDS,
    CAM_METHODS,
    CAM_SELECT,
    INTERVALS,
    MIX_MODES,
    MLFLOW_STORES,
    MODEL_NAMES,
    MUON,
    PRECISIONS,
    PRESETS,
    SOURCES,
    STRATEGIES,
    TRACKER_KEYS,
    TRACKER_MODULES,
    TRACKERS,
    missing_tracker_message,
)
from cifar_cam.config.durations import time_budget_seconds
from cifar_cam.errors import ConfigError

EXPORT_FORMATS = ("onnx", "pt2")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DEFAULT_IMAGE_SIZE = 32  # CIFAR's own size: what every data source gives when data.image_size is not set


def image_size(cfg: DictConfig) -> int:
    """The side of the square images that load_data gives for `cfg` (data.image_size, else CIFAR's 32)."""
    return int(OmegaConf.select(cfg, "data.image_size", default=DEFAULT_IMAGE_SIZE))


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as e:  # MissingMandatoryValue, interpolation errors
        raise ConfigError(f"{key} is required but not set: pass {key}=... ({type(e).__name__})") from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or OmegaConf.is_list(v)


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], want: str, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if not ok(value):
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _number_in(low: float, high: float, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)


def _image_sizes(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) or OmegaConf.is_list(v)) and all(_is_int(s) and s >= 8 for s in v)


def _a_path(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _choice(choices: Iterable[str]) -> Callable[[Any], bool]:
    options = tuple(choices)
    return lambda v: v in options


TRAINING = ("train", "lr-find")  # the commands that take optimizer steps


def _validate_top_level(c: DictConfig, command: str) -> None:
    """seed, and the user's own labels (+tags.<name>=<value>)."""
    _check(c, "seed", _is_int, "an integer")
    tags = OmegaConf.select(c, "tags", default=None)
    if tags is None:
        return
    if not OmegaConf.is_dict(tags):
        raise ConfigError(f"tags must be labels given as +tags.<name>=<value>, got tags={tags!r}")
    for name, value in tags.items():
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"tags.{name} must be a word or a number (a label for the run), got {value!r}")


def _validate_data(c: DictConfig, command: str) -> None:
    """data.*: the keys of every source, then those of the chosen one."""
    _check(c, "data.source", _choice(SOURCES), f"one of {list(SOURCES)}")
    _check(c, "data.batch_size", _int_at_least(1), "an integer >= 1")
    _check(c, "data.num_workers", lambda v: v == "auto" or (_is_int(v) and v >= 0), "'auto' or an integer >= 0")
    _check(c, "data.val_size", _int_at_least(0), "an integer >= 0 (0 = no validation split)")
    _check(c, "data.subset", _int_at_least(1), "null or an integer >= 1", optional=True)
    if _get(c, "data.source") == "folder":
        _check(c, "data.root", lambda v: isinstance(v, str) and v != "", "a folder or .tar.gz path")
        _check(c, "data.image_size", _int_at_least(8), "an integer >= 8")
    if _get(c, "data.source") == "synthetic":
        _check(c, "data.num_classes", _int_at_least(2), "an integer >= 2")
        _check(c, "data.train_size", _int_at_least(2), "an integer >= 2")
        _check(c, "data.test_size", _int_at_least(1), "an integer >= 1")
        _check(c, "data.image_size", _int_at_least(8), "an integer >= 8")


def _validate_model(c: DictConfig, command: str) -> None:
    """model.*."""
    _check(c, "model.name", _choice(MODEL_NAMES), f"one of {list(MODEL_NAMES)}")
    _check(c, "model.width", _int_at_least(1), "an integer >= 1")


def _validate_aug(c: DictConfig, command: str) -> None:
    """aug.*: presets differ in their keys, so probabilities, angles and pixels are checked by name."""
    _check(c, "aug.preset", _choice(PRESETS), f"one of {list(PRESETS)}")
    _check(c, "aug.backend", _choice(BACKENDS), f"one of {list(BACKENDS)}")
    for key in OmegaConf.to_container(c.aug) or {}:
        if key.endswith("_p"):
            _check(c, f"aug.{key}", _number_in(0, 1), "a probability in [0, 1]")
        elif key == "rotate_limit":
            _check(c, "aug.rotate_limit", _number_in(0, 180), "degrees in [0, 180]")
        elif key in ("cutout_size", "pad"):
            _check(c, f"aug.{key}", _int_at_least(0), "an integer >= 0 (pixels)")
        elif key in ("mixup_alpha", "cutmix_alpha"):
            _check(c, f"aug.{key}", _positive, "a number > 0 (the Beta distribution's alpha)")
    _check(c, "aug.mix", _choice(MIX_MODES), f"null (off) or one of {list(MIX_MODES)}", optional=True)


def _validate_eval(c: DictConfig, command: str) -> None:
    """eval.*; eval.calibrate needs a val split to fit on (never the test set)."""
    _check(c, "eval.batch_size", _int_at_least(1), "an integer >= 1")
    _check(c, "eval.tta", _is_bool, "true or false")
    if command != "eval" or OmegaConf.select(c, "eval.calibrate", default=None) is None:
        return  # absent: merged from a checkpoint's eval section, which has no calibrate key
    _check(c, "eval.calibrate", _is_bool, "true or false")
    if _get(c, "eval.calibrate") and _get(c, "data.val_size") == 0:
        raise ConfigError("eval.calibrate=true fits the temperature on the val split, but data.val_size=0: there "
                          "is none (the test set never calibrates: it would grade itself); calibrate a run trained "
                          "with data.val_size>0, keeping its data.val_size")


def _validate_runtime(c: DictConfig, command: str) -> None:
    """trainer.device, precision and threads: how every command runs, not only train."""
    _check(c, "trainer.device", lambda v: isinstance(v, str) and bool(DEVICE_PATTERN.match(v)),
           "auto, cpu, cuda or cuda:N")
    _check(c, "trainer.precision", _choice(PRECISIONS), f"one of {list(PRECISIONS)}")
    _check(c, "trainer.num_threads", lambda v: v == "auto" or (_is_int(v) and v >= 1), "'auto' or an integer >= 1",
           optional=True)
    # Only where present: a checkpoint written before these keys existed resumes without them.
    if "stall_timeout" in c.trainer:
        _check(c, "trainer.stall_timeout", lambda v: v == "auto" or _positive(v),
               "'auto', null (off) or seconds > 0", optional=True)
    if "stop_grace" in c.trainer:
        _check(c, "trainer.stop_grace", _positive, "seconds > 0")
    if "progress_every" in c.trainer:
        _check(c, "trainer.progress_every", _positive, "null (off) or seconds > 0", optional=True)


def _validate_optimizer(c: DictConfig, command: str) -> None:
    """optimizer.*: the keys an optimizer class lacks (Adam's momentum) are checked only where present."""
    if command not in TRAINING:
        return
    _check(c, "optimizer.lr", lambda v: v == "auto" or _positive(v),
           "a number > 0 or 'auto' (run the LR range test first)")
    _check(c, "optimizer._target_",
           lambda v: isinstance(v, str) and (v.startswith("torch.optim.") or v == MUON),
           f"a torch.optim class or {MUON}")
    if "weight_decay" in c.optimizer:
        _check(c, "optimizer.weight_decay", _number_in(0, float("inf")), "a number >= 0")
    if "momentum" in c.optimizer:
        _check(c, "optimizer.momentum", _number_in(0, 1, high_open=True), "a number in [0, 1)")
    if "aux_lr_scale" in c.optimizer:
        _check(c, "optimizer.aux_lr_scale", _positive, "a number > 0")
    if "nesterov" in c.optimizer:
        _check(c, "optimizer.nesterov", _is_bool, "true or false")
    if "ns_steps" in c.optimizer:
        _check(c, "optimizer.ns_steps", _int_at_least(1), "an integer >= 1")


def _validate_scheduler(c: DictConfig, command: str) -> None:
    """scheduler.interval: what the training run reads before it instantiates the rest."""
    if command not in TRAINING:
        return
    _check(c, "scheduler.interval", _choice(INTERVALS), "epoch or step")


def _validate_trainer(c: DictConfig, command: str) -> None:
    """trainer.* of the training loop (the runtime keys are _validate_runtime's)."""
    if command not in TRAINING:
        return
    _check(c, "trainer.epochs", _int_at_least(1), "an integer >= 1")
    _check(c, "trainer.early_stopping.patience", _int_at_least(1), "null (off) or an integer >= 1", optional=True)
    _check(c, "trainer.early_stopping.min_delta", _number_in(0, 1), "a fraction in [0, 1]")
    _check(c, "trainer.label_smoothing", _number_in(0, 1, high_open=True), "a number in [0, 1)")
    _check(c, "trainer.log_every", lambda v: v == "auto" or (_is_int(v) and v >= 1), "'auto' or an integer >= 1")
    _check(c, "trainer.compile", _is_bool, "true or false")
    _check(c, "trainer.checkpoint_every", _int_at_least(1), "an integer >= 1 (epochs between checkpoint writes)",
           optional=True)
    _check(c, "trainer.channels_last", _is_bool, "true or false")
    _check(c, "trainer.deterministic", _is_bool, "true or false")
    _check(c, "trainer.strategy", _choice(STRATEGIES), "auto, single or ddp", optional=True)
    _check(c, "trainer.progressive_resize", _image_sizes, "null or a list of image sizes (integers >= 8)",
           optional=True)
    _check_progressive_resize(c)
    _check(c, "trainer.sync_batchnorm", _is_bool, "true or false", optional=True)
    _check(c, "trainer.ema.decay", _number_in(0, 1, high_open=True), "null (off) or a number in [0, 1), e.g. 0.999",
           optional=True)
    _check(c, "trainer.ema.warmup", _is_bool, "true or false", optional=True)
    _check_budget(c)
    _check(c, "trainer.grad_clip", _positive, "null (off) or a number > 0 (the gradients' max global norm)",
           optional=True)


def _check_budget(c: DictConfig) -> None:
    """trainer.time_budget parses; trainer.plan names a file (the CLI's pre-check reads it: cli.precheck)."""
    time_budget_seconds(_get(c, "trainer.time_budget"))
    _check(c, "trainer.plan", lambda v: isinstance(v, str) and v != "", "null or a plan.json", optional=True)


def _check_progressive_resize(c: DictConfig) -> None:
    """trainer.progressive_resize against trainer.epochs and the full image size."""
    sizes, epochs = _get(c, "trainer.progressive_resize"), _get(c, "trainer.epochs")
    full_size = image_size(c)
    if sizes is not None and len(sizes) > epochs:
        raise ConfigError(f"trainer.progressive_resize lists {len(sizes)} epochs but trainer.epochs={epochs}: "
                          "shorten it (e.g. trainer.progressive_resize=[12,16]) or pass "
                          "trainer.progressive_resize=null")
    if sizes is not None and any(size > full_size for size in sizes):
        raise ConfigError(f"trainer.progressive_resize={list(sizes)} has sizes above the {full_size}-pixel "
                          "images: progressive resizing only shrinks")


def _validate_lr_find(c: DictConfig, command: str) -> None:
    """lr_find.*: for lr-find, and for a train run whose optimizer.lr=auto runs the range test first."""
    if not (command == "lr-find" or (command == "train" and _get(c, "optimizer.lr") == "auto")):
        return
    _check(c, "lr_find.start_lr", _positive, "a number > 0")
    _check(c, "lr_find.end_lr", lambda v: _is_number(v) and v > _get(c, "lr_find.start_lr"),
           f"a number > lr_find.start_lr ({_get(c, 'lr_find.start_lr')})")
    _check(c, "lr_find.num_iter", _int_at_least(2), "an integer >= 2")


def _validate_gradcam(c: DictConfig, command: str) -> None:
    """gradcam.*."""
    if command != "gradcam":
        return
    _check(c, "gradcam.num_images", _int_at_least(1), "an integer >= 1")
    _check(c, "gradcam.method", _choice(CAM_METHODS), f"one of {list(CAM_METHODS)}")
    _check(c, "gradcam.methods", lambda v: _is_list(v) and len(v) > 0 and all(m in CAM_METHODS for m in v),
           f"null or a non-empty list of {list(CAM_METHODS)}, e.g. [gradcam,layercam]", optional=True)
    _check(c, "gradcam.select", _choice(CAM_SELECT), f"one of {list(CAM_SELECT)}")
    _check(c, "gradcam.classes", lambda v: _is_list(v) and len(v) > 0 and all(isinstance(x, str) for x in v),
           "null or a non-empty list of class names, e.g. [cat,dog]", optional=True)
    _check(c, "gradcam.target", _is_bool, "true or false")
    _check(c, "gradcam.aug_smooth", _is_bool, "true or false", optional=True)
    _check(c, "gradcam.eigen_smooth", _is_bool, "true or false", optional=True)
    _check(c, "gradcam.metrics", _is_bool, "true or false", optional=True)
    _check(c, "gradcam.target_layers", lambda v: isinstance(v, (list, tuple)) or OmegaConf.is_list(v),
           "a list of layer names, e.g. [layer3,layer4]")


def _validate_predict(c: DictConfig, command: str) -> None:
    """predict.* and inputs."""
    if command != "predict":
        return
    if OmegaConf.is_missing(c, "inputs"):
        raise ConfigError("predict needs inputs=...: an image, a folder, a .tar.gz, a glob, or a list [a.png,dir/]")
    _check(c, "inputs", lambda v: (isinstance(v, str | int | float) and str(v) != "")  # inputs=2024: a folder
           or (OmegaConf.is_list(v) and len(v) > 0), "a path, a glob, or a non-empty list of them")
    _check(c, "predict.topk", _int_at_least(1), "an integer >= 1")
    _check(c, "predict.batch_size", _int_at_least(1), "an integer >= 1")
    _check(c, "predict.cam", _is_bool, "true or false")
    _check(c, "predict.layer", lambda v: v in ("layer1", "layer2", "layer3", "layer4"), "layer1 .. layer4")
    _check(c, "predict.max_pixels", _int_at_least(1), "an integer >= 1")
    _check(c, "predict.contact_sheet", _int_at_least(0), "an integer >= 0")
    _check(c, "predict.calibration", _a_path,
           "null or a calibration.json / an eval run dir", optional=True)


def _validate_export(c: DictConfig, command: str) -> None:
    """export.*."""
    if command != "export":
        return
    formats = _get(c, "export.formats")
    if not (OmegaConf.is_list(formats) and len(formats) and all(f in EXPORT_FORMATS for f in formats)):
        raise ConfigError(f"export.formats={formats} must be a non-empty list of {list(EXPORT_FORMATS)}, "
                          "e.g. [onnx,pt2]")
    _check(c, "export.check", _is_bool, "true or false")
    _check(c, "export.check_images", _int_at_least(1), "null (the whole test set) or an integer >= 1", optional=True)
    _check(c, "export.tolerance", _positive, "a number > 0")
    _check(c, "export.quantize", lambda v: v == "int8", "null or int8", optional=True)
    if _get(c, "export.quantize") == "int8" and "onnx" not in formats:
        raise ConfigError("export.quantize=int8 quantizes the ONNX model: add onnx to export.formats")
    _check(c, "export.calibration_images", _int_at_least(1), "an integer >= 1")
    _check(c, "export.opset", _int_at_least(17), "an integer >= 17")
    _check(c, "export.calibration", _a_path,
           "null or a calibration.json / an eval run dir", optional=True)


def _validate_serve(c: DictConfig, command: str) -> None:
    """serve.*."""
    if command != "serve":
        return
    _check(c, "serve.host", lambda v: isinstance(v, str) and v != "", "a host name or address, e.g. 127.0.0.1")
    _check(c, "serve.port", lambda v: _is_int(v) and 0 <= v <= 65535, "an integer in [0, 65535] (0: any free port)")
    _check(c, "serve.workers", _int_at_least(1), "an integer >= 1")
    _check(c, "serve.api_key", lambda v: isinstance(v, str) and v != "", "null or a non-empty string", optional=True)
    _check(c, "serve.max_batch", _int_at_least(1), "an integer >= 1")
    _check(c, "serve.max_wait_ms", lambda v: _is_number(v) and v >= 0, "a number of milliseconds >= 0")
    _check(c, "serve.max_batch_images", _int_at_least(1), "an integer >= 1")
    _check(c, "serve.max_upload_mb", _positive, "a number > 0")
    _check(c, "serve.max_pixels", _int_at_least(1), "an integer >= 1")
    _check(c, "serve.topk", _int_at_least(1), "an integer >= 1")
    _check(c, "serve.gallery", lambda v: isinstance(v, str) and v != "", "null or a gradcam run dir", optional=True)
    _check(c, "serve.calibration", _a_path,
           "null or a calibration.json / an eval run dir", optional=True)
    _check(c, "serve.max_queue", _int_at_least(1), "an integer >= 1 (images waiting for a forward pass)")
    _check(c, "serve.timeout_s", _positive, "a number of seconds > 0")
    _check(c, "serve.metrics", _is_bool, "true or false")
    _check(c, "serve.metrics_key", _is_bool, "true or false")
    _check(c, "serve.access_log", lambda v: isinstance(v, str) and v != "",
           "null (off), - (standard output) or a file (relative: in the run dir)", optional=True)
    _check(c, "serve.drain_s", lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0")


def _validate_ckpt(c: DictConfig, command: str) -> None:
    """ckpt: required by eval, gradcam, predict, export and serve."""
    if command not in ("eval", "gradcam", "predict", "export", "serve"):
        return
    if OmegaConf.is_missing(c, "ckpt"):
        raise ConfigError(f"{command} needs ckpt=PATH: a train run dir (uses its checkpoints/best.pt) or a .pt file"
                          + (", or an exported .onnx / .pt2" if command == "predict" else ""))
    _check(c, "ckpt", lambda v: isinstance(v, str) and v != "", "a checkpoint file or a train run dir")


def _validate_logger(c: DictConfig, command: str) -> None:
    """logger.*: the trackers train writes to (conf/logger/), each one's options, and its python package (found
    without importing it: a missing mlflow is one line before torch loads)."""
    if command != "train" or "logger" not in c:
        return  # absent: a checkpoint written before trackers existed resumes without them
    trackers = _get(c, "logger")
    if trackers is None:
        return
    if not OmegaConf.is_dict(trackers):
        raise ConfigError(f"logger must be trackers chosen as a group (logger=tensorboard, logger=[tensorboard,mlflow],"
                          f" logger=none), got {trackers!r}")
    for name in trackers:
        if name not in TRACKERS:
            raise ConfigError(f"logger.{name} is not a tracker; trackers: {', '.join(TRACKERS)} (logger=many: all of "
                              "them; logger=[tensorboard,mlflow]: several)")
        options = _get(c, f"logger.{name}")
        if options is not None and not OmegaConf.is_dict(options):
            raise ConfigError(f"logger.{name} must be the tracker's options (choose it with logger={name}), "
                              f"got {options!r}")
        for key in options or {}:
            if key not in TRACKER_KEYS[name]:
                known = ", ".join(TRACKER_KEYS[name]) or "none"
                raise ConfigError(f"logger.{name}.{key} is not an option of {name} (its options: {known})")
    if "tensorboard" in trackers:
        for key in ("hparams", "images"):
            _check(c, f"logger.tensorboard.{key}", _is_bool, "true or false", optional=True)
    if "mlflow" in trackers:
        _check(c, "logger.mlflow.tracking_uri", lambda v: isinstance(v, str) and v != "",
               "null (a store in the run dir) or a tracking URI, e.g. http://localhost:5000", optional=True)
        _check(c, "logger.mlflow.store", _choice(MLFLOW_STORES), f"one of {list(MLFLOW_STORES)}", optional=True)
        _check(c, "logger.mlflow.experiment_name", lambda v: isinstance(v, str) and v != "", "a non-empty name",
               optional=True)
        _check(c, "logger.mlflow.run_name", lambda v: isinstance(v, str) and v != "",
               "null (the run dir's name) or a non-empty name", optional=True)
        _check(c, "logger.mlflow.artifacts", _is_bool, "true or false", optional=True)
    for name in trackers:
        module = TRACKER_MODULES[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(missing_tracker_message(name))


# One validator a section, run in this order: the first bad key is the one reported. Each decides
# for itself which commands use its keys. A new key goes into its section's validator.
SECTION_VALIDATORS: dict[str, Callable[[DictConfig, str], None]] = {
    "seed": _validate_top_level,
    "data": _validate_data,
    "model": _validate_model,
    "aug": _validate_aug,
    "eval": _validate_eval,
    "trainer (runtime)": _validate_runtime,
    "optimizer": _validate_optimizer,
    "scheduler": _validate_scheduler,
    "trainer": _validate_trainer,
    "logger": _validate_logger,
    "lr_find": _validate_lr_find,
    "gradcam": _validate_gradcam,
    "ckpt": _validate_ckpt,
    "predict": _validate_predict,
    "export": _validate_export,
    "serve": _validate_serve,
}


def validate(cfg: DictConfig, command: str) -> None:
    """Checks every key `command` uses; raises ConfigError naming the first bad one."""
    for check_section in SECTION_VALIDATORS.values():
        check_section(cfg, command)

