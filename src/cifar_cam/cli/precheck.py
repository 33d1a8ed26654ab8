"""The pre-check: before Hydra starts (and before torch loads), the config is composed as Hydra will, a checkpoint's
stored config merged in, every value validated and every file the command needs looked at, so that bad input is
one line and exit 2 in about a second. Also `--help`, which composes the same way."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from cifar_cam.cli.commands import COMMANDS, PipeSafe, fail
from cifar_cam.config.merge import CHECKPOINT_CONFIG_COMMANDS, sections_for
from cifar_cam.errors import CifarCamError
from cifar_cam.io import config_dir


def _sweep_variants(overrides: list[str], limit: int = 100) -> list[list[str]]:
    """Jobs that together use every value of every swept key once (not the whole product), for the pre-check.

    The first holds the first value of each swept key; each further one changes one key to another value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first: list[str] = []
    swept: list[tuple[int, str, list[str]]] = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval() sweeps (Optuna) cannot be enumerated: check the rest
                continue
            if not values:
                continue
            swept.append((len(first), o.get_key_element(), values))
            first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    variants = [first]
    for position, key, values in swept:
        for value in values[1:]:
            variant = list(first)
            variant[position] = f"{key}={value}"
            variants.append(variant)
    return variants[:limit]


def sweep_without_multirun(overrides: list[str]) -> str | None:
    """The first override that lists several values (a=1,2: a sweep), for a command line without -m; else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # bad grammar: the pre-check says so in its own words
        return None
    return next((o.input_line for o in parsed if o.is_sweep_override()), None)


def explain_hydra_error(e: Exception, config_name: str, overrides: list[str]) -> str:
    """Turns Hydra's multi-line composition errors into one actionable line."""
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        hint = ""
        try:
            from hydra import compose, initialize_config_dir

            from cifar_cam.cli.helptext import did_you_mean, known_keys

            groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and o[0] not in "+~"]
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                try:
                    cfg = compose(config_name, overrides=groups)  # data=folder: the keys of folder
                except Exception:
                    cfg = compose(config_name)
            close = did_you_mean(key, known_keys(cfg))
            hint = f"; did you mean {', '.join(close)}?" if close else ""
        except Exception:  # a hint is a courtesy: the error line stands without it
            pass
        return f"unknown config key '{key}'{hint} (a label of your own for the run: +tags.<name>=<value>)"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, choice = m.group(1), m.group(2)
        options = sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
        if options:
            return f"unknown choice {group}={choice}; choose one of: {', '.join(options)}"
        return f"unknown config group '{group}' (in {group}={choice})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"bad override ({first})"


