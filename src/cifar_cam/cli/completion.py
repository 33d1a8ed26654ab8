"""Shell completion for bash and zsh: `eval "$(cifar-cam --completion bash)"` installs a function that asks
`cifar-cam --complete` for the candidates (commands, then config keys and values, then paths)."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_cam.cli.commands import COMMANDS, UTILITIES, fail
from cifar_cam.io import config_dir

COMPLETION_SCRIPT = """# cifar-cam completion ({shell}): eval "$(cifar-cam --completion {shell})"
{prelude}_cifar_cam_complete() {{
    local IFS=$'\\n' cur="${{COMP_LINE:0:$COMP_POINT}}"
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" cifar-cam --complete 2>/dev/null))
    # bash also splits words at '=' and ':' (COMP_WORDBREAKS; zsh does not) and replaces only what follows them
    cur="${{cur##* }}"
    local breaks="${{COMP_WORDBREAKS//[^=:]}}"
    if [[ -n "$breaks" ]]; then
        local head="${{cur%"${{cur##*[$breaks]}}"}}"
        [[ -n "$head" ]] && COMPREPLY=("${{COMPREPLY[@]#"$head"}}")
    fi
    return 0
}}
complete -o nospace -o default -F _cifar_cam_complete cifar-cam
"""


ZSH_PRELUDE = "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"


def completion_script(shell: str) -> str:
    """The shell function that asks `cifar-cam --complete` for candidates (bash; zsh through bashcompinit)."""
    if shell not in ("bash", "zsh"):
        fail(None, f"shell completion is for bash or zsh, not '{shell}'")
    return COMPLETION_SCRIPT.format(shell=shell, prelude=ZSH_PRELUDE if shell == "zsh" else "")


def complete(line: str) -> list[str]:
    """Candidates for the last word of `line` (a shell's COMP_LINE up to the cursor): commands, then overrides."""
    words = line.split() + ([""] if not line or line[-1].isspace() else [])  # words[-1]: the word being completed
    if len(words) <= 2:
        prefix = words[-1] if len(words) == 2 else ""
        return [f"{c} " for c in [*COMMANDS, *UTILITIES] if c.startswith(prefix)]  # a command is a whole word
    command, word = words[1], words[-1]
    if command == "report":  # its arguments are run and sweep dirs
        return [f"{o} " for o in ("--out", "--help") if o.startswith(word)] if word.startswith("-") else _paths(word)
    if command == "cache":
        return [f"{o} " for o in ("--clear", "--help") if o.startswith(word)]
    if command not in COMMANDS:
        return []
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import create_config_search_path

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(config_dir()))
    found = BashCompletion(loader)._query(COMMANDS[command][0], " ".join(words[2:]))
    key, eq, value = word.partition("=")
    if not found and eq:  # no config value matches: a path (ckpt=outputs/train/..., data.root=...)
        return [f"{key}={p}" for p in _paths(value)]
    return found


def _paths(prefix: str) -> list[str]:
    """Files and folders whose path starts with `prefix`, folders with a trailing '/'."""
    start = prefix.rpartition("/")[2]
    folder = prefix[: len(prefix) - len(start)]
    try:
        entries = sorted(Path(folder or ".").expanduser().iterdir())
    except OSError:
        return []
    return [f"{folder}{p.name}" + ("/" if p.is_dir() else "") for p in entries
            if p.name.startswith(start) and (start.startswith(".") or not p.name.startswith("."))]


def answer_completion_query() -> None:
    """Prints the candidates for COMP_LINE up to COMP_POINT, as bash sets them for a completion function."""
    line = os.environ.get("COMP_LINE", "")
    print("\n".join(complete(line[: int(os.environ.get("COMP_POINT", len(line)))])))
