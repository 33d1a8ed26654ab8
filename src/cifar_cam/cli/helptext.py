"""`cifar-cam <command> --help` and the did-you-mean of an unknown key, from the configs themselves.

A key's description is the comment beside it in its YAML file (`batch_size: 128  # images per step`),
with the comment lines aligned under it; so the configs stay the one place a key is documented.
No torch here: help and typos are answered in about a second.
"""

from __future__ import annotations

import difflib
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.config.recipe import hydra_value, leaves
from cifar_cam.io import config_dir

# The keys each command uses (a section, or one key of it); --help shows these and no others.
_RUNTIME = ("trainer.device", "trainer.precision", "trainer.num_threads", "trainer.deterministic")
HELP_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("ckpt", "seed", "data", "model", "aug", "optimizer", "scheduler", "trainer", "eval", "lr_find", "logger"),
    "lr-find": ("ckpt", "seed", "data", "model", "aug", "optimizer", *_RUNTIME, "trainer.channels_last",
                "trainer.label_smoothing", "trainer.stall_timeout", "trainer.stop_grace", "lr_find"),
    "eval": ("ckpt", "seed", "data", "eval", *_RUNTIME),
    "gradcam": ("ckpt", "seed", "data", "gradcam", "eval.batch_size", *_RUNTIME),
    "predict": ("ckpt", "inputs", "predict", *_RUNTIME),
    "export": ("ckpt", "data.root", "export", "trainer.device", "trainer.num_threads"),
    "serve": ("ckpt", "serve", *_RUNTIME),
    "data": ("ckpt", "seed", "data", "aug", "look", *_RUNTIME),
}
# Config groups whose files describe keys (experiment presets and sweeps set keys, they do not define them)
NOT_DOCUMENTING = {"experiment", "hparams_search", "hydra"}
PRESET_GROUPS = {"experiment", "hparams_search"}

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")
_COMMENT = re.compile(r"(?:^|\s)#\s?(?P<text>.*)$")
_COMMENT_LINE = re.compile(r"^(?P<indent>\s*)#\s?(?P<text>.*)$")


def parse_descriptions(text: str, prefix: str = "") -> dict[str, str]:
    """{dotted key: its comment, or ''} of one YAML file; comment lines aligned with a key's comment continue it."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings we are in
    last: tuple[str, int] | None = None  # (key, column of its comment) that a comment line may continue
    for line in text.splitlines():
        comment_line = _COMMENT_LINE.match(line)
        if comment_line:
            column = len(comment_line["indent"])
            if last is not None and column == last[1]:
                found[last[0]] += " " + comment_line["text"].strip()
            else:
                last = None
            continue
        m = _KEY.match(line)
        if not m:
            last = None
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([*(k for _, k in stack), m["key"]])
        value_and_comment = m["rest"]
        comment = _COMMENT.search(value_and_comment)
        value = value_and_comment[: comment.start()] if comment else value_and_comment
        if not value.strip():
            stack.append((indent, m["key"]))
        found[prefix + key] = comment["text"].strip() if comment else ""
        if comment and comment["text"].strip():
            last = (prefix + key, line.index("#", len(m["indent"]) + len(m["key"]) + 1 + len(value)))
        else:
            last = None
    return found


def descriptions() -> dict[str, dict[str, str]]:
    """{dotted key: {source: description}}; source is 'group/option' for a group file, else the file's stem."""
    root = Path(config_dir())
    docs: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.yaml")):
        parts = path.relative_to(root).parts
        if parts[0] in NOT_DOCUMENTING:
            continue
        group = parts[0] if len(parts) == 2 else None
        source = f"{group}/{path.stem}" if group else path.stem
        for key, text in parse_descriptions(path.read_text(), f"{group}." if group else "").items():
            if key.split(".")[0] in ("hydra", "defaults"):
                continue
            docs.setdefault(key, {})[source] = text
    return docs


def describe(key: str, config_name: str, choices: dict[str, str], docs: dict[str, dict[str, str]],
             own_file: bool = False) -> str | None:
    """The description of `key`: from the file of the chosen group option (or, for a top-level key, the
    command's main config, then common.yaml), else (unless `own_file`) from any file that describes it."""
    sources = docs.get(key)
    if not sources:
        return None
    group = key.split(".", 1)[0]
    preferred = [f"{group}/{choices.get(group)}", config_name, "common"]
    own = next((sources[s] for s in preferred if sources.get(s)), None)
    return own if own or own_file else next((text for text in sources.values() if text), None)


