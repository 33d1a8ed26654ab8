"""The names a config may choose from, importable without torch.

`config.validate` checks a config against these before anything heavy is imported, so bad
input is refused in about a second; the modules that implement each choice import them from here.
"""

from __future__ import annotations

SOURCES = ("cifar10", "cifar100", "folder", "csv", "synthetic")  # data.source (data/sources.py)
RESIZE_POLICIES = ("stretch", "crop", "pad")  # data.resize (data/decode.py: Fit)
SAMPLERS = ("balanced",)  # data.sampler, or null (data/batches.py: balanced_weights)
AUG_REFERENCE_SIDE = 32  # aug.pad and aug.cutout_size are pixels of an image this size; they scale with the image
PRESETS = ("seed", "crop_flip", "none")  # aug.preset (data/augment.py)
BACKENDS = ("albumentations", "torch")  # aug.backend (data/augment.py, data/device_augment.py)
MIX_MODES = ("mixup", "cutmix", "both")  # aug.mix (data/mix.py; null: off; both: one of the two per batch, evenly)
# model.name of the architectures of our own (models/zoo.py: ARCHITECTURES holds their builders); model.source
# timm / torchvision take any name of those libraries
MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "preact_resnet18", "wide_resnet", "resnet9", "airbench")
MODEL_SOURCES = ("cifar_cam", "timm", "torchvision")
# the builder's options each architecture takes (models/zoo.py: `takes`, from the builders' signatures; a test keeps
# the two equal), and the model.* keys the rest of cifar-cam reads (models/zoo.py: META_KEYS)
MODEL_OPTIONS = {"resnet18": ("width",), "resnet34": ("width",), "resnet50": ("width",),
                 "preact_resnet18": ("width",), "wide_resnet": ("depth", "widen", "dropout"), "resnet9": ("width",),
                 "airbench": ("widths",), "timm": ("small_input",), "torchvision": ("small_input",)}
MODEL_META_KEYS = ("name", "source", "cam_layers", "pretrained", "freeze")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # trainer.precision (training/device.py)
STRATEGIES = ("auto", "single", "ddp")  # trainer.strategy (training/distributed.py)
# gradcam.method (explain/cam.py: METHODS, same order)
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
CAM_SELECT = ("most_confident", "first", "random", "correct")  # gradcam.select (tasks/gradcam.py)
# eval.tta (training/engine.py: tta_logits): its forward passes an image, and what a log line of an accuracy adds
TTA_MODES = {False: (1, ""), True: (2, ", flip TTA"), "translate": (6, ", flip + translate TTA")}
EVAL_PRECISIONS = ("fp32", "bf16", "fp16")  # eval.precision: every reported accuracy is computed at it
INTERVALS = ("epoch", "step")  # scheduler.interval: when the training run steps the scheduler
MUON = "cifar_cam.training.optim.Muon"  # optimizer=muon's _target_ (training/optim.py)

# The trackers `logger=` may choose (conf/logger/<name>.yaml nests its keys under logger.<name>), the options each
# takes, and the python module each needs (checked importable before torch loads); training/trackers.py writes them.
TRACKERS = ("tensorboard", "mlflow", "csv")
TRACKER_KEYS = {
    "tensorboard": ("hparams", "images"),
    "mlflow": ("tracking_uri", "store", "experiment_name", "run_name", "artifacts"),
    "csv": (),
}
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "csv": None}
INSTALL_HINTS = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'cifar-cam[mlflow]'"}
MLFLOW_STORES = ("sqlite", "file")  # logger.mlflow.store: the run dir's store when tracking_uri is null


def missing_tracker_message(name: str) -> str:
    """The one line for a tracker whose python package is not installed."""
    return f"logger={name} needs {TRACKER_MODULES[name]}: {INSTALL_HINTS[name]}"
