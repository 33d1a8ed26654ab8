#!/usr/bin/env bash
# The GPU check (issue 18): what only a GPU can show, measured in ONE device command, ~7 minutes.
#
#   1. Here, on the CPU machine (PyPI reachable), once per session:
#        bash scripts/gpu_prepare.sh
#      fills the git-ignored .gpu/ (~27 MiB): the JPEG copy of CIFAR-10 and the wheels the GPU machine lacks.
#   2. The device tool's run, exactly:
#        command:   bash scripts/gpu_check.sh
#        carry:     [".gpu"]
#        timeout_s: 460
#      The steps' timeouts sum to at most GPU_CHECK_BUDGET (400 s); the other 60 s cover kill graces and the
#      archive. What comes back (under files_at): gpu_check.json (every step's status, seconds, timeout and
#      figures, rewritten after each step) and logs.tar.gz (the steps' logs and the runs' summary.json,
#      metrics.csv and logs; no checkpoints). Exit 0 only if every step passed.
#      The full experiment=fast preset is 26 epochs, so one call likely finishes one seed of step 6. The 3-seed
#      mean issue 18 asks for may need a second call, `GPU_CHECK_STEPS=6 bash scripts/gpu_check.sh` (setup, then
#      seeds 0, 1, 2 again), with GPU_CHECK_BUDGET and timeout_s (budget + 60) cut to the device time left: the
#      session has 15 minutes, the machine's start included, and the first call uses ~10 of them.
#      Not covered: exact resume on CUDA with trainer.compile=true (pytest -m cuda resumes eager runs only).
#   3. Without a GPU (tests/test_gpu_check.py runs it in `make test`):
#        bash scripts/gpu_check.sh --dry-run [--out DIR]
#      checks the bash syntax, every `cifar-cam` command line the run would start (the CLI's torch-free
#      pre-check, all in one process) and bench.py's flags, prints the plan and writes gpu_check.json with
#      every step "planned". It needs neither .gpu/ nor a GPU nor the network.
#
# Environment: OUT (where the two files go; default outputs/gpu_check), GPU_CHECK_PYTHON (default: the active
# virtualenv's python, else .venv/bin/python, else python3, which on the GPU machine is the one with torch), GPU_CHECK_EXTRA (overrides appended to every `cifar-cam train` line),
# GPU_CHECK_BUDGET (seconds, default 400), GPU_CHECK_STEPS (a comma list of step names or numbers to run, e.g.
# "6,7" for a rerun; setup always runs; default all), GPU_CHECK_DEVICE (default cuda; cpu only to try the harness here).
#
# Each step runs under its own `timeout` and the next one starts whatever happened. A step's timeout is its
# planned seconds; the two flexible steps (6, 7) also get what the earlier steps left unused, while every
# later step's planned seconds stay reserved, so the whole run ends within the budget. A flexible step's planned
# seconds are only that reserve: step 6 runs on what 0-5c leave (they usually end well inside their timeouts).
#
# The python half (the env probe, each step's figures, gpu_check.json, the dry run's pre-check) is
# scripts/gpu_check_report.py, called as `report SUBCOMMAND ...`.
set -u
set -o pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
DEVICE_CALL_TIMEOUT=460

# number | name | planned seconds | fixed or flex | what it shows (ordered by value: the run can be cut short)
# 4 gets 70 s: its resume test alone is three CLI start-ups with CUDA; 5b 100 s: a cold inductor compile of
# ResNet18's forward and backward.
PLAN=(
    "0|setup|15|fixed|install the carried wheels (pip --no-index --target); cifar_cam importable from src/"
    "1|env|20|fixed|nvidia-smi line, python / torch / CUDA / cuDNN versions, GPU name, native bf16"
    "2|bench_quick|25|fixed|scripts/bench.py --quick on CUDA: every path of the bench runs"
    "3|synthetic|50|fixed|data=synthetic on CUDA: train with optimizer=muon, eval and gradcam of it; train with fp16 (GradScaler)"
    "4|pytest_cuda|70|fixed|pytest -m cuda: the CUDA-only tests (resume on CUDA among them), 4 at a time"
    "5a|fast2_eager|35|fixed|experiment=fast, 2 epochs, on the JPEG archive, trainer.compile=false"
    "5b|fast2_compiled|100|fixed|the same with trainer.compile=true: compile_seconds, recompiles, epoch seconds"
    "5c|cpu_quick|40|fixed|experiment=cpu_quick (airbench and its SGD recipe), its 10 epochs without the time budget"
    "6|fast_seeds|15|flex|the full experiment=fast preset, seed=0,1,2 while the budget lasts: test_acc, wall_seconds"
    "7|bench_ceiling|25|flex|scripts/bench.py at the preset's batch 500, crop_flip, torch backend: the ceiling ratio"
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

# report SUBCOMMAND ARG...: the python half (env probe, each step's figures, gpu_check.json, the dry run's pre-check).
report() { "$GC_PY" "$REPO/scripts/gpu_check_report.py" "$@"; }

# ----------------------------------------------------------------------------- the steps (one process each)
# A step only runs commands. Its figures are read afterwards by the driver (report finish), from what
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
    py scripts/gpu_check_report.py env
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

step_cpu_quick() {  # the CPU preset's model and recipe (the model table's winner) at a GPU's speed
    cc train experiment=cpu_quick data=folder "data.root=$GC_ARCHIVE" trainer.time_budget=null \
        "trainer.device=$GC_DEVICE" "hydra.run.dir=$GC_RUNS/cpu_quick" "${GC_EXTRA[@]}"
}

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
        report finish "$name" not_selected -1 0 0 0 >/dev/null 2>&1
        return 0
    fi
    avail=$((GC_DEADLINE - EPOCHSECONDS - $(planned_after "$1")))
    if [[ $kind == flex ]]; then t=$avail; else t=$((planned < avail ? planned : avail)); fi
    start=$(now_us)
    if ((t < MIN_STEP_SECONDS)); then
        echo "[gpu_check] $number $name: skipped, ${t} s left for it" | tee "$log"
        report finish "$name" skipped -1 "$start" "$(now_us)" "$t" >/dev/null 2>>"$log"
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
    status=$(report finish "$name" "$status" "$rc" "$start" "$(now_us)" "$t" 2>>"$log") || status=fail
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
    # The project's python: the active virtualenv's, else make install's .venv (here; it never travels), else python3
    local default_py=python3
    if [[ -n ${VIRTUAL_ENV:-} ]]; then default_py=python; elif [[ -x $REPO/.venv/bin/python ]]; then default_py=$REPO/.venv/bin/python; fi
    export GC_DRY=$dry_run GC_REPO=$REPO GC_PY=${GPU_CHECK_PYTHON:-$default_py} GC_DEVICE=${GPU_CHECK_DEVICE:-cuda}
    export GC_BUDGET=${GPU_CHECK_BUDGET:-400} GC_DEVICE_CALL_TIMEOUT=$DEVICE_CALL_TIMEOUT
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
        report validate || failed=1
        report assemble
        echo "[gpu_check] dry run: wrote $GC_OUT/gpu_check.json; $([[ $failed == 0 ]] && echo ok || echo FAILED)"
        return $failed
    fi
    echo "[gpu_check] work dir $GC_WORK; python $GC_PY; device $GC_DEVICE"
    report assemble
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
