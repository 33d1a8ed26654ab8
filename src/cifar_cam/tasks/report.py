"""`cifar-cam report <dirs...>`: one table, CSV and plot over the train jobs of sweeps or several runs.

A job is any directory holding `.hydra/overrides.yaml` (every run and sweep job has one). Its
result is `summary.json`; a job without one failed (its log's last ERROR line says why) or never
finished (killed, still running). Jobs whose overrides differ only in `seed` form one group,
summarized as mean ± sample std over its finished jobs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cifar_cam.errors import ConfigError
from cifar_cam.io import reserve_dir, write_csv
from cifar_cam.logs import console
from cifar_cam.provenance import short_commit

log = logging.getLogger("cifar_cam.report")

SUMMARY_FIELDS = ("best_val_acc", "test_acc", "test_loss", "best_epoch", "epochs_run", "stopped_early", "train_seconds",
                  "images_per_second")
JOB_FIELDS = ("job", "status", "group", "seed", *SUMMARY_FIELDS, "commit", "tags", "reason", "overrides")
GROUP_FIELDS = ("group", "n", "failed", "val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std",
                "train_seconds_mean", "tags", "jobs")
# overrides that do not define the configuration being compared (nor hydra.*, nor the user's labels, tags.*)
NOT_A_CONFIG = ("seed", "ckpt")


@dataclass
class Job:
    """One train run: where it is, how it was configured, and its summary.json (None if it has none)."""

    path: Path
    overrides: list[str]
    seed: int | None
    summary: dict[str, Any] | None
    status: str                     # done | failed | stopped | unfinished | not started
    reason: str = ""                # for failed / unfinished jobs: the log's last error or last line
    group: str = ""                 # the overrides that set this job apart from the others, seed excluded
    tags: dict[str, Any] = field(default_factory=dict)  # the user's labels (+tags.<name>=<value>)

    @property
    def tags_text(self) -> str:
        """'owner=ana note=baseline'."""
        return " ".join(f"{k}={v}" for k, v in self.tags.items())


@dataclass
class Group:
    """Jobs that differ only in seed, with the statistics of the finished ones."""

    label: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "done"]

    @property
    def tags_text(self) -> str:
        """Every label its jobs carry, once each."""
        return " ".join(dict.fromkeys(t for j in self.jobs for t in j.tags_text.split()))

    def values(self, key: str) -> list[float]:
        """`key` of summary.json over the finished jobs (missing or null values left out)."""
        return [float(j.summary[key]) for j in self.done if j.summary and j.summary.get(key) is not None]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1); std is None below two values, both None for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def find_jobs(paths: Iterable[str | Path]) -> list[Path]:
    """Every job dir at or below `paths` (a run dir, a sweep dir, or a folder of either), in order."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{given} is not a directory; pass sweep dirs (multirun/train/<time>) or run dirs")
        jobs = sorted({p.parent.parent for p in path.rglob(".hydra/overrides.yaml")}, key=_natural_key)
        if not jobs:
            raise ConfigError(f"{given} holds no runs (no .hydra/overrides.yaml below it); "
                              "pass a sweep dir (multirun/train/<time>) or train run dirs")
        found += [j for j in jobs if j not in found]
    return found


