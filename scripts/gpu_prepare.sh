#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what scripts/gpu_check.sh needs on the GPU machine, which has no network:
#   .gpu/cifar10-jpg.tar.gz   the JPEG copy of CIFAR-10 from ../shared/data (../shared does not travel)
#   .gpu/wheels/*.whl         the Python packages that machine lacks, for CPython 3.12 on x86-64 Linux
# Run it here (the CPU machine, PyPI reachable), then the device run documented at the top of gpu_check.sh.
#   bash scripts/gpu_prepare.sh            # idempotent: what is already in .gpu/ is kept
# Versions are this checkout's venv's (PY=...), so the GPU machine runs what the tests here ran.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PY:-.venv/bin/python}
DATA=${GPU_DATA:-../shared/data/cifar10-jpg.tar.gz}
DEST=.gpu
MAX_MIB=40  # the working tree travels in 64 MiB, carried folders included

# Missing on the GPU machine (/work/.library/device/KINDS.md), on the path of `cifar-cam train|eval|gradcam`,
# scripts/bench.py and tests/conftest.py: hydra + its parser; albumentations + albucore and their needs;
# torch-lr-finder (tasks/lr_find), grad-cam + ttach (tests/test_cam.py's reference), so pytest can collect those.
# typing-extensions is there but of unknown age; pydantic 2.x needs a recent one.
PACKAGES=(
    hydra-core omegaconf antlr4-python3-runtime
    albumentations albucore simsimd stringzilla
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    torch-lr-finder grad-cam ttach
)
PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

mkdir -p "$DEST/wheels"
if [[ ! -f $DEST/cifar10-jpg.tar.gz ]] || ! cmp -s "$DATA" "$DEST/cifar10-jpg.tar.gz"; then
    cp "$DATA" "$DEST/cifar10-jpg.tar.gz"
    chmod u+w "$DEST/cifar10-jpg.tar.gz"  # ../shared is read-only; a later copy must be able to replace it
fi
if [[ -f $DATA.sha256 ]]; then
    (cd "$DEST" && sed 's/ .*/  cifar10-jpg.tar.gz/' "$REPO/$DATA.sha256" | sha256sum --check --quiet)
fi

wheels() { find "$DEST/wheels" -maxdepth 1 -name '*.whl' -printf '%f\n'; }
have() {  # have NAME VERSION: the wheel files of that version (a wheel's name: dashes as underscores, any case)
    wheels | grep -i "^${1//-/_}-$2-"
}

for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    if have "$name" "$version" >/dev/null; then
        continue
    fi
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLATFORMS[@]}" -d "$DEST/wheels" "$name==$version" 2>/dev/null; then
        # sdist only (antlr4-python3-runtime, grad-cam): pure Python, so a wheel built here installs there
        "$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" "$name==$version"
        have "$name" "$version" | grep -q -- "-py3-none-any.whl$" \
            || { echo "gpu_prepare: $name $version built a platform wheel: it would not install there" >&2; exit 1; }
    fi
done

# One version of each, or pip refuses the whole install there.
dupes=$(wheels | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dupes ]] || { echo "gpu_prepare: two versions of: $dupes (remove the older from $DEST/wheels)" >&2; exit 1; }

du -b "$DEST/wheels"/*.whl "$DEST/cifar10-jpg.tar.gz" | sort -n \
    | awk -v max="$MAX_MIB" '{ printf "%9.2f MiB  %s\n", $1 / 1048576, $2; t += $1 }
        END { printf "%9.2f MiB  total in .gpu/ (limit %d MiB)\n", t / 1048576, max; exit (t > max * 1048576) }'
echo "gpu_prepare: ready; run the device call at the top of scripts/gpu_check.sh (carry [\".gpu\"])"
