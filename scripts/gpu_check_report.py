#!/usr/bin/env python
"""gpu_check.sh's python half: reads what the steps left in the work dir, writes figures and gpu_check.json.

The driver calls it once per event, as `$GC_PY scripts/gpu_check_report.py SUBCOMMAND ...`:

    env                                           step 1: the environment probe (the only one that imports torch)
    finish NAME STATUS RC START_US END_US TIMEOUT  after each step: read its figures, record its result, rewrite
                                                  gpu_check.json, print the status (a pass whose checks fail: fail)
    validate                                      dry run: every `cifar-cam` line through the CLI's pre-check
    assemble                                      gpu_check.json from the plan and whatever the steps left so far

Stdlib only (the GPU machine's python has torch but not necessarily more); torch and cifar_cam are imported by
the subcommand that needs them. What it reads comes from the environment gpu_check.sh exports: GC_REPO, GC_WORK,
GC_OUT, GC_DRY, GC_DEVICE, GC_BUDGET, GC_STARTED, GC_DEVICE_CALL_TIMEOUT and GPU_CHECK_EXTRA.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shlex
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Figures = dict[str, Any]
STATUSES = ("pass", "fail", "timeout", "skipped", "not_selected")


@dataclass(frozen=True)
class CheckRun:
    """One gpu_check.sh run: its work dir (commands.txt, plan.tsv, seeds.tsv, runs/, logs/, ...) and settings."""

    repo: Path
    work: Path
    out: Path  # where gpu_check.json goes
    dry: bool
    device: str  # cuda, or cpu to try the harness
    budget: int  # seconds
    started: str
    device_call_timeout: int  # seconds: the device tool's timeout_s
    extra: str  # GPU_CHECK_EXTRA, the overrides appended to every train line

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> CheckRun:
        """The run gpu_check.sh describes in its exported GC_* variables."""
        return cls(repo=Path(env["GC_REPO"]), work=Path(env["GC_WORK"]), out=Path(env["GC_OUT"]),
                   dry=env["GC_DRY"] == "1", device=env["GC_DEVICE"], budget=int(env["GC_BUDGET"]),
                   started=env["GC_STARTED"], device_call_timeout=int(env["GC_DEVICE_CALL_TIMEOUT"]),
                   extra=env.get("GPU_CHECK_EXTRA", ""))

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def figures(self) -> Path:
        return self.work / "figures"

    @property
    def steps(self) -> Path:
        return self.work / "steps"


# -- files -------------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the previous file, never a torn one


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None if it is missing or torn."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save(run: CheckRun, step: str, figures: Figures, checks: Iterable[tuple[str, bool]] = ()) -> int:
    """Writes the step's figures (with the checks that failed); 0 if every check holds."""
    failed = [what for what, ok in checks if not ok]
    if failed:
        figures["failed_checks"] = failed
        print("failed checks: " + "; ".join(failed), file=sys.stderr)
    write_json(run.figures / f"{step}.json", figures)
    return 1 if failed else 0


def plan(run: CheckRun) -> list[dict[str, Any]]:
    """The steps of plan.tsv (the bash PLAN array), in order."""
    rows = []
    for line in (run.work / "plan.tsv").read_text().splitlines():
        number, name, seconds, kind, title = line.split("|", 4)
        rows.append({"number": number, "name": name, "title": title, "timeout_planned": int(seconds),
                     "flexible": kind == "flex"})
    return rows


def commands(run: CheckRun) -> dict[str, list[list[str]]]:
    """Step name -> the words of each command it recorded in commands.txt."""
    by_step: dict[str, list[list[str]]] = {}
    path = run.work / "commands.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        step, _, words = line.partition("\t")
        by_step.setdefault(step, []).append(shlex.split(words))
    return by_step


def run_figures(run: CheckRun, name: str) -> Figures:
    """A train run's figures: summary.json's timings and accuracy, metrics.csv's seconds per epoch."""
    run_dir = run.runs / name
    summary = read_json(run_dir / "summary.json") or {}
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            epoch_seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        epoch_seconds = []
    keys = ("test_acc", "compile_seconds", "recompiles", "train_seconds", "wall_seconds", "images_per_second",
            "precision", "device", "epochs_run")
    return {"run": name, "finished": bool(summary), **{k: summary.get(k) for k in keys},
            "epoch_seconds": epoch_seconds}


def on_device(run: CheckRun, figures: Figures) -> bool:
    """Whether a run's summary says it trained on the checked device (cuda:0 counts as cuda)."""
    return str(figures.get("device") or "").startswith(run.device)