def _natural_key(path: Path) -> list[Any]:
    """multirun/.../2 before multirun/.../10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def read_job(path: Path) -> Job | None:
    """The job in `path`, or None when it is not a train run (eval, gradcam, lr-find dirs are skipped)."""
    overrides = [str(o) for o in (yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or [])]
    config_file = path / ".hydra" / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    if config.get("command", "train") != "train":
        return None
    seed = config.get("seed")
    tags = dict(config.get("tags") or {})
    summary_file = path / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            return Job(path, overrides, seed, None, "failed", "summary.json is not valid JSON", tags=tags)
        return Job(path, overrides, seed, summary, "done", tags=tags)
    status, reason = why_unfinished(path)
    return Job(path, overrides, seed, None, status, reason, tags=tags)


def why_unfinished(path: Path) -> tuple[str, str]:
    """('failed', the log's last ERROR message), ('stopped', its stop line: Ctrl-C / SIGTERM, resumable) or
    ('unfinished', the log's last line) for a job without results."""
    logs = sorted(path.glob("*.log"))
    if not logs:
        return "unfinished", "no log file: the job never started"
    lines = [line.rstrip() for line in logs[0].read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "[ERROR]" in line]
    if errors:
        return "failed", errors[-1].split("[ERROR]", 1)[1].strip()
    if not lines:
        return "unfinished", f"{logs[0].name} is empty: killed at start, or still starting"
    stops = [line for line in lines if "[WARNING]" in line and re.search(r"\bSIG\w+: stopped ", line)]
    if stops:
        return "stopped", stops[-1].split("[WARNING]", 1)[1].strip()
    last = re.sub(r"^\[[^\]]*\]\[[A-Z]+\]\s*", "", lines[-1])
    return "unfinished", f"killed or still running; last log line: {last}"


def never_started(sweep_dir: Path, job_dirs: Sequence[Path]) -> list[Job]:
    """Jobs of a grid sweep (basic sweeper: multirun.yaml) that have no directory: the sweep stopped before them."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return []
    hydra = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {})
    if not str(hydra.get("sweeper", {}).get("_target_", "")).endswith("BasicSweeper") or \
            hydra.get("job", {}).get("name") != "train" or hydra.get("sweep", {}).get("subdir") != "${hydra.job.num}":
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(hydra.get("overrides", {}).get("task", [])))
    expected = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    present = {d.resolve() for d in job_dirs}
    missing = []
    for number, overrides in enumerate(expected):
        path = sweep_dir / str(number)
        if path.resolve() not in present:
            seed = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")), None)
            missing.append(Job(path, list(overrides), seed, None, "not started",
                               "no job dir: the sweep stopped before this job (Ctrl-C, a killed launcher)"))
    return missing


def _is_config_override(override: str) -> bool:
    """False for overrides that do not define what is compared: seed, ckpt, hydra.*, tags.*."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key not in NOT_A_CONFIG and not key.startswith(("hydra.", "tags.")) and key != "tags"


def group_jobs(jobs: list[Job]) -> tuple[list[Group], list[str]]:
    """Groups jobs whose overrides differ only in seed; returns the groups and the overrides all jobs share."""
    configs = [[o for o in j.overrides if _is_config_override(o)] for j in jobs]
    common = [o for o in configs[0] if all(o in c for c in configs[1:])] if configs else []
    groups: dict[tuple[str, ...], Group] = {}
    for job, config in zip(jobs, configs, strict=True):
        own = tuple(sorted(o for o in config if o not in common))
        job.group = " ".join(own) if own else "(common config)"
        groups.setdefault(own, Group(job.group)).jobs.append(job)
    return list(groups.values()), common


def rank_groups(groups: list[Group]) -> list[Group]:
    """Best mean val accuracy first (test accuracy where there is no val split); groups without results last."""
    def score(g: Group) -> tuple[int, float]:
        val, _ = mean_std(g.values("best_val_acc"))
        test, _ = mean_std(g.values("test_acc"))
        value = val if val is not None else test
        return (0, -value) if value is not None else (1, 0.0)

    return sorted(groups, key=score)


def job_rows(jobs: list[Job], root: Path | None) -> list[dict[str, Any]]:
    """report.csv: one row a job, finished or not (accuracies as fractions)."""
    rows = []
    for j in jobs:
        s = j.summary or {}
        rows.append({
            "job": _display(j.path, root), "status": j.status, "group": j.group, "seed": j.seed,
            **{k: s.get(k) for k in SUMMARY_FIELDS}, "commit": short_commit(j.path), "tags": j.tags_text,
            "reason": j.reason, "overrides": " ".join(j.overrides),
        })
    return rows


def group_rows(groups: list[Group], root: Path | None) -> list[dict[str, Any]]:
    """report_groups.csv: one row a group, mean and sample std over its finished jobs."""
    rows = []
    for g in groups:
        val_mean, val_std = mean_std(g.values("best_val_acc"))
        test_mean, test_std = mean_std(g.values("test_acc"))
        seconds, _ = mean_std(g.values("train_seconds"))
        rows.append({
            "group": g.label, "n": len(g.done), "failed": len(g.jobs) - len(g.done),
            "val_acc_mean": val_mean, "val_acc_std": val_std, "test_acc_mean": test_mean, "test_acc_std": test_std,
            "train_seconds_mean": seconds, "tags": g.tags_text,
            "jobs": " ".join(_display(j.path, root) for j in g.jobs),
        })
    return rows


def _display(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def short_label(label: str) -> str:
    """A group label for the screen and the plot: floats to 4 significant digits (Optuna's lr=0.032130356...)."""
    words = []
    for word in label.split():
        key, sep, value = word.partition("=")
        try:
            number = float(value)
            if "." in value or "e" in value.lower():
                value = f"{number:.4g}"
        except ValueError:
            pass
        words.append(f"{key}{sep}{value}")
    return " ".join(words)


def _pct(mean: float | None, std: float | None = None) -> str:
    return " ".join(_pct_units(mean, std))


def _pct_units(mean: float | None, std: float | None = None) -> list[str]:
    """'82.00%', '± 2.83': a narrow column breaks the line between them, never inside a number."""
    if mean is None:
        return ["-"]
    return [f"{100 * mean:.2f}%"] + ([] if std is None else [f"± {100 * std:.2f}"])


@dataclass
class _Column:
    """A column of a screen table. Each cell is a list of units, joined by spaces; a line breaks only between units.

    `kind`: 'words' never breaks a unit (overrides, numbers); 'fold' may fold a unit longer than `floor`
    (paths, error messages) across lines. Columns grow from their minimum toward one line a cell in order of
    `priority` (lowest first).
    """

    header: str
    cells: list[list[str]]
    justify: str = "left"
    kind: str = "words"
    floor: int = 12
    priority: int = 1

    def minimum(self) -> int:
        unit = max((cell_len(u) for cell in self.cells for u in cell), default=1)
        if self.kind == "fold":
            unit = min(unit, self.floor)
        return max(unit, *(cell_len(w) for w in self.header.split()))

    def maximum(self) -> int:
        return max(self.minimum(), *(cell_len(" ".join(cell)) for cell in self.cells))


def _pack(units: list[str], width: int) -> str:
    """The units on as few lines of at most `width` cells as go; a unit wider than that alone on its line."""
    lines: list[str] = []
    for unit in units:
        if lines and cell_len(f"{lines[-1]} {unit}") <= width:
            lines[-1] += f" {unit}"
        else:
            lines.append(unit)
    return "\n".join(lines)


def _fit_table(columns: list[_Column], width: int, shrink: bool = False, **table_args: Any) -> Table | None:
    """A table at most `width` wide whose cells break only between units; None if the columns' minimums do not fit.

    With `shrink`, columns too wide for `width` are narrowed instead (units folded there), never cut off.
    """
    room = width - (3 * len(columns) + 1)  # the borders and a space each side of every cell
    widths = [c.minimum() for c in columns]
    most = [c.maximum() for c in columns]
    if sum(widths) > room:
        if not shrink:
            return None
        while sum(widths) > room and max(widths) > 1:
            widths[widths.index(max(widths))] -= 1
    spare = room - sum(widths)
    for level in sorted({c.priority for c in columns}):  # one more cell to each column of the level in turn
        while spare > 0 and (short := [i for i, c in enumerate(columns)
                                       if c.priority == level and widths[i] < most[i]]):
            for i in short[:spare]:
                widths[i] += 1
            spare -= len(short[:spare])
    table = Table(**table_args)
    for column, w in zip(columns, widths, strict=True):
        table.add_column(Text(column.header), justify=column.justify, width=w,  # type: ignore[arg-type]
                         overflow="fold")
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*(Text(_pack(cell, w)) for cell, w in zip(row, widths, strict=True)))
    return table


def print_tables(groups: list[Group], jobs: list[Job], common: list[str], title: str,
                 screen: Console | None = None) -> None:
    """The ranked groups, then every job that did not finish, on the terminal (or on `screen`).

    The tables fit the screen's width (80 columns when stdout is piped) without cutting anything: numbers and
    overrides are never broken across lines. Where the configs do not fit beside the numbers, the table
    lists them under it, one row a config, by #.
    """
    screen = screen or console()
    best_val, _ = mean_std(groups[0].values("best_val_acc")) if groups else (None, None)
    commits = sorted({short_commit(j.path) for j in jobs} - {""})
    caption = "; ".join(filter(None, [("shared overrides: " + " ".join(common)) if common else "",
                                      ("commit: " + ", ".join(commits)) if commits else ""]))
    ranks, configs, counts, vals, deltas, tests, seeds, seconds = ([] for _ in range(8))
    rank_of: dict[str, str] = {}
    for rank, g in enumerate(groups, 1):
        val_mean, val_std = mean_std(g.values("best_val_acc"))
        test_mean, test_std = mean_std(g.values("test_acc"))
        train_s, _ = mean_std(g.values("train_seconds"))
        failed = len(g.jobs) - len(g.done)
        per_seed = [f"{j.seed}: {_pct(j.summary.get('best_val_acc'))} / {_pct(j.summary.get('test_acc'))}"
                    for j in g.done if j.summary]
        rank_of[g.label] = str(rank)
        ranks.append([str(rank)])
        configs.append(short_label(g.label).split())
        counts.append([str(len(g.done))] + ([f"(+{failed} failed)"] if failed else []))
        vals.append(_pct_units(val_mean, val_std))
        deltas.append(["-" if val_mean is None or best_val is None else f"{100 * (val_mean - best_val):+.2f} pp"])
        tests.append(_pct_units(test_mean, test_std))
        seeds.append([s + "," for s in per_seed[:-1]] + per_seed[-1:] or ["-"])
        seconds.append(["-" if train_s is None else f"{train_s:.1f}"])
    rank = _Column("#", ranks, "right")
    config = _Column("config (seed aside)", configs, priority=1)
    numbers = [_Column("n", counts, "right", priority=0), _Column("val acc (mean ± std)", vals, "right", priority=0),
               _Column("Δ val vs best", deltas, "right", priority=0),
               _Column("test acc (mean ± std)", tests, "right", priority=0),
               _Column("seeds: val / test", seeds, priority=2), _Column("train s", seconds, "right", priority=0)]
    if any(g.tags_text for g in groups):  # the user's labels (+tags.<name>=...)
        numbers.append(_Column("tags", [g.tags_text.split() or ["-"] for g in groups], priority=2))
    under = Text(caption, no_wrap=False, overflow="fold") if caption else None
    table = _fit_table([rank, config, *numbers], screen.width, title=title, caption=under)
    if table is not None:
        screen.print(table)
    else:  # too narrow for the configs beside the numbers: they go in a table of their own, by #
        screen.print(_fit_table([rank, *numbers], screen.width, shrink=True, title=title))
        screen.print(_fit_table([rank, config], screen.width, shrink=True, caption=under))
    unfinished = [j for j in jobs if j.status != "done"]
    if unfinished:
        first = [_Column("job", [[str(j.path)] for j in unfinished], kind="fold", floor=16),
                 _Column("status", [j.status.split() for j in unfinished], priority=0)]
        last = [_Column("seed", [[str(j.seed)] for j in unfinished], priority=0),
                _Column("why", [j.reason.split() for j in unfinished], kind="fold")]
        bad_title = f"{len(unfinished)} of {len(jobs)} jobs have no results"
        bad = _fit_table([*first, _Column("config", [short_label(j.group).split() for j in unfinished]), *last],
                         screen.width, title=bad_title)
        if bad is None:  # the config by its # in the table above
            bad = _fit_table([*first, _Column("#", [[rank_of.get(j.group, "-")] for j in unfinished], "right"),
                              *last], screen.width, shrink=True, title=bad_title)
        screen.print(bad)


def is_sweep_dir(path: Path) -> bool:
    """A sweep's own dir: multirun.yaml or Optuna's results in it, or job dirs (with .hydra/) right below it."""
    return ((path / "multirun.yaml").is_file() or (path / "optimization_results.yaml").is_file()
            or (not (path / ".hydra").is_dir() and any(path.glob("*/.hydra/overrides.yaml"))))


def default_out_dir(paths: Sequence[str | Path]) -> Path:
    """One sweep dir: the report goes into it. Anything else: a new outputs/report/<time>/."""
    if len(paths) == 1 and is_sweep_dir(Path(paths[0])):
        return Path(paths[0])
    return reserve_dir(Path("outputs") / "report")


def report(paths: Sequence[str | Path], out: str | Path | None = None, screen: Console | None = None) -> Path:
    """Collects the jobs below `paths` into report.csv, report_groups.csv and report.png; returns the folder.

    The tables go to `screen` (the shared console by default).
    """
    from cifar_cam import viz

    screen = screen or console()

    job_dirs = find_jobs(paths)
    jobs = [job for job in (read_job(d) for d in job_dirs) if job is not None]
    for path in paths:
        jobs += never_started(Path(path), job_dirs)
    if not jobs:
        raise ConfigError(f"no train runs in {' '.join(map(str, paths))} (found only other commands' run dirs)")
    groups, common = group_jobs(jobs)
    groups = rank_groups(groups)
    out_dir = Path(out) if out is not None else default_out_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(paths[0]) if len(paths) == 1 else None
    write_csv(out_dir / "report.csv", job_rows(jobs, root), JOB_FIELDS)
    write_csv(out_dir / "report_groups.csv", group_rows(groups, root), GROUP_FIELDS)
    done = sum(j.status == "done" for j in jobs)
    title = f"{len(jobs)} jobs, {len(groups)} configs, {done} finished"
    viz.plot_report(
        [short_label(g.label) for g in groups],
        [[(j.summary or {}).get("best_val_acc") for j in g.done] for g in groups],
        [[(j.summary or {}).get("test_acc") for j in g.done] for g in groups],
        out_dir / "report.png",
        failed=[len(g.jobs) - len(g.done) for g in groups],
        title=title + (f"; {len(jobs) - done} without results (see report.csv)" if done < len(jobs) else ""),
    )
    print_tables(groups, jobs, common, title, screen)
    optuna = _optuna_best(paths)
    if optuna:
        screen.print(optuna)
    screen.print(f"wrote {out_dir / 'report.csv'}, {out_dir / 'report_groups.csv'}, {out_dir / 'report.png'}")
    return out_dir


def _optuna_best(paths: Sequence[str | Path]) -> str:
    """The Optuna sweeper's own verdict (optimization_results.yaml in a sweep dir), if there is one."""
    lines = []
    for p in paths:
        results = Path(p) / "optimization_results.yaml"
        if results.is_file():
            data = yaml.safe_load(results.read_text()) or {}
            params = " ".join(f"{k}={v}" for k, v in (data.get("best_params") or {}).items())
            lines.append(f"optuna best in {p}: {params} -> val acc {_pct(data.get('best_value'))}")
    return "\n".join(lines)

