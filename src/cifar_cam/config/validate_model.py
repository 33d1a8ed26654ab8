"""model.* and the fine-tuning keys: what each architecture's YAML (conf/model/) may hold, checked before torch
loads. A timm / torchvision name is checked when the model is built (that needs the library)."""

from __future__ import annotations

from omegaconf import DictConfig

from cifar_cam.config.checks import a_path, check, choice, int_at_least, is_bool, is_int, is_list, number_in, positive
from cifar_cam.config.choices import MODEL_META_KEYS, MODEL_NAMES, MODEL_OPTIONS, MODEL_SOURCES
from cifar_cam.errors import ConfigError


def validate_model(c: DictConfig, command: str) -> None:
    """model.*: the keys of the chosen architecture (each model=<option> YAML has only its own), pretrained, freeze.
    A timm / torchvision name is checked against the library when the model is built (it needs torch)."""
    m = c.model
    source = m.get("source") or "cifar_cam"
    check(c, "model.source", choice(MODEL_SOURCES), f"one of {list(MODEL_SOURCES)}", optional=True)
    if source == "cifar_cam":
        check(c, "model.name", choice(MODEL_NAMES), f"one of {list(MODEL_NAMES)} (or model=timm / "
               "model=torchvision with model.name=<any of theirs>)")
    else:
        check(c, "model.name", a_path, f"a {source} model name")
    takes = MODEL_OPTIONS.get(str(m.name) if source == "cifar_cam" else source, ())
    extra = [k for k in m if k not in MODEL_META_KEYS and k not in takes]
    if extra:  # a +key another architecture's YAML has (model.dropout of wide_resnet on resnet18)
        named = f"model={m.name}" if source == "cifar_cam" else f"model={source}"
        raise ConfigError(f"{named} does not take model.{extra[0]}; nothing would read it (it takes "
                          f"{', '.join('model.' + k for k in takes) or 'no options'})")
    for key in ("width", "depth", "widen"):
        if key in m:
            check(c, f"model.{key}", int_at_least(1), "an integer >= 1")
    if "depth" in m and m.get("name") == "wide_resnet" and ((m.depth - 4) % 6 or m.depth < 10):
        raise ConfigError(f"model.depth must be 6n + 4 for wide_resnet (10, 16, 22, 28, 40, ...), got {m.depth}")
    if "dropout" in m:
        check(c, "model.dropout", number_in(0.0, 1.0, high_open=True), "a number in [0, 1)")
    if "widths" in m:
        check(c, "model.widths", lambda v: is_list(v) and len(v) == 3 and all(is_int(w) and w >= 1 for w in v),
               "three integers >= 1, e.g. [64,256,256]")
    if "small_input" in m:
        check(c, "model.small_input", lambda v: v == "auto" or is_bool(v), "auto, true or false")
    check(c, "model.cam_layers", lambda v: v == "auto" or (is_list(v) and len(v) > 0 and
                                                            all(isinstance(x, str) for x in v)),
           "a list of module names, e.g. [layer3,layer4], or auto", optional=True)
    pretrained = m.get("pretrained")
    if pretrained is True or str(pretrained).lower() == "true":
        raise ConfigError("model.pretrained=true would download weights, which cifar-cam never does; pass a local "
                          "file: model.pretrained=<run dir | .pt | .pth | .safetensors | .bin>")
    if pretrained == "required":  # experiment=finetune: the preset needs weights to fine-tune
        raise ConfigError("model.pretrained is required by this preset: pass model.pretrained=<run dir | .pt | .pth | "
                          ".safetensors | .bin>")
    check(c, "model.pretrained", a_path, "a path (a run dir, .pt, .pth, .safetensors or .bin)", optional=True)
    check(c, "model.freeze", lambda v: v in ("none", "backbone") or (is_list(v) and len(v) > 0 and
                                                                    all(isinstance(x, str) for x in v)),
           "none, backbone, or a list of module names, e.g. [conv1,layer1]", optional=True)
    for key in ("backbone_lr_scale", "bias_lr_scale"):
        if c.optimizer.get(key) is not None:
            check(c, f"optimizer.{key}", positive, "a number > 0")