def shown_keys(command: str, cfg: DictConfig) -> list[tuple[str, Any]]:
    """The keys `command` uses, in config order, without Hydra's own (`_target_`, `_partial_`)."""
    wanted = HELP_KEYS[command]
    return [(k, v) for k, v in leaves(OmegaConf.to_container(cfg, resolve=False))
            if any(k == w or k.startswith(w + ".") for w in wanted) and not k.rsplit(".", 1)[-1].startswith("_")
            and v != {}]  # an empty section (logger=none) has no keys to show


def _shown(key: str, value: Any, cfg: DictConfig) -> tuple[str, str]:
    """`key=value` as typed on a command line, the value resolved ('${optimizer.lr}' -> 0.05); and the
    interpolation, if any, for the description."""
    if isinstance(value, str) and "${" in value:
        try:
            return f"{key}={hydra_value(OmegaConf.select(cfg, key))}", f" [{value}]"
        except Exception:  # does not resolve here (a missing env var): shown as written
            return f"{key}={value}", ""
    return f"{key}={'???' if value == '???' else hydra_value(value)}", ""


def group_options() -> dict[str, list[str]]:
    """{group: its options} of the config dir (hydra's own groups left out)."""
    root = Path(config_dir())
    return {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in sorted(root.iterdir())
            if p.is_dir() and p.name != "hydra"}


def render(command: str, summary: str, cfg: DictConfig, choices: dict[str, str], width: int | None = None) -> str:
    """The --help text of `command`: usage, the config groups with their options, every key it uses."""
    width = width or min(120, shutil.get_terminal_size((100, 24)).columns)
    docs = descriptions()
    lines = [f"usage: cifar-cam {command} [group=option ...] [key=value ...] [-m] [--cfg job] [--help]", "",
             summary, "", "config groups (group=option; * marks the choice in effect):"]
    options = group_options()
    used = {k.split(".", 1)[0] for k in HELP_KEYS[command]} | PRESET_GROUPS
    for group, names in options.items():
        if group not in used:
            continue
        chosen = choices.get(group)
        shown = " ".join(f"{n}*" if n == chosen else n for n in names)
        lines.append(f"  {group:<15} {shown}" + ("   (none chosen)" if chosen is None else ""))
    lines += ["", "keys (key=value, with the value in effect):"]
    from cifar_cam.cli.commands import COMMANDS

    config_name = COMMANDS[command][0]
    rows = []
    for key, value in shown_keys(command, cfg):
        name, interpolation = _shown(key, value, cfg)
        rows.append((name, (describe(key, config_name, choices, docs) or "") + interpolation))
    left = min(40, max(len(r[0]) for r in rows) + 2)
    for name, text in rows:
        indent = " " * (left + 2)
        if len(name) + 2 > left:  # a long value: the description on the next line
            lines.append(f"  {name}")
            lines += textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent) if text else []
        else:
            wrapped = textwrap.wrap(text, width, initial_indent=" " * 2 + name.ljust(left), subsequent_indent=indent)
            lines += wrapped or [f"  {name}"]
    lines += ["", f"configs: {config_dir()}; `--cfg job` prints the composed config; `--hydra-help` Hydra's flags"]
    return "\n".join(lines)


def known_keys(cfg: DictConfig) -> dict[str, list[str]]:
    """{dotted key: []} of `cfg`, plus the keys only other options of its groups have: {key: ['group=option', ...]}."""
    keys: dict[str, list[str]] = {k: [] for k, _ in leaves(OmegaConf.to_container(cfg, resolve=False))}
    for key, sources in descriptions().items():
        options = [s.replace("/", "=") for s in sources if "/" in s]
        if key not in keys and options:
            keys[key] = options
    return {k: v for k, v in keys.items() if not k.rsplit(".", 1)[-1].startswith("_")}


def did_you_mean(key: str, keys: dict[str, list[str]], n: int = 5) -> list[str]:
    """Keys close to `key`: spelled alike, or with a word of its last part in the same section
    (data.size -> data.image_size). Keys of this config first, then those other group options have, named
    with them: 'data.image_size (with data=folder)'."""
    section, _, last = key.rpartition(".")
    words = set(last.split("_"))
    close = difflib.get_close_matches(key, list(keys), n=n, cutoff=0.75)
    same_word = [k for k in keys if k.rpartition(".")[0] == section and words & set(k.rpartition(".")[2].split("_"))]
    ranked = list(dict.fromkeys([*close, *same_word]))
    ranked.sort(key=lambda k: (bool(keys[k]), -len(keys[k])))  # stable: closeness within each kind
    if keys.get(key):  # the key exists, with another group option: that first
        ranked = [key, *(k for k in ranked if k != key)]
    def options(names: list[str]) -> str:
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    return [k if not keys[k] else f"{k} (with {options(keys[k])})" for k in ranked[:n]]