# -- env: the probe, run as step 1 ---------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe_env(run: CheckRun) -> int:
    """nvidia-smi's line, the python / torch / CUDA / cuDNN versions and the GPU's properties; 0 if a kernel ran."""
    import platform
    import subprocess

    fig: Figures = {"python": platform.python_version(), "executable": sys.executable}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        fig["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        fig["nvidia_smi"] = f"not available: {e}"
    import torch

    fig.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               cuda_available=torch.cuda.is_available())
    if fig["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        fig.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   kernel_ran=torch.ones(4, device="cuda").add(1).sum().item() == 8.0)
    fig["packages"] = {n: _package_version(n) for n in ("numpy", "triton", "hydra-core", "omegaconf",
                                                         "albumentations", "opencv-python-headless", "pydantic",
                                                         "pytest")}
    print(json.dumps(fig, indent=2))
    return save(run, "env", fig, [("torch sees a CUDA device", fig["cuda_available"]),
                                  ("a CUDA kernel ran", fig.get("kernel_ran", False))])


# -- collect: each step's figures, read after it ends from what it left -------------------------------------------


def collect_bench(run: CheckRun, name: str) -> int:
    """bench.py's JSON: its img/s and ratios, and the settings they were measured with."""
    result = read_json(run.logs / f"{name}.json") or {}
    keys = ("ceiling_img_s", "cifar_cam_img_s", "reference_img_s", "ratio_to_ceiling", "ratio_to_reference")
    settings = result.get("settings", {})
    fig = {**{k: result.get(k) for k in keys},
           "settings": {k: settings.get(k) for k in ("device", "machine", "batch_size", "width", "images", "preset",
                                                     "backends", "compile", "precision", "repeat")}}
    return save(run, name, fig, [("bench wrote its JSON", bool(result))])


def collect_synthetic(run: CheckRun) -> int:
    """Step 3: the muon and fp16 runs, the eval and the gradcam of the muon run."""
    muon, fp16 = run_figures(run, "synthetic_muon"), run_figures(run, "synthetic_fp16")
    evaluated = read_json(run.runs / "synthetic_muon_eval" / "metrics.json") or {}
    explained = read_json(run.runs / "synthetic_muon_gradcam" / "gradcam.json") or {}
    fig = {"muon": muon, "fp16": fp16, "eval_accuracy": evaluated.get("accuracy"),
           "eval_matches_train": evaluated.get("accuracy") == muon["test_acc"] if evaluated else None,
           "gradcam_explained_images": explained.get("explained_images"),
           "gradcam_seconds": explained.get("seconds")}
    return save(run, "synthetic", fig, [
        ("the muon run finished on the device", muon["finished"] and on_device(run, muon)),
        ("the fp16 run finished on the device", fp16["finished"] and on_device(run, fp16)),
        ("trainer.precision=fp16 trained in fp16", fp16["precision"] == "fp16"),
        ("eval wrote metrics.json", bool(evaluated)),
        ("gradcam explained images", bool(explained.get("explained_images"))),
    ])


def collect_pytest(run: CheckRun) -> int:
    """Step 4: pytest's JUnit XML: the counts and every test that did not pass."""
    try:
        root = ET.parse(run.logs / "pytest_cuda.xml").getroot()
    except (OSError, ET.ParseError):
        return save(run, "pytest_cuda", {}, [("pytest wrote its JUnit XML", False)])
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    not_passed = []
    for case in suite.iter("testcase"):
        for outcome in (case.find(tag) for tag in ("failure", "error", "skipped")):
            if outcome is not None:
                not_passed.append(f"{case.get('classname')}::{case.get('name')}: {outcome.tag} "
                                  f"{outcome.get('message', '')[:200]}")
    fig = {**counts, "seconds": float(suite.get("time", 0)), "not_passed": not_passed}
    ran = counts["tests"] > counts["skipped"]
    return save(run, "pytest_cuda", fig, [("some cuda test ran (not all skipped)", ran)])


def collect_run(run: CheckRun, name: str) -> int:
    """Steps 5a, 5b, 5c: one train run's figures."""
    fig = run_figures(run, name)
    return save(run, name, fig, [("the run finished on the device", fig["finished"] and on_device(run, fig))])


def collect_seeds(run: CheckRun) -> int:
    """Step 6: each seed's run (seeds.tsv, and any run dir a timeout cut short), their mean and stdev."""
    seeds, skipped = [], []
    path = run.work / "seeds.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        seed, rc, *rest = line.split("\t")
        if rc == "skipped":
            skipped.append({"seed": int(seed), "seconds_left": int(rest[0]), "last_seed_seconds": int(rest[1])})
        else:
            seeds.append({"seed": int(seed), "rc": int(rc), "seconds": int(rest[0]),
                          **run_figures(run, f"fast_seed{seed}")})
    listed = {s["seed"] for s in seeds}
    for run_dir in sorted(run.runs.glob("fast_seed*")):  # a seed the step's timeout cut short
        seed = int(run_dir.name.removeprefix("fast_seed"))
        if seed not in listed:
            seeds.append({"seed": seed, "rc": None, "seconds": None, **run_figures(run, run_dir.name)})
    done = [s for s in seeds if s["finished"]]
    fig = {"seeds": seeds, "skipped": skipped, "finished": len(done)}
    for key in ("test_acc", "wall_seconds", "train_seconds"):
        values = [s[key] for s in done if s[key] is not None]
        fig[f"mean_{key}"] = statistics.fmean(values) if values else None
        fig[f"stdev_{key}"] = statistics.stdev(values) if len(values) > 1 else None
    return save(run, "fast_seeds", fig,
                [("at least one seed finished on the device", any(on_device(run, s) for s in done))])


COLLECT: dict[str, Callable[[CheckRun], int]] = {  # step -> what reads its figures (env writes its own, in the step)
    "bench_quick": lambda run: collect_bench(run, "bench_quick"),
    "synthetic": collect_synthetic,
    "pytest_cuda": collect_pytest,
    "fast2_eager": lambda run: collect_run(run, "fast2_eager"),
    "fast2_compiled": lambda run: collect_run(run, "fast2_compiled"),
    "cpu_quick": lambda run: collect_run(run, "cpu_quick"),
    "fast_seeds": collect_seeds,
    "bench_ceiling": lambda run: collect_bench(run, "bench_ceiling"),
}


def finish(run: CheckRun, name: str, status: str, rc: int, start_us: int, end_us: int, timeout: int) -> str:
    """Reads the step's figures, records its result, rewrites gpu_check.json; the status (failed checks fail a pass)."""
    if status in ("pass", "fail", "timeout") and name in COLLECT and COLLECT[name](run) != 0 and status == "pass":
        status = "fail"
    write_json(run.steps / f"{name}.json", {"status": status, "rc": rc, "timeout": timeout,
                                            "seconds": round((end_us - start_us) / 1e6, 2)})
    assemble(run)
    return status


# -- validate: the dry run's pre-check ----------------------------------------------------------------------------


def validate(run: CheckRun) -> list[dict[str, Any]]:
    """Every cifar-cam line through the CLI's pre-check (torch-free, machine=False); bench.py's flags exist."""
    from cifar_cam.cli import precheck as cli

    results = []
    bench_source = (run.repo / "scripts" / "bench.py").read_text()
    keep = cli.with_checkpoint_config
    for step, lines in commands(run).items():
        for words in lines:
            entry: dict[str, Any] = {"step": step, "command": shlex.join(words)}
            if words[0] == "cifar-cam":
                overrides = words[2:]
                ckpt = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt=")), None)
                if ckpt and not Path(ckpt).exists():  # an earlier step writes it: the rest is still checked
                    cli.with_checkpoint_config = lambda command, cfg, overrides: cfg
                    entry["note"] = "checkpoint merge skipped: written by an earlier step"
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err):
                        cli.precheck(words[1], overrides, machine=False)
                    entry["ok"] = True
                except SystemExit as e:
                    entry.update(ok=False, error=err.getvalue().strip() or f"exit {e.code}")
                except Exception as e:  # a refusal in any form is a failed check
                    entry.update(ok=False, error=f"{type(e).__name__}: {e}")
                finally:
                    cli.with_checkpoint_config = keep
            elif "scripts/bench.py" in words:
                unknown = [w for w in words if w.startswith("--") and f'"{w.split("=")[0]}"' not in bench_source]
                entry.update(ok=not unknown, **({"error": f"bench.py has no {unknown}"} if unknown else {}))
            else:
                entry["ok"] = None  # pip, pytest, the env probe: run as written
            results.append(entry)
    return results


