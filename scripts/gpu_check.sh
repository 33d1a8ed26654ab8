#!/usr/bin/env bash
# The GPU check (issue 18): what only a GPU can show, measured in ONE device command, ~6 minutes.
#
#   1. Here, on the CPU machine (PyPI reachable), once per session:
#        bash scripts/gpu_prepare.sh
#      fills the git-ignored .gpu/ (~27 MiB): the JPEG copy of CIFAR-10 and the wheels the GPU machine lacks.
#   2. The device tool's run, exactly:
#        command:   bash scripts/gpu_check.sh
#        carry:     [".gpu"]
#        timeout_s: 420
#      The steps' timeouts sum to at most GPU_CHECK_BUDGET (360 s); the other 60 s cover kill graces and the
#      archive. What comes back (under files_at): gpu_check.json (every step's status, seconds, timeout and
#      figures, rewritten after each step) and logs.tar.gz (the steps' logs and the runs' summary.json,
#      metrics.csv and logs; no checkpoints). Exit 0 only if every step passed.
#   3. Without a GPU (tests/test_gpu_check.py runs it in `make test`):
#        bash scripts/gpu_check.sh --dry-run [--out DIR]
#      checks the bash syntax, every `cifar-cam` command line the run would start (the CLI's torch-free
#      pre-check, all in one process) and bench.py's flags, prints the plan and writes gpu_check.json with
#      every step "planned". It needs neither .gpu/ nor a GPU nor the network.
#
# Environment: OUT (where the two files go; default outputs/gpu_check), GPU_CHECK_PYTHON (default python3: on
# the GPU machine the one with torch), GPU_CHECK_EXTRA (overrides appended to every `cifar-cam train` line),
# GPU_CHECK_BUDGET (seconds, default 360), GPU_CHECK_STEPS (a comma list of step names or numbers to run, e.g.
# "6,7" for a rerun; setup always runs; default all), GPU_CHECK_DEVICE (default cuda; cpu only to try the harness here).
#
# Each step runs under its own `timeout` and the next one starts whatever happened. A step's timeout is its
# planned seconds; the two flexible steps (6, 7) also get what the earlier steps left unused, while every
# later step's planned seconds stay reserved, so the whole run ends within the budget.
set -u
set -o pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
DEVICE_CALL_TIMEOUT=420

# number | name | planned seconds | fixed or flex | what it shows (ordered by value: the run can be cut short)
PLAN=(
    "0|setup|15|fixed|install the carried wheels (pip --no-index --target); cifar_cam importable from src/"
    "1|env|20|fixed|nvidia-smi line, python / torch / CUDA / cuDNN versions, GPU name, native bf16"
    "2|bench_quick|25|fixed|scripts/bench.py --quick on CUDA: every path of the bench runs"
    "3|synthetic|50|fixed|data=synthetic on CUDA: train with optimizer=muon, eval and gradcam of it; train with fp16 (GradScaler)"
    "4|pytest_cuda|55|fixed|pytest -m cuda: the CUDA-only tests (resume on CUDA among them), 4 at a time"
    "5a|fast2_eager|35|fixed|experiment=fast, 2 epochs, on the JPEG archive, trainer.compile=false"
    "5b|fast2_compiled|85|fixed|the same with trainer.compile=true: compile_seconds, recompiles, epoch seconds"
    "6|fast_seeds|40|flex|the full experiment=fast preset, seed=0,1,2 while the budget lasts: test_acc, wall_seconds"
    "7|bench_ceiling|30|flex|scripts/bench.py at the preset's batch 500, crop_flip, torch backend: the ceiling ratio"
)
MIN_STEP_SECONDS=5   # a step with less than this left is skipped, not started
KILL_GRACE=5         # seconds between timeout's TERM and its KILL
SEEDS=(0 1 2)

usage() {
    sed -n '2,/^set -u/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
}

dry() { [[ $GC_DRY == 1 ]]; }

# The words of one command, recorded for gpu_check.json (and, in a dry run, for the pre-check) under its step.
record() {
    { printf '%s\t' "$GC_STEP"; printf '%q ' "$@"; printf '\n'; } >>"$GC_WORK/commands.txt"
}

