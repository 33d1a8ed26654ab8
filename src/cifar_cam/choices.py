"""The names a config may choose from, importable without torch.

`config.validate` checks a config against these before anything heavy is imported, so bad
input is refused in about a second; the modules that implement each choice import them from here.
"""

from __future__ import annotations

SOURCES = ("cifar10", "folder", "synthetic")  # data.source (data.py)
PRESETS = ("seed", "crop_flip", "none")  # aug.preset (augment.py)
BACKENDS = ("albumentations", "torch")  # aug.backend (augment.py)
MIX_MODES = ("mixup", "cutmix", "both")  # aug.mix (augment.py; null: off; both: one of the two per batch, evenly)
MODEL_NAMES = ("resnet18",)  # model.name (models/resnet.py: MODELS holds their builders)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # trainer.precision (engine.py)
STRATEGIES = ("auto", "single", "ddp")  # trainer.strategy (distributed.py)
# gradcam.method (cam/gradcam.py: METHODS, same order)
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
CAM_SELECT = ("most_confident", "first", "random", "correct")  # gradcam.select (tasks/gradcam.py)
INTERVALS = ("epoch", "step")  # scheduler.interval: when train.py steps the scheduler
SCHEDULER_SPANS = ("total_steps", "T_max")  # scheduler.span (or null): the argument bound to the run's length