def report_validation(run: CheckRun) -> int:
    """Writes validation.json and prints each refused line; 0 if none was refused."""
    results = validate(run)
    write_json(run.work / "validation.json", results)
    bad = [r for r in results if r["ok"] is False]
    for r in bad:
        print(f"gpu_check: refused: {r['command']}\n  {r['error']}", file=sys.stderr)
    checked = sum(r["ok"] is True for r in results)
    print(f"gpu_check: {checked} command lines pre-checked, {len(bad)} refused")
    return 1 if bad else 0


# -- assemble: gpu_check.json -----------------------------------------------------------------------------------


def summary(figures: dict[str, Figures | None]) -> dict[str, Any]:
    """The headline figures of a run, picked from the steps' figures."""
    env, f2e, f2c = figures.get("env") or {}, figures.get("fast2_eager") or {}, figures.get("fast2_compiled") or {}
    seeds, ceiling = figures.get("fast_seeds") or {}, figures.get("bench_ceiling") or {}
    quick = figures.get("cpu_quick") or {}
    last = [(f.get("epoch_seconds") or [None])[-1] for f in (f2e, f2c)]
    return {
        "gpu": env.get("gpu"), "bf16_native": env.get("bf16_native"), "torch": env.get("torch"),
        "compile_seconds": f2c.get("compile_seconds"), "recompiles": f2c.get("recompiles"),
        "epoch2_seconds_eager": last[0], "epoch2_seconds_compiled": last[1],
        "compile_speedup_epoch2": round(last[0] / last[1], 3) if all(last) else None,
        "fast_seeds_finished": seeds.get("finished"), "fast_mean_test_acc": seeds.get("mean_test_acc"),
        "fast_mean_wall_seconds": seeds.get("mean_wall_seconds"),
        "cpu_quick_test_acc": quick.get("test_acc"), "cpu_quick_wall_seconds": quick.get("wall_seconds"),
        "bench_ratio_to_ceiling": (ceiling.get("ratio_to_ceiling") or {}).get("torch"),
    }


