"""Config checks that run before any work starts: one validator a section, values only (no files, no torch).

Every check raises ConfigError with the key, the bad value and what would be valid; the CLI
prints it as one line and exits 2. What needs the disk (a calibration file, a plan, the data root) is
checked by the CLI's pre-check after these.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.config.checks import (
    a_path,
    check,
    choice,
    get,
    image_sizes,
    int_at_least,
    is_bool,
    is_int,
    is_list,
    is_number,
    number_in,
    positive,
)
from cifar_cam.config.choices import (
    AUG_REFERENCE_SIDE,
    BACKENDS,
    CAM_METHODS,
    CAM_SELECT,
    EVAL_PRECISIONS,
    INTERVALS,
    MIX_MODES,
    MLFLOW_STORES,
    MUON,
    PRECISIONS,
    PRESETS,
    RESIZE_POLICIES,
    SOURCES,
    STRATEGIES,
    TRACKER_KEYS,
    TRACKER_MODULES,
    TRACKERS,
    TTA_MODES,
    missing_tracker_message,
)
from cifar_cam.config.durations import time_budget_seconds
from cifar_cam.config.validate_model import validate_model
from cifar_cam.errors import ConfigError

EXPORT_FORMATS = ("onnx", "pt2")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DEFAULT_IMAGE_SIZE = 32  # CIFAR's own size: what every data source gives when data.image_size is not set


def image_hw(cfg: DictConfig) -> tuple[int, int]:
    """(height, width) of the images that load_data gives for `cfg` (data.image_size: a side or [H, W]; else 32)."""
    size = OmegaConf.select(cfg, "data.image_size", default=DEFAULT_IMAGE_SIZE)
    if OmegaConf.is_list(size) or isinstance(size, list | tuple):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def image_size(cfg: DictConfig) -> int:
    """The images' height (a square image's side): what trainer.progressive_resize and a plan's sizes measure."""
    return image_hw(cfg)[0]


TRAINING = ("train", "lr-find")  # the commands that take optimizer steps


def _validate_top_level(c: DictConfig, command: str) -> None:
    """seed, and the user's own labels (+tags.<name>=<value>)."""
    check(c, "seed", is_int, "an integer")
    tags = OmegaConf.select(c, "tags", default=None)
    if tags is None:
        return
    if not OmegaConf.is_dict(tags):
        raise ConfigError(f"tags must be labels given as +tags.<name>=<value>, got tags={tags!r}")
    for name, value in tags.items():
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"tags.{name} must be a word or a number (a label for the run), got {value!r}")


def _image_size_value(v: Any) -> bool:
    """A side >= 8, or [height, width] of two >= 8."""
    if is_list(v):
        return len(v) == 2 and all(is_int(s) and s >= 8 for s in v)
    return is_int(v) and v >= 8


def _fractions(v: Any) -> bool:
    return is_list(v) and len(v) == 3 and all(is_number(f) and f >= 0 for f in v) and v[2] > 0 and v[0] > 0