def precheck(command: str, overrides: list[str], machine: bool = True) -> Any:
    """Composes the config as Hydra will and validates it; one line and exit 2 on any problem.

    `machine`: also check what needs torch or the disk (check_files); --cfg checks the config only.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cifar_cam.config.keys import check_added_keys
    from cifar_cam.config.validate import validate

    config_name = COMMANDS[command][0]
    checked: set[tuple[str, str]] = set()  # (what, path): data roots and files are checked once
    first_cfg = None
    try:
        variants = _sweep_variants(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(command, explain_hydra_error(e, config_name, overrides))
    for single in variants:
        try:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=command):
                cfg = compose(config_name, overrides=single)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            fail(command, explain_hydra_error(e, config_name, overrides))
        try:
            check_added_keys(single, cfg)  # +model.pretrained=x: nothing would read it
            cfg = with_checkpoint_config(command, cfg, single)  # validated as merged
            first_cfg = cfg if first_cfg is None else first_cfg
            validate(cfg, command)  # torch is imported only past this line: bad keys are refused in ~1 s
            if machine:
                typed = any(o.split("=", 1)[0].lstrip("+~") == "data.root" for o in single)
                check_files(command, cfg, checked, root_typed=typed)
        except CifarCamError as e:
            fail(command, str(e), e.exit_code)
    return first_cfg


CALIBRATION_KEYS = {"predict": "predict.calibration", "export": "export.calibration", "serve": "serve.calibration"}


def check_files(command: str, cfg: Any, checked: set[tuple[str, str]], root_typed: bool = True) -> None:
    """What a valid config names must be there: a calibration file, a plan, the model and inputs of predict, the
    device, the data root; CifarCamError (one line) for the first that is not. Each path is looked at once.
    `root_typed`: data.root came from the command line (else from a checkpoint, which the message says)."""
    from omegaconf import OmegaConf

    from cifar_cam.errors import ConfigError, DataError

    def once(what: str, path: Any) -> bool:
        key = (what, str(path))
        if key in checked:
            return False
        checked.add(key)
        return True

    calibration_key = CALIBRATION_KEYS.get(command)
    calibration = OmegaConf.select(cfg, calibration_key, default=None) if calibration_key else None
    if calibration is not None and once("calibration", calibration):
        from cifar_cam.explain.calibration import read_calibration

        read_calibration(calibration, calibration_key)
    if command == "train" and OmegaConf.select(cfg, "trainer.plan", default=None) and not cfg.get("ckpt"):
        check_plan_file(cfg)  # a resume continues the plan in its checkpoint
    if command == "predict":  # before torch loads: the model file and the inputs exist
        from cifar_cam.inference.inputs import check_inputs, check_model_file

        check_model_file(cfg.ckpt)
        if cfg.predict.get("split") is None:
            check_inputs(cfg.inputs)
    from cifar_cam.data.sources import check_root
    from cifar_cam.training.device import resolve_device

    library = OmegaConf.select(cfg, "model.source", default=None)
    if library in ("timm", "torchvision") and once("model", f"{library}:{cfg.model.name}"):
        from cifar_cam.models.external import check_name

        try:
            check_name(library, str(cfg.model.name))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    resolve_device(cfg.trainer.device)
    if command != "export" and cfg.data.source in ("folder", "csv") and once("root", cfg.data.root):
        # (export reports unreachable data itself: export.check=false exports without it)
        try:
            check_root(str(cfg.data.root), cfg.data.source)
        except DataError:
            if not root_typed and cfg.get("ckpt"):  # the checkpoint's own root, which the user never typed
                raise DataError(f"data.root={cfg.data.root} (from the checkpoint ckpt={cfg.ckpt}) does not exist "
                                "here; pass data.root=<where that data is now>") from None
            raise


def check_plan_file(cfg: Any) -> None:
    """trainer.plan is a plan file made for this config (the data size is checked once the data is loaded, the
    speed once it is probed); ConfigError naming the first fact that differs."""
    from omegaconf import OmegaConf

    from cifar_cam.config.validate import image_size
    from cifar_cam.errors import ConfigError
    from cifar_cam.training.budget.planner import Plan

    plan_path = cfg.trainer.plan
    plan = Plan.load(plan_path)
    for key, planned in (("data.batch_size", plan.run.batch_size), ("model.name", plan.run.model),
                         ("model.width", plan.run.width), ("data.image_size", plan.run.image_size)):
        value = image_size(cfg) if key == "data.image_size" else OmegaConf.select(cfg, key)
        if value != planned:
            raise ConfigError(f"trainer.plan={plan_path} was made for {key}={planned}, this run has {key}={value}; "
                              f"set {key}={planned}, or drop trainer.plan to plan anew")


def print_help(command: str, overrides: list[str]) -> None:
    """`cifar-cam <command> [overrides] --help`: the groups and keys in effect with those overrides, described."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from cifar_cam.cli.helptext import render
    from cifar_cam.config.recipe import choices_of

    config_name, _, summary = COMMANDS[command]
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=command):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(command, explain_hydra_error(e, config_name, overrides))
    choices = choices_of(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    sys.stdout = PipeSafe(sys.stdout)  # type: ignore[assignment]
    print(render(command, summary, cfg, choices))


def with_checkpoint_config(command: str, cfg: Any, overrides: list[str]) -> Any:
    """With `ckpt=`: the config the task will run with, the checkpoint's stored values merged in, checked
    (training.checkpoint.load_with_config, which the task calls again: the file is read once per process); a
    resume also by its rules (training.resume.check_resume)."""
    from omegaconf import OmegaConf

    if command not in CHECKPOINT_CONFIG_COMMANDS or not OmegaConf.select(cfg, "ckpt", default=None):
        return cfg  # no checkpoint to read: torch stays unloaded until the config has passed
    from cifar_cam.training.checkpoint import load_with_config, model_from_checkpoint

    payload, merged = load_with_config(cfg, command, overrides)
    if payload is None or command == "lr-find":  # lr-find starts from fresh weights
        return merged
    if command == "train":
        from cifar_cam.training.resume import check_resume

        check_resume(merged, payload)  # the weights fit, the run can continue
    else:
        model_from_checkpoint(payload)  # weights that do not fit: one line now, not after the data loads
    return merged


def inherit_choices(command: str, overrides: list[str]) -> list[str]:
    """Prepends the config-group choices stored in `ckpt=`'s checkpoint (data=..., model=...).

    `cifar-cam eval ckpt=RUN data.test_size=100` then composes against the data group the run
    was trained with; a group named on the command line still wins.
    """
    ckpt = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt=")), None)
    if command not in CHECKPOINT_CONFIG_COMMANDS or not ckpt:
        return overrides
    from cifar_cam.training.checkpoint import cached_checkpoint

    try:
        payload = cached_checkpoint(ckpt, "last" if command == "train" else "best")
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)
    sections = sections_for(command)
    groups = set(payload.get("choices", {})) if sections is None else {*sections, "experiment"} - {"eval"}
    if command not in ("train", "lr-find"):
        groups.discard("experiment")
    named = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    inherited = [f"{g}={c}" for g, c in payload.get("choices", {}).items() if g in groups and g not in named]
    return inherited + overrides