def assemble(run: CheckRun) -> None:
    """Writes gpu_check.json: the plan, each step's result, figures and commands, and the summary."""
    by_step: dict[str, list[list[str]]] = commands(run)
    figures: dict[str, Figures | None] = {}
    steps = []
    validation = read_json(run.work / "validation.json") if run.dry else None
    for row in plan(run):
        name = row["name"]
        result = read_json(run.steps / f"{name}.json") or {"status": "planned" if run.dry else "not_run"}
        figures[name] = read_json(run.figures / f"{name}.json")
        steps.append({**row, **result, "figures": figures[name],
                      "commands": [shlex.join(w) for w in by_step.get(name, [])],
                      "log": f"logs/{row['number']}_{name}.log"})
    planned = sum(s["timeout_planned"] for s in steps if s["status"] != "not_selected")
    doc = {
        "check": "scripts/gpu_check.sh (issue 18)", "mode": "dry-run" if run.dry else "run",
        "started": run.started, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device_call": {"command": "bash scripts/gpu_check.sh", "carry": [".gpu"],
                        "timeout_s": run.device_call_timeout},
        "budget_seconds": run.budget, "planned_seconds": planned, "plan_fits": planned <= run.budget,
        "extra_overrides": shlex.split(run.extra),
        "passed": (planned <= run.budget and all(r["ok"] is not False for r in validation or [])) if run.dry
        else all(s["status"] in ("pass", "not_selected") for s in steps),
        "summary": None if run.dry else summary(figures),
        "steps": steps,
    }
    if run.dry:
        doc["validation"] = validation
    write_json(run.out / "gpu_check.json", doc)


# -- the command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The subcommand and its arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="gpu_check_report.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="step 1: probe the environment and write its figures")
    p = sub.add_parser("finish", help="after a step: its figures, its result, gpu_check.json; prints the status")
    p.add_argument("name", help="the step's name in the plan")
    p.add_argument("status", choices=STATUSES, help="what its exit code says")
    p.add_argument("rc", type=int, help="its exit code (-1: not started)")
    p.add_argument("start_us", type=int, help="microseconds since the epoch")
    p.add_argument("end_us", type=int, help="microseconds since the epoch")
    p.add_argument("timeout", type=int, help="the seconds it was given")
    sub.add_parser("validate", help="dry run: pre-check every recorded command line")
    sub.add_parser("assemble", help="write gpu_check.json from what the steps left so far")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand for gpu_check.sh; its exit code."""
    args = parse_args(argv)
    run = CheckRun.from_env()
    if args.command == "env":
        return probe_env(run)
    if args.command == "finish":
        print(finish(run, args.name, args.status, args.rc, args.start_us, args.end_us, args.timeout))
        return 0
    if args.command == "validate":
        return report_validation(run)
    assemble(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