def _validate_data(c: DictConfig, command: str) -> None:
    """data.*: the keys of every source, then those of the chosen one (keys a source lacks are checked where
    present: a checkpoint written before a key existed still loads)."""
    check(c, "data.source", choice(SOURCES), f"one of {list(SOURCES)}")
    check(c, "data.batch_size", int_at_least(1), "an integer >= 1")
    check(c, "data.num_workers", lambda v: v == "auto" or (is_int(v) and v >= 0), "'auto' or an integer >= 0")
    check(c, "data.val_size", lambda v: (is_int(v) and v >= 0) or (isinstance(v, float) and 0 < v < 1),
           "a number of images >= 0 (0 = no validation split) or a fraction in (0, 1), e.g. 0.1")
    check(c, "data.subset", int_at_least(1), "null or an integer >= 1", optional=True)
    check(c, "data.sampler", lambda v: v == "balanced", "null or balanced", optional=True)
    source = get(c, "data.source")
    if source in ("folder", "csv"):
        check(c, "data.root", lambda v: isinstance(v, str) and v != "",
               "a folder or .tar/.tar.gz path" if source == "folder" else "a CSV file of path,label[,split]")
    if source in ("folder", "csv", "synthetic"):
        check(c, "data.image_size", _image_size_value, "a side (an integer >= 8) or [height, width] (each >= 8)")
    if "split" in c.data:
        check(c, "data.split", _fractions, "three fractions [train, val, test] with train and test > 0, "
                                            "e.g. [0.8,0.1,0.1]")
    if "resize" in c.data:
        check(c, "data.resize", choice(RESIZE_POLICIES), f"one of {list(RESIZE_POLICIES)}")
        check(c, "data.pad_fill", lambda v: (is_int(v) and 0 <= v <= 255) or (
            is_list(v) and len(v) == 3 and all(is_int(x) and 0 <= x <= 255 for x in v)),
            "a gray level 0..255 or [R, G, B]")
    for key in ("skip_bad_images", "cache"):
        if key in c.data:
            check(c, f"data.{key}", is_bool, "true or false")
    if "decode_workers" in c.data:
        check(c, "data.decode_workers", lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1")
    if source == "synthetic":
        check(c, "data.num_classes", int_at_least(2), "an integer >= 2")
        check(c, "data.train_size", int_at_least(2), "an integer >= 2")
        check(c, "data.test_size", int_at_least(1), "an integer >= 1")


def _validate_aug(c: DictConfig, command: str) -> None:
    """aug.*: presets differ in their keys, so probabilities, angles and pixels are checked by name."""
    check(c, "aug.preset", choice(PRESETS), f"one of {list(PRESETS)}")
    check(c, "aug.backend", choice(BACKENDS), f"one of {list(BACKENDS)}")
    for key in OmegaConf.to_container(c.aug) or {}:
        if key.endswith("_p"):
            check(c, f"aug.{key}", number_in(0, 1), "a probability in [0, 1]")
        elif key == "rotate_limit":
            check(c, "aug.rotate_limit", number_in(0, 180), "degrees in [0, 180]")
        elif key in ("cutout_size", "pad"):
            check(c, f"aug.{key}", int_at_least(0), "an integer >= 0 (pixels of a 32-pixel image)")
        elif key in ("mixup_alpha", "cutmix_alpha"):
            check(c, f"aug.{key}", positive, "a number > 0 (the Beta distribution's alpha)")
    check(c, "aug.mix", choice(MIX_MODES), f"null (off) or one of {list(MIX_MODES)}", optional=True)
    check_aug_sizes(OmegaConf.to_container(c.aug))  # a hole or padding that would not fit: here, not in a worker


def check_aug_sizes(aug: Any) -> None:
    """ConfigError for a crop padding or a Cutout hole that would not fit the 32-pixel image it is given for
    (the sizes scale with the image: data/aug_geometry.py)."""
    preset, side = aug.get("preset", "none"), AUG_REFERENCE_SIDE
    if preset == "crop_flip" and int(aug.get("pad", 0)) >= side:
        raise ConfigError(f"aug.pad={aug['pad']} must be smaller than {side} (pixels of a {side}-pixel image; it "
                          "scales with data.image_size)")
    if preset in ("seed", "crop_flip") and int(aug.get("cutout_size", 0)) > side:
        raise ConfigError(f"aug.cutout_size={aug['cutout_size']} is larger than the {side}-pixel image it is "
                          f"given for (it scales with data.image_size); use at most {side}")


def _validate_eval(c: DictConfig, command: str) -> None:
    """eval.*; eval.calibrate needs a val split to fit on (never the test set)."""
    check(c, "eval.batch_size", int_at_least(1), "an integer >= 1")
    check(c, "eval.tta", lambda v: isinstance(v, (bool, str)) and v in TTA_MODES,
          "true (the mean over the image and its mirror), false, or translate (also shifted a pixel each way)")
    check(c, "eval.precision", choice(EVAL_PRECISIONS), f"one of {list(EVAL_PRECISIONS)}", optional=True)
    if command != "eval" or OmegaConf.select(c, "eval.calibrate", default=None) is None:
        return  # absent: merged from a checkpoint's eval section, which has no calibrate key
    check(c, "eval.calibrate", is_bool, "true or false")
    if get(c, "eval.calibrate") and get(c, "data.val_size") == 0:
        raise ConfigError("eval.calibrate=true fits the temperature on the val split, but data.val_size=0: there "
                          "is none (the test set never calibrates: it would grade itself); calibrate a run trained "
                          "with data.val_size>0, keeping its data.val_size")


def _validate_runtime(c: DictConfig, command: str) -> None:
    """trainer.device, precision and threads: how every command runs, not only train."""
    check(c, "trainer.device", lambda v: isinstance(v, str) and bool(DEVICE_PATTERN.match(v)),
           "auto, cpu, cuda or cuda:N")
    check(c, "trainer.precision", choice(PRECISIONS), f"one of {list(PRECISIONS)}")
    check(c, "trainer.num_threads", lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1",
           optional=True)
    # Only where present: a checkpoint written before these keys existed resumes without them.
    if "stall_timeout" in c.trainer:
        check(c, "trainer.stall_timeout", lambda v: v == "auto" or positive(v),
               "'auto', null (off) or seconds > 0", optional=True)
    if "stop_grace" in c.trainer:
        check(c, "trainer.stop_grace", positive, "seconds > 0")
    if "progress_every" in c.trainer:
        check(c, "trainer.progress_every", positive, "null (off) or seconds > 0", optional=True)


def _validate_optimizer(c: DictConfig, command: str) -> None:
    """optimizer.*: the keys an optimizer class lacks (Adam's momentum) are checked only where present."""
    if command not in TRAINING:
        return
    check(c, "optimizer.lr", lambda v: v == "auto" or positive(v),
           "a number > 0 or 'auto' (run the LR range test first)")
    check(c, "optimizer._target_",
           lambda v: isinstance(v, str) and (v.startswith("torch.optim.") or v == MUON),
           f"a torch.optim class or {MUON}")
    if "weight_decay" in c.optimizer:
        check(c, "optimizer.weight_decay", number_in(0, float("inf")), "a number >= 0")
    if "momentum" in c.optimizer:
        check(c, "optimizer.momentum", number_in(0, 1, high_open=True), "a number in [0, 1)")
    if "aux_lr_scale" in c.optimizer:
        check(c, "optimizer.aux_lr_scale", positive, "a number > 0")
    if "nesterov" in c.optimizer:
        check(c, "optimizer.nesterov", is_bool, "true or false")
    if "ns_steps" in c.optimizer:
        check(c, "optimizer.ns_steps", int_at_least(1), "an integer >= 1")


def _validate_scheduler(c: DictConfig, command: str) -> None:
    """scheduler.interval: what the training run reads before it instantiates the rest."""
    if command not in TRAINING:
        return
    check(c, "scheduler.interval", choice(INTERVALS), "epoch or step")


def _validate_trainer(c: DictConfig, command: str) -> None:
    """trainer.* of the training loop (the runtime keys are _validate_runtime's)."""
    if command not in TRAINING:
        return
    check(c, "trainer.epochs", int_at_least(1), "an integer >= 1")
    check(c, "trainer.early_stopping.patience", int_at_least(1), "null (off) or an integer >= 1", optional=True)
    check(c, "trainer.early_stopping.min_delta", number_in(0, 1), "a fraction in [0, 1]")
    check(c, "trainer.label_smoothing", number_in(0, 1, high_open=True), "a number in [0, 1)")
    check(c, "trainer.log_every", lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1")
    check(c, "trainer.compile", is_bool, "true or false")
    check(c, "trainer.checkpoint_every", int_at_least(1), "an integer >= 1 (epochs between checkpoint writes)",
           optional=True)
    check(c, "trainer.channels_last", is_bool, "true or false")
    check(c, "trainer.deterministic", is_bool, "true or false")
    check(c, "trainer.strategy", choice(STRATEGIES), "auto, single or ddp", optional=True)
    check(c, "trainer.progressive_resize", image_sizes, "null or a list of image sizes (integers >= 8)",
           optional=True)
    _check_progressive_resize(c)
    check(c, "trainer.sync_batchnorm", is_bool, "true or false", optional=True)
    check(c, "trainer.ema.decay", number_in(0, 1, high_open=True), "null (off) or a number in [0, 1), e.g. 0.999",
           optional=True)
    check(c, "trainer.ema.warmup", is_bool, "true or false", optional=True)
    _check_budget(c)
    check(c, "trainer.grad_clip", positive, "null (off) or a number > 0 (the gradients' max global norm)",
           optional=True)


def _check_budget(c: DictConfig) -> None:
    """trainer.time_budget parses; trainer.plan names a file (the CLI's pre-check reads it: cli.precheck)."""
    time_budget_seconds(get(c, "trainer.time_budget"))
    check(c, "trainer.plan", lambda v: isinstance(v, str) and v != "", "null or a plan.json", optional=True)


def _check_progressive_resize(c: DictConfig) -> None:
    """trainer.progressive_resize against trainer.epochs and the full image size."""
    sizes, epochs = get(c, "trainer.progressive_resize"), get(c, "trainer.epochs")
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
    if not (command == "lr-find" or (command == "train" and get(c, "optimizer.lr") == "auto")):
        return
    check(c, "lr_find.start_lr", positive, "a number > 0")
    check(c, "lr_find.end_lr", lambda v: is_number(v) and v > get(c, "lr_find.start_lr"),
           f"a number > lr_find.start_lr ({get(c, 'lr_find.start_lr')})")
    check(c, "lr_find.num_iter", int_at_least(2), "an integer >= 2")


def _validate_gradcam(c: DictConfig, command: str) -> None:
    """gradcam.*."""
    if command != "gradcam":
        return
    check(c, "gradcam.num_images", int_at_least(1), "an integer >= 1")
    check(c, "gradcam.method", choice(CAM_METHODS), f"one of {list(CAM_METHODS)}")
    check(c, "gradcam.methods", lambda v: is_list(v) and len(v) > 0 and all(m in CAM_METHODS for m in v),
           f"null or a non-empty list of {list(CAM_METHODS)}, e.g. [gradcam,layercam]", optional=True)
    check(c, "gradcam.select", choice(CAM_SELECT), f"one of {list(CAM_SELECT)}")
    check(c, "gradcam.classes", lambda v: is_list(v) and len(v) > 0 and all(isinstance(x, str) for x in v),
           "null or a non-empty list of class names, e.g. [cat,dog]", optional=True)
    check(c, "gradcam.target", is_bool, "true or false")
    check(c, "gradcam.aug_smooth", is_bool, "true or false", optional=True)
    check(c, "gradcam.eigen_smooth", is_bool, "true or false", optional=True)
    check(c, "gradcam.metrics", is_bool, "true or false", optional=True)
    check(c, "gradcam.target_layers", lambda v: isinstance(v, (list, tuple)) or OmegaConf.is_list(v),
           "a list of layer names, e.g. [layer3,layer4]", optional=True)


def _validate_predict(c: DictConfig, command: str) -> None:
    """predict.* and inputs."""
    if command != "predict":
        return
    check(c, "predict.split", choice(("train", "val", "test")), "null or one of train, val, test", optional=True)
    if OmegaConf.select(c, "predict.split", default=None) is None:
        if OmegaConf.is_missing(c, "inputs"):
            raise ConfigError("predict needs inputs=...: an image, a folder, a .tar.gz, a glob, or a list "
                              "[a.png,dir/] (or predict.split=test: the checkpoint's own test images)")
        check(c, "inputs", lambda v: (isinstance(v, str | int | float) and str(v) != "")  # inputs=2024: a folder
               or (OmegaConf.is_list(v) and len(v) > 0), "a path, a glob, or a non-empty list of them")
    check(c, "predict.topk", int_at_least(1), "an integer >= 1")
    check(c, "predict.batch_size", int_at_least(1), "an integer >= 1")
    check(c, "predict.cam", is_bool, "true or false")
    check(c, "predict.layer", lambda v: isinstance(v, str) and v != "", "a module name, e.g. layer4 (null: the "
           "model's feature layer)", optional=True)
    check(c, "predict.max_pixels", int_at_least(1), "an integer >= 1")
    check(c, "predict.contact_sheet", int_at_least(0), "an integer >= 0")
    check(c, "predict.calibration", a_path,
           "null or a calibration.json / an eval run dir", optional=True)


def _validate_export(c: DictConfig, command: str) -> None:
    """export.*."""
    if command != "export":
        return
    formats = get(c, "export.formats")
    if not (OmegaConf.is_list(formats) and len(formats) and all(f in EXPORT_FORMATS for f in formats)):
        raise ConfigError(f"export.formats={formats} must be a non-empty list of {list(EXPORT_FORMATS)}, "
                          "e.g. [onnx,pt2]")
    check(c, "export.check", is_bool, "true or false")
    check(c, "export.check_images", int_at_least(1), "null (the whole test set) or an integer >= 1", optional=True)
    check(c, "export.tolerance", positive, "a number > 0")
    check(c, "export.quantize", lambda v: v == "int8", "null or int8", optional=True)
    if get(c, "export.quantize") == "int8" and "onnx" not in formats:
        raise ConfigError("export.quantize=int8 quantizes the ONNX model: add onnx to export.formats")
    check(c, "export.calibration_images", int_at_least(1), "an integer >= 1")
    check(c, "export.opset", int_at_least(17), "an integer >= 17")
    check(c, "export.calibration", a_path,
           "null or a calibration.json / an eval run dir", optional=True)


def _validate_serve(c: DictConfig, command: str) -> None:
    """serve.*."""
    if command != "serve":
        return
    check(c, "serve.host", lambda v: isinstance(v, str) and v != "", "a host name or address, e.g. 127.0.0.1")
    check(c, "serve.port", lambda v: is_int(v) and 0 <= v <= 65535, "an integer in [0, 65535] (0: any free port)")
    check(c, "serve.workers", int_at_least(1), "an integer >= 1")
    check(c, "serve.api_key", lambda v: isinstance(v, str) and v != "", "null or a non-empty string", optional=True)
    check(c, "serve.max_batch", int_at_least(1), "an integer >= 1")
    check(c, "serve.max_wait_ms", lambda v: is_number(v) and v >= 0, "a number of milliseconds >= 0")
    check(c, "serve.max_batch_images", int_at_least(1), "an integer >= 1")
    check(c, "serve.max_upload_mb", positive, "a number > 0")
    check(c, "serve.max_pixels", int_at_least(1), "an integer >= 1")
    check(c, "serve.topk", int_at_least(1), "an integer >= 1")
    check(c, "serve.gallery", lambda v: isinstance(v, str) and v != "", "null or a gradcam run dir", optional=True)
    check(c, "serve.calibration", a_path,
           "null or a calibration.json / an eval run dir", optional=True)
    check(c, "serve.max_queue", int_at_least(1), "an integer >= 1 (images waiting for a forward pass)")
    check(c, "serve.timeout_s", positive, "a number of seconds > 0")
    check(c, "serve.metrics", is_bool, "true or false")
    check(c, "serve.metrics_key", is_bool, "true or false")
    check(c, "serve.access_log", lambda v: isinstance(v, str) and v != "",
           "null (off), - (standard output) or a file (relative: in the run dir)", optional=True)
    check(c, "serve.drain_s", lambda v: is_number(v) and v >= 0, "a number of seconds >= 0")


def _validate_look(c: DictConfig, command: str) -> None:
    """look.*: what `cifar-cam data` draws."""
    if command != "data":
        return
    check(c, "look.samples_per_class", int_at_least(1), "an integer >= 1")
    check(c, "look.max_classes", int_at_least(1), "an integer >= 1")
    check(c, "look.augmented", int_at_least(1), "an integer >= 1")


def _validate_ckpt(c: DictConfig, command: str) -> None:
    """ckpt: required by eval, gradcam, predict, export and serve."""
    if command not in ("eval", "gradcam", "predict", "export", "serve"):
        return
    if OmegaConf.is_missing(c, "ckpt"):
        raise ConfigError(f"{command} needs ckpt=PATH: a train run dir (uses its checkpoints/best.pt) or a .pt file"
                          + (", or an exported .onnx / .pt2" if command == "predict" else ""))
    check(c, "ckpt", lambda v: isinstance(v, str) and v != "", "a checkpoint file or a train run dir")


def _validate_logger(c: DictConfig, command: str) -> None:
    """logger.*: the trackers train writes to (conf/logger/), each one's options, and its python package (found
    without importing it: a missing mlflow is one line before torch loads)."""
    if command != "train" or "logger" not in c:
        return  # absent: a checkpoint written before trackers existed resumes without them
    trackers = get(c, "logger")
    if trackers is None:
        return
    if not OmegaConf.is_dict(trackers):
        raise ConfigError(f"logger must be trackers chosen as a group (logger=tensorboard, logger=[tensorboard,mlflow],"
                          f" logger=none), got {trackers!r}")
    for name in trackers:
        if name not in TRACKERS:
            raise ConfigError(f"logger.{name} is not a tracker; trackers: {', '.join(TRACKERS)} (logger=many: all of "
                              "them; logger=[tensorboard,mlflow]: several)")
        options = get(c, f"logger.{name}")
        if options is not None and not OmegaConf.is_dict(options):
            raise ConfigError(f"logger.{name} must be the tracker's options (choose it with logger={name}), "
                              f"got {options!r}")
        for key in options or {}:
            if key not in TRACKER_KEYS[name]:
                known = ", ".join(TRACKER_KEYS[name]) or "none"
                raise ConfigError(f"logger.{name}.{key} is not an option of {name} (its options: {known})")
    if "tensorboard" in trackers:
        for key in ("hparams", "images"):
            check(c, f"logger.tensorboard.{key}", is_bool, "true or false", optional=True)
    if "mlflow" in trackers:
        check(c, "logger.mlflow.tracking_uri", lambda v: isinstance(v, str) and v != "",
               "null (a store in the run dir) or a tracking URI, e.g. http://localhost:5000", optional=True)
        check(c, "logger.mlflow.store", choice(MLFLOW_STORES), f"one of {list(MLFLOW_STORES)}", optional=True)
        check(c, "logger.mlflow.experiment_name", lambda v: isinstance(v, str) and v != "", "a non-empty name",
               optional=True)
        check(c, "logger.mlflow.run_name", lambda v: isinstance(v, str) and v != "",
               "null (the run dir's name) or a non-empty name", optional=True)
        check(c, "logger.mlflow.artifacts", is_bool, "true or false", optional=True)
    for name in trackers:
        module = TRACKER_MODULES[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(missing_tracker_message(name))


# One validator a section, run in this order: the first bad key is the one reported. Each decides
# for itself which commands use its keys. A new key goes into its section's validator.
SECTION_VALIDATORS: dict[str, Callable[[DictConfig, str], None]] = {
    "seed": _validate_top_level,
    "data": _validate_data,
    "model": validate_model,
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
    "look": _validate_look,
}


def validate(cfg: DictConfig, command: str) -> None:
    """Checks every key `command` uses; raises ConfigError naming the first bad one."""
    for check_section in SECTION_VALIDATORS.values():
        check_section(cfg, command)