# cc COMMAND OVERRIDE...: one `cifar-cam` run (python -m cifar_cam: no console script on the GPU machine),
# under `timeout` when RUN_TIMEOUT (seconds) is set.
RUN_TIMEOUT=
cc() {
    record cifar-cam "$@"
    dry && return 0
    echo "+ cifar-cam $*"
    if [[ -n $RUN_TIMEOUT ]]; then
        timeout -k "$KILL_GRACE" "$RUN_TIMEOUT" "$GC_PY" -m cifar_cam "$@"
    else
        "$GC_PY" -m cifar_cam "$@"
    fi
}

# py ARG...: one python command (bench.py, pytest, pip), recorded like cc.
py() {
    record python3 "$@"
    dry && return 0
    echo "+ python3 $*"
    "$GC_PY" "$@"
}

now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "$t"; }

# ----------------------------------------------------------------------------- the steps (one process each)
# A step only runs commands. Its figures are read afterwards by the driver (helper finish -> collect), from what
# the runs left behind, so a step cut short by its timeout still reports what it finished.

step_setup() {
    local wheels=("$REPO"/.gpu/wheels/*.whl) rc=0
    if ! dry; then
        [[ -f $GC_ARCHIVE ]] || { echo "missing $GC_ARCHIVE: run scripts/gpu_prepare.sh here, carry [\".gpu\"]"; rc=1; }
        [[ -e ${wheels[0]} ]] || { echo "no wheels in .gpu/wheels: run scripts/gpu_prepare.sh, carry [\".gpu\"]"; rc=1; }
    fi
    py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GC_SITE" \
        "${wheels[@]}" || rc=1
    dry && return 0
    "$GC_PY" -c "
import os, hydra, omegaconf, albumentations, torch, cifar_cam.cli
from cifar_cam.io import config_dir
assert os.path.isfile(os.path.join(config_dir(), 'train.yaml')), config_dir()
print('cifar_cam from', os.path.dirname(cifar_cam.cli.__file__), '| conf', config_dir(), '| torch', torch.__version__,
      '| hydra', hydra.__version__, '| albumentations', albumentations.__version__)" || rc=1
    return $rc
}

step_env() {
    record python3 -c "(the environment probe in this script's python half: helper env)"
    dry || helper env
}

step_bench_quick() {
    py scripts/bench.py --quick --device "$GC_DEVICE" --json "$GC_LOGS/bench_quick.json"
}

step_synthetic() {
    local r=$GC_RUNS rc=0 dev="trainer.device=$GC_DEVICE"
    cc train data=synthetic optimizer=muon trainer.epochs=2 "$dev" "hydra.run.dir=$r/synthetic_muon" \
        "${GC_EXTRA[@]}" || rc=1
    cc eval "ckpt=$r/synthetic_muon" "$dev" "hydra.run.dir=$r/synthetic_muon_eval" || rc=1
    cc gradcam "ckpt=$r/synthetic_muon" gradcam.num_images=8 "$dev" "hydra.run.dir=$r/synthetic_muon_gradcam" || rc=1
    cc train data=synthetic trainer.precision=fp16 trainer.epochs=2 "$dev" "hydra.run.dir=$r/synthetic_fp16" \
        "${GC_EXTRA[@]}" || rc=1
    return $rc
}

step_pytest_cuda() {
    # Only the files that use the marker: the others may import what the GPU machine lacks (fastapi, selenium).
    # Each test trains through the CLI in a subprocess: pytest-xdist (there on the GPU machine) runs 4 at once.
    local files parallel=(-n 4)
    mapfile -t files < <(grep -lE 'mark\.cuda\b' tests/test_*.py)
    if ((${#files[@]} == 0)); then
        echo "no test file carries the pytest marker cuda"
        dry || return 1
    fi
    dry || "$GC_PY" -c "import xdist" 2>/dev/null || parallel=()
    py -m pytest -q -rs -m cuda -p no:cacheprovider "${parallel[@]}" --junitxml="$GC_LOGS/pytest_cuda.xml" \
        "${files[@]}"
}

fast2() {  # fast2 NAME COMPILE
    cc train experiment=fast data=folder "data.root=$GC_ARCHIVE" trainer.epochs=2 "trainer.compile=$2" \
        "trainer.device=$GC_DEVICE" "hydra.run.dir=$GC_RUNS/$1" "${GC_EXTRA[@]}"
}
step_fast2_eager() { fast2 fast2_eager false; }
step_fast2_compiled() { fast2 fast2_compiled true; }

step_fast_seeds() {
    # One seed after another, each under its own timeout; another starts only if it has the time the last took.
    local seed left last=0 start rc=0 t
    for seed in "${SEEDS[@]}"; do
        if ! dry; then
            left=$((GC_STEP_DEADLINE - EPOCHSECONDS - 2 * KILL_GRACE))  # its TERM, grace and KILL come first
            if ((seed != SEEDS[0] && left < last * 115 / 100 + 5)); then
                printf '%s\tskipped\t%s\t%s\n' "$seed" "$left" "$last" >>"$GC_WORK/seeds.tsv"
                echo "seed=$seed not started: ${left} s left, the last seed took ${last} s"
                continue
            fi
            RUN_TIMEOUT=$((left > 1 ? left : 1))
        fi
        start=$EPOCHSECONDS
        cc train experiment=fast data=folder "data.root=$GC_ARCHIVE" "seed=$seed" "trainer.device=$GC_DEVICE" \
            "hydra.run.dir=$GC_RUNS/fast_seed$seed" "${GC_EXTRA[@]}"
        t=$?
        dry && continue
        last=$((EPOCHSECONDS - start))
        printf '%s\t%s\t%s\n' "$seed" "$t" "$last" >>"$GC_WORK/seeds.tsv"
        ((t == 0)) || rc=1
        ((t == 124 || t == 137)) && break  # out of time
    done
    return $rc
}

step_bench_ceiling() {
    # The preset's batch, recipe and backend: the ceiling that matters is experiment=fast's.
    py scripts/bench.py --device "$GC_DEVICE" --batch-size 500 --preset crop_flip --backends torch \
        --json "$GC_LOGS/bench_ceiling.json"
}

# ----------------------------------------------------------------------------- python: figures and the JSON

helper() {
    "$GC_PY" - "$@" <<'PY'
"""gpu_check.sh's python half: reads what the steps left in the work dir, writes figures and gpu_check.json."""
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
from pathlib import Path

E = os.environ
REPO, WORK, OUT = Path(E["GC_REPO"]), Path(E["GC_WORK"]), Path(E["GC_OUT"])
RUNS, LOGS, FIGURES, STEPS = WORK / "runs", WORK / "logs", WORK / "figures", WORK / "steps"
DRY = E["GC_DRY"] == "1"


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the previous file, never a torn one


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save(step, figures, checks=()):
    """The step's figures; 0 if every check holds."""
    failed = [what for what, ok in checks if not ok]
    if failed:
        figures["failed_checks"] = failed
        print("failed checks: " + "; ".join(failed), file=sys.stderr)
    write_json(FIGURES / f"{step}.json", figures)
    return 1 if failed else 0


def plan():
    rows = []
    for line in (WORK / "plan.tsv").read_text().splitlines():
        number, name, seconds, kind, title = line.split("|", 4)
        rows.append({"number": number, "name": name, "title": title, "timeout_planned": int(seconds),
                     "flexible": kind == "flex"})
    return rows


def commands():
    by_step = {}
    path = WORK / "commands.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        step, _, words = line.partition("\t")
        by_step.setdefault(step, []).append(shlex.split(words))
    return by_step


def run_figures(name):
    """A train run's figures: summary.json's timings and accuracy, metrics.csv's seconds per epoch."""
    run_dir = RUNS / name
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


def on_device(fig):
    return str(fig.get("device") or "").startswith(E["GC_DEVICE"])


def cmd_env():
    import platform
    import subprocess
    from importlib import metadata

    fig = {"python": platform.python_version(), "executable": sys.executable}
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
        fig.update(gpu=torch.cuda.get_device_name(0), capability="%d.%d" % torch.cuda.get_device_capability(0),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                   kernel_ran=torch.ones(4, device="cuda").add(1).sum().item() == 8.0)

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    fig["packages"] = {n: version(n) for n in ("numpy", "triton", "hydra-core", "omegaconf", "albumentations",
                                               "opencv-python-headless", "pydantic", "pytest")}
    print(json.dumps(fig, indent=2))
    return save("env", fig, [("torch sees a CUDA device", fig["cuda_available"]),
                             ("a CUDA kernel ran", fig.get("kernel_ran", False))])


def cmd_bench(name):
    result = read_json(LOGS / f"{name}.json") or {}
    keys = ("ceiling_img_s", "cifar_cam_img_s", "reference_img_s", "ratio_to_ceiling", "ratio_to_reference")
    settings = result.get("settings", {})
    fig = {**{k: result.get(k) for k in keys},
           "settings": {k: settings.get(k) for k in ("device", "machine", "batch_size", "width", "images", "preset",
                                                     "backends", "compile", "precision", "repeat")}}
    return save(name, fig, [("bench wrote its JSON", bool(result))])


def cmd_synthetic():
    muon, fp16 = run_figures("synthetic_muon"), run_figures("synthetic_fp16")
    evaluated = read_json(RUNS / "synthetic_muon_eval" / "metrics.json") or {}
    explained = read_json(RUNS / "synthetic_muon_gradcam" / "gradcam.json") or {}
    fig = {"muon": muon, "fp16": fp16, "eval_accuracy": evaluated.get("accuracy"),
           "eval_matches_train": evaluated.get("accuracy") == muon["test_acc"] if evaluated else None,
           "gradcam_explained_images": explained.get("explained_images"),
           "gradcam_seconds": explained.get("seconds")}
    return save("synthetic", fig, [
        ("the muon run finished on the device", muon["finished"] and on_device(muon)),
        ("the fp16 run finished on the device", fp16["finished"] and on_device(fp16)),
        ("trainer.precision=fp16 trained in fp16", fp16["precision"] == "fp16"),
        ("eval wrote metrics.json", bool(evaluated)),
        ("gradcam explained images", bool(explained.get("explained_images"))),
    ])


def cmd_pytest():
    try:
        root = ET.parse(LOGS / "pytest_cuda.xml").getroot()
    except (OSError, ET.ParseError):
        return save("pytest_cuda", {}, [("pytest wrote its JUnit XML", False)])
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    not_passed = []
    for case in suite.iter("testcase"):
        for outcome in (case.find(tag) for tag in ("failure", "error", "skipped")):
            if outcome is not None:
                not_passed.append(f"{case.get('classname')}::{case.get('name')}: {outcome.tag} "
                                  f"{outcome.get('message', '')[:200]}")
    fig = {**counts, "seconds": float(suite.get("time", 0)), "not_passed": not_passed}
    return save("pytest_cuda", fig, [("some cuda test ran (not all skipped)", counts["tests"] > counts["skipped"])])


def cmd_run(name):
    fig = run_figures(name)
    return save(name, fig, [("the run finished on the device", fig["finished"] and on_device(fig))])


def cmd_seeds():
    seeds, skipped = [], []
    path = WORK / "seeds.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        seed, rc, *rest = line.split("\t")
        if rc == "skipped":
            skipped.append({"seed": int(seed), "seconds_left": int(rest[0]), "last_seed_seconds": int(rest[1])})
        else:
            seeds.append({"seed": int(seed), "rc": int(rc), "seconds": int(rest[0]),
                          **run_figures(f"fast_seed{seed}")})
    listed = {s["seed"] for s in seeds}
    for run_dir in sorted(RUNS.glob("fast_seed*")):  # a seed the step's timeout cut short
        seed = int(run_dir.name.removeprefix("fast_seed"))
        if seed not in listed:
            seeds.append({"seed": seed, "rc": None, "seconds": None, **run_figures(run_dir.name)})
    done = [s for s in seeds if s["finished"]]
    fig = {"seeds": seeds, "skipped": skipped, "finished": len(done)}
    for key in ("test_acc", "wall_seconds", "train_seconds"):
        values = [s[key] for s in done if s[key] is not None]
        fig[f"mean_{key}"] = statistics.fmean(values) if values else None
        fig[f"stdev_{key}"] = statistics.stdev(values) if len(values) > 1 else None
    return save("fast_seeds", fig, [("at least one seed finished on the device", any(on_device(s) for s in done))])


COLLECT = {  # step -> what reads its figures after it ends (env writes its own, in the step)
    "bench_quick": lambda: cmd_bench("bench_quick"), "synthetic": lambda: cmd_synthetic(),
    "pytest_cuda": lambda: cmd_pytest(), "fast2_eager": lambda: cmd_run("fast2_eager"),
    "fast2_compiled": lambda: cmd_run("fast2_compiled"), "fast_seeds": lambda: cmd_seeds(),
    "bench_ceiling": lambda: cmd_bench("bench_ceiling"),
}


def cmd_finish(name, status, rc, start_us, end_us, timeout):
    """Reads the step's figures; a step whose commands passed but whose checks did not is a fail. Prints the status."""
    if status in ("pass", "fail", "timeout") and name in COLLECT and COLLECT[name]() != 0 and status == "pass":
        status = "fail"
    write_json(STEPS / f"{name}.json", {"status": status, "rc": int(rc), "timeout": int(timeout),
                                        "seconds": round((int(end_us) - int(start_us)) / 1e6, 2)})
    cmd_assemble()
    print(status)
    return 0


def validate():
    """Every cifar-cam line through the CLI's pre-check (torch-free, machine=False); bench.py's flags exist."""
    from cifar_cam import cli

    results = []
    bench_source = (REPO / "scripts" / "bench.py").read_text()
    keep = cli.with_checkpoint_config
    for step, lines in commands().items():
        for words in lines:
            entry = {"step": step, "command": shlex.join(words)}
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
                except Exception as e:  # noqa: BLE001 - a refusal in any form is a failed check
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


def cmd_validate():
    results = validate()
    write_json(WORK / "validation.json", results)
    bad = [r for r in results if r["ok"] is False]
    for r in bad:
        print(f"gpu_check: refused: {r['command']}\n  {r['error']}", file=sys.stderr)
    checked = sum(r["ok"] is True for r in results)
    print(f"gpu_check: {checked} command lines pre-checked, {len(bad)} refused")
    return 1 if bad else 0


def summary(figures):
    env, f2e, f2c = figures.get("env") or {}, figures.get("fast2_eager") or {}, figures.get("fast2_compiled") or {}
    seeds, ceiling = figures.get("fast_seeds") or {}, figures.get("bench_ceiling") or {}
    last = [(f.get("epoch_seconds") or [None])[-1] for f in (f2e, f2c)]
    return {
        "gpu": env.get("gpu"), "bf16_native": env.get("bf16_native"), "torch": env.get("torch"),
        "compile_seconds": f2c.get("compile_seconds"), "recompiles": f2c.get("recompiles"),
        "epoch2_seconds_eager": last[0], "epoch2_seconds_compiled": last[1],
        "compile_speedup_epoch2": round(last[0] / last[1], 3) if all(last) else None,
        "fast_seeds_finished": seeds.get("finished"), "fast_mean_test_acc": seeds.get("mean_test_acc"),
        "fast_mean_wall_seconds": seeds.get("mean_wall_seconds"),
        "bench_ratio_to_ceiling": (ceiling.get("ratio_to_ceiling") or {}).get("torch"),
    }


def cmd_assemble():
    by_step, figures, steps = commands(), {}, []
    validation = read_json(WORK / "validation.json") if DRY else None
    for row in plan():
        name = row["name"]
        result = read_json(STEPS / f"{name}.json") or {"status": "planned" if DRY else "not_run"}
        figures[name] = read_json(FIGURES / f"{name}.json")
        steps.append({**row, **result, "figures": figures[name],
                      "commands": [shlex.join(w) for w in by_step.get(name, [])],
                      "log": f"logs/{row['number']}_{name}.log"})
    planned = sum(s["timeout_planned"] for s in steps if s["status"] != "not_selected")
    budget = int(E["GC_BUDGET"])
    doc = {
        "check": "scripts/gpu_check.sh (issue 18)", "mode": "dry-run" if DRY else "run",
        "started": E["GC_STARTED"], "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device_call": {"command": "bash scripts/gpu_check.sh", "carry": [".gpu"],
                        "timeout_s": int(E["GC_DEVICE_CALL_TIMEOUT"])},
        "budget_seconds": budget, "planned_seconds": planned, "plan_fits": planned <= budget,
        "extra_overrides": shlex.split(E.get("GPU_CHECK_EXTRA", "")),
        "passed": (planned <= budget and all(r["ok"] is not False for r in validation or [])) if DRY
        else all(s["status"] in ("pass", "not_selected") for s in steps),
        "summary": None if DRY else summary(figures),
        "steps": steps,
    }
    if DRY:
        doc["validation"] = validation
    write_json(OUT / "gpu_check.json", doc)
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit(globals()[f"cmd_{command}"](*args))
PY
}

# ----------------------------------------------------------------------------- the driver

# step NAME: one step in this process (what the driver starts under `timeout`).
step() {
    GC_STEP=$1
    cd "$REPO" || return 1
    "step_$1"
}

selected() {  # selected NUMBER NAME: whether GPU_CHECK_STEPS names this step (unset: every step; setup always)
    [[ -z ${GPU_CHECK_STEPS:-} || $2 == setup || ",${GPU_CHECK_STEPS// /}," == *",$1,"* ||
        ",${GPU_CHECK_STEPS// /}," == *",$2,"* ]]
}

planned_after() {  # planned seconds of the selected steps after index $1
    local i sum=0 number name seconds
    for ((i = $1 + 1; i < ${#PLAN[@]}; i++)); do
        IFS='|' read -r number name seconds _ _ <<<"${PLAN[i]}"
        if selected "$number" "$name"; then sum=$((sum + seconds)); fi
    done
    echo "$sum"
}

run_step() {  # run_step INDEX
    local number name planned kind title avail t start rc status log
    IFS='|' read -r number name planned kind title <<<"${PLAN[$1]}"
    log="$GC_LOGS/${number}_$name.log"
    if ! selected "$number" "$name"; then
        helper finish "$name" not_selected -1 0 0 0 >/dev/null 2>&1
        return 0
    fi
    avail=$((GC_DEADLINE - EPOCHSECONDS - $(planned_after "$1")))
    if [[ $kind == flex ]]; then t=$avail; else t=$((planned < avail ? planned : avail)); fi
    start=$(now_us)
    if ((t < MIN_STEP_SECONDS)); then
        echo "[gpu_check] $number $name: skipped, ${t} s left for it" | tee "$log"
        helper finish "$name" skipped -1 "$start" "$(now_us)" "$t" >/dev/null 2>>"$log"
        return 1
    fi
    echo "[gpu_check] $number $name (timeout ${t} s): $title"
    GC_STEP_DEADLINE=$((EPOCHSECONDS + t)) timeout -k "$KILL_GRACE" "$t" bash "$SELF" --step "$name" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    status=$(helper finish "$name" "$status" "$rc" "$start" "$(now_us)" "$t" 2>>"$log") || status=fail
    echo "[gpu_check] $number $name: $status (exit $rc) in $((($(now_us) - start) / 1000000)) s"
    if [[ $status != pass ]]; then
        tail -n 15 "$log" | sed 's/^/    | /'
    fi
    [[ $status == pass ]]
}

print_plan() {
    local row number name planned kind title total=0 mark
    echo "[gpu_check] plan (budget ${GC_BUDGET} s; device call: bash scripts/gpu_check.sh, carry [\".gpu\"]," \
        "timeout_s $DEVICE_CALL_TIMEOUT):"
    for row in "${PLAN[@]}"; do
        IFS='|' read -r number name planned kind title <<<"$row"
        mark=" "
        if selected "$number" "$name"; then total=$((total + planned)); else mark="-"; fi
        printf ' %s%-3s %-15s %4d s  %-5s  %s\n' "$mark" "$number" "$name" "$planned" "$kind" "$title"
    done
    printf '  total %d s of %d s planned\n' "$total" "$GC_BUDGET"
    ((total <= GC_BUDGET)) || { echo "[gpu_check] the planned timeouts exceed the budget" >&2; return 1; }
}

archive_logs() {  # logs/ and each run's small files: no checkpoints, no images
    (cd "$GC_WORK" && { ls commands.txt plan.tsv seeds.tsv 2>/dev/null
        find logs runs steps figures -type f \( -name '*.log' -o -name '*.json' -o -name '*.csv' -o -name '*.xml' \
            -o -name '*.yaml' \) -not -path '*/checkpoints/*'; } | tar -czf "$GC_OUT/logs.tar.gz" -T -)
}

main() {
    local dry_run=0 out=${OUT:-}
    while (($#)); do
        case $1 in
            --step) shift; step "$1"; return ;;
            --dry-run) dry_run=1 ;;
            --out) shift; out=$1 ;;
            -h | --help) usage; return 0 ;;
            *) echo "gpu_check: unknown argument '$1' (--dry-run, --out DIR, --help)" >&2; return 2 ;;
        esac
        shift
    done
    export GC_DRY=$dry_run GC_REPO=$REPO GC_PY=${GPU_CHECK_PYTHON:-python3} GC_DEVICE=${GPU_CHECK_DEVICE:-cuda}
    export GC_BUDGET=${GPU_CHECK_BUDGET:-360} GC_DEVICE_CALL_TIMEOUT=$DEVICE_CALL_TIMEOUT
    export GC_OUT=${out:-$REPO/outputs/gpu_check} GC_STARTED GC_ARCHIVE=$REPO/.gpu/cifar10-jpg.tar.gz
    GC_STARTED=$(date +%Y-%m-%dT%H:%M:%S%z)
    if ((dry_run)); then
        GC_WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")
        trap 'rm -rf "$GC_WORK"' EXIT
    else
        GC_WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    fi
    export GC_WORK GC_SITE=$GC_WORK/site GC_RUNS=$GC_WORK/runs GC_LOGS=$GC_WORK/logs
    export GC_DEADLINE=$((EPOCHSECONDS + GC_BUDGET))
    # The carried wheels first, then the checkout's src/ (io.config_dir() falls back to the checkout's conf/).
    export PYTHONPATH=$GC_SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
    export XDG_CACHE_HOME=$GC_WORK/cache              # the decoded-JPEG cache: written by 5a, read after
    export TORCHINDUCTOR_CACHE_DIR=$GC_WORK/inductor  # cold for 5b's compile every run; warm for 6 and 7
    mkdir -p "$GC_OUT" "$GC_LOGS" "$GC_RUNS" "$GC_WORK/steps" "$GC_WORK/figures"
    printf '%s\n' "${PLAN[@]}" >"$GC_WORK/plan.tsv"

    print_plan || return 1
    local i failed=0
    if ((dry_run)); then
        bash -n "$SELF" && bash -n "$REPO/scripts/gpu_prepare.sh" || failed=1
        for i in "${!PLAN[@]}"; do
            IFS='|' read -r _ name _ _ _ <<<"${PLAN[i]}"
            bash "$SELF" --step "$name" || failed=1
        done
        helper validate || failed=1
        helper assemble
        echo "[gpu_check] dry run: wrote $GC_OUT/gpu_check.json; $([[ $failed == 0 ]] && echo ok || echo FAILED)"
        return $failed
    fi
    echo "[gpu_check] work dir $GC_WORK; python $GC_PY; device $GC_DEVICE"
    helper assemble
    for i in "${!PLAN[@]}"; do
        run_step "$i" || failed=1
    done
    archive_logs || failed=1
    echo "[gpu_check] wrote $GC_OUT/gpu_check.json and logs.tar.gz; $([[ $failed == 0 ]] && echo 'every step passed' \
        || echo 'some steps did not pass')"
    return $failed
}

# The extra overrides, as words (each step's process parses them again from the environment).
read -r -a GC_EXTRA <<<"${GPU_CHECK_EXTRA:-}"
main "$@"
