#!/usr/bin/env bash
# The GPU check: the harness's torch path on a GPU machine that has PyTorch, torchvision and timm but
# no TensorFlow and no network (docs/gpus-and-machines.md, "Checking a GPU machine").
#
#   scripts/gpu_check.sh download [--python 3.12] [--have NAMES|FILE]   here, with the package index:
#       the harness's other runtime dependencies as wheels for the GPU machine's Python, into wheels/
#   scripts/gpu_check.sh run [--set KEY=VALUE ...]                      there, offline, on the GPU(s):
#       a venv over the machine's torch, the wheels and the harness installed into it, then
#       sweeps/gpu-check.yaml with --workers auto; prints images per second, peak GPU memory per
#       worker and the trials finished
#   scripts/gpu_check.sh smoke                                          the same on a CPU, a tiny copy
#
# Environment: WHEELS (the wheels folder, default wheels/), GPU_CHECK_DIR (the venv and the sweep's
# results, default /tmp/gpu-check), GPU_CHECK_PYTHON (the Python that has torch, default python3),
# GPU_CHECK_TIMEOUT (seconds the sweep may run before it is stopped, default 360),
# GPU_CHECK_CONFIG (default sweeps/gpu-check.yaml), GPU_CHECK_OUT (a folder to copy the report, the
# sweep's output, the GPU samples and the config into).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
wheels=$(realpath -m "${WHEELS:-wheels}")
dir=$(realpath -m "${GPU_CHECK_DIR:-/tmp/gpu-check}")
python=${GPU_CHECK_PYTHON:-python3}
timeout=${GPU_CHECK_TIMEOUT:-360}
config=$(realpath -m "${GPU_CHECK_CONFIG:-sweeps/gpu-check.yaml}")
budget_mib=64  # what may travel with the working tree to the GPU machine: tracked files and wheels together

# What torchvision requires, so any machine with it has them: not carried (22 MiB of wheels).
have_default="numpy pillow"

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

# The harness's runtime dependencies without TensorFlow: pyproject.toml's, less keras, and less
# scikit-learn (only the digits data, two-class AUC, balanced class weights and screening import it;
# the check uses none of them), with mlflow-skinny for mlflow (the client, the SQLite tracking store and
# the model registry, without the UI server and its pyarrow, scikit-learn and Flask: with the full
# mlflow the set is 162 MiB for Python 3.12, against 87), SQLAlchemy and alembic for that store, nvidia-ml-py
# for the GPU's system metrics (the gpu extra), and setuptools and wheel to install the harness itself offline.
requirements() {
    python3 - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
    if name in ("keras", "scikit-learn"):
        continue
    print("mlflow-skinny" + dep[len(name):].split("#")[0].strip() if name == "mlflow" else dep.split("#")[0].strip())
print(next(d for d in project["optional-dependencies"]["gpu"] if d.startswith("nvidia-ml-py")))
print("sqlalchemy>=1.4,<3")
print("alembic>=1.5,!=1.10.0,<2")
print("setuptools>=68")
print("wheel")
EOF
}

# Lower-case, '-'-separated project names, one a line, of a list "a,b c" or a file (`pip list
# --format=freeze` output, or one name a line).
names_of() {
    local spec=$1
    if [ -f "$spec" ]; then cat "$spec"; else echo "$spec"; fi |
        tr ', ' '\n\n' | sed -e 's/[=<>!~;[].*//' | tr '[:upper:]_.' '[:lower:]--' | grep -v '^$' || true
}

download() {
    local pyver=3.12 have=$have_default
    while [ $# -gt 0 ]; do
        case $1 in
        --python) pyver=$2; shift 2 ;;
        --have) have="$have_default $(names_of "$2" | tr '\n' ' ')"; shift 2 ;;
        *) die "download: unknown argument $1" ;;
        esac
    done
    mkdir -p "$wheels"
    rm -f "$wheels"/*.whl
    requirements >"$wheels/requirements.txt"
    echo "downloading for CPython $pyver on x86_64 Linux into $wheels:"
    sed 's/^/  /' "$wheels/requirements.txt"
    local platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download --quiet --disable-pip-version-check --only-binary :all: --implementation cp \
        --python-version "$pyver" "${platforms[@]}" -d "$wheels" -r "$wheels/requirements.txt"
    local skip=" $(names_of "$have" | tr '\n' ' ') " dropped=()
    for f in "$wheels"/*.whl; do
        local name
        name=$(basename "$f" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
        # Wheels under 1 MiB stay all the same: where the machine's copy is too old for a carried
        # package (protobuf for opentelemetry, say), pip takes the carried one instead of failing.
        if [[ $skip == *" $name "* ]] && [ "$(stat -c %s "$f")" -ge 1048576 ]; then
            dropped+=("$name")
            rm -f "$f"
        fi
    done
    [ ${#dropped[@]} -eq 0 ] || echo "not carried (on the GPU machine already): ${dropped[*]}"
    report_size
}

# The wheels' size against what may travel: the tracked files take their share first.
report_size() {
    local wheel_bytes tracked_bytes=0
    wheel_bytes=$(find "$wheels" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        tracked_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    fi
    echo "largest wheels:"
    find "$wheels" -name '*.whl' -printf '%s %f\n' | sort -rn | head -8 |
        awk '{printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}'
    awk -v w="$wheel_bytes" -v t="$tracked_bytes" -v b="$budget_mib" -v n="$(find "$wheels" -name '*.whl' | wc -l)" 'BEGIN {
        printf "wheels: %d files, %.1f MiB; tracked files: %.1f MiB; together %.1f MiB of %d MiB\n", n, w / 1048576, t / 1048576, (w + t) / 1048576, b
        if (w + t > b * 1048576) {
            printf "over by %.1f MiB: name what the GPU machine already has with --have (its `pip list --format=freeze`, or names)\n", (w + t) / 1048576 - b
            exit 3
        }
    }'
}

pip=()  # the pip that installs into the check's venv (make_venv says which)

# pip from the carried wheels only: no index, and none of this machine's pip settings.
offline_pip() {
    env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_REQUIREMENT \
        -u PIP_USER -u PIP_TARGET -u PIP_PREFIX PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "${pip[@]}" install --quiet --no-index --find-links "$wheels" "$@"
}

# A venv over $python's packages. Where $python is itself a venv (as on machines whose python3 is a
# venv holding torch), a venv made from it sees its base interpreter's packages, not its own: a .pth
# adds them, after the venv's own. Where $python has no ensurepip, the venv has no pip of its own and
# $python's pip installs into it.
make_venv() {
    rm -rf "$dir/venv"
    if "$python" -m venv --system-site-packages "$dir/venv" 2>"$dir/venv.log"; then
        pip=("$dir/venv/bin/python" -m pip)
    else
        rm -rf "$dir/venv"
        "$python" -m venv --system-site-packages --without-pip "$dir/venv"
        pip=("$python" -m pip --python "$dir/venv/bin/python")
    fi
    local purelib
    purelib=$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' |
        sed "s/.*/import site; site.addsitedir('&')/" >"$purelib/_gpu_check_base.pth"
}

setup_venv() {
    [ -f "$wheels/requirements.txt" ] || die "no $wheels/requirements.txt: run 'scripts/gpu_check.sh download' where the package index is reachable, and carry $wheels"
    "$python" -c 'import torch, torchvision, timm' 2>/dev/null ||
        die "$python cannot import torch, torchvision and timm: set GPU_CHECK_PYTHON to the Python that has them"
    local started=$SECONDS
    local state="reused"
    if [ ! -f "$dir/venv/.installed" ]; then
        state="made"
        make_venv
        offline_pip -r "$wheels/requirements.txt" ||
            die "a requirement above is neither installed for $python nor in $wheels: download again, without it in --have"
        # Editable: the harness's assets stay where they are. Built with the venv's setuptools (an
        # isolated build would need its own copies of setuptools' dependencies); its notes go to a log.
        offline_pip --no-deps --no-build-isolation -e "$repo" >"$dir/install-harness.log" 2>&1 || {
            cat "$dir/install-harness.log" >&2
            die "the harness did not install"
        }
        touch "$dir/venv/.installed"
    fi
    echo "venv $dir/venv $state in $((SECONDS - started)) s (wheels from $wheels; torch, torchvision, timm: $python's)"
    "$dir/venv/bin/python" - <<'EOF'
import importlib, platform, sys
needed = ["torch", "torchvision", "timm", "optuna", "mlflow", "sqlalchemy", "alembic", "pandas", "scipy",
          "matplotlib", "pydantic", "yaml", "numpy", "PIL", "tabulate", "jinja2", "psutil", "tqdm", "harness"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - each missing one is named, all at once
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing))
import mlflow, optuna, torch, torchvision, timm
try:
    import pynvml  # nvidia-ml-py: GPU memory and use in MLflow's system metrics, and the check's sampler
    nvml = "nvidia-ml-py present"
except ImportError:
    nvml = "no nvidia-ml-py: no GPU system metrics"
print(f"Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, timm {timm.__version__}, optuna {optuna.__version__}, "
      f"mlflow {mlflow.__version__}; {nvml}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
EOF
}

run_check() {
    local smoke=$1
    shift
    if [ -z "$smoke" ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi -L || true
        "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
            die "torch sees no GPU here ('scripts/gpu_check.sh smoke' runs a tiny copy on a CPU)"
    fi
    local started=$SECONDS
    mkdir -p "$dir"
    setup_venv
    rm -rf "$dir/work"
    local rc=0
    "$dir/venv/bin/python" scripts/gpu_check.py run "$config" --workdir "$dir/work" --timeout "$timeout" $smoke "$@" || rc=$?
    if [ -n "${GPU_CHECK_OUT:-}" ]; then  # what to keep: the report, the sweep's output, the samples, the config
        mkdir -p "$GPU_CHECK_OUT"
        for f in report.txt sweep.log gpu-check.json gpu-check.yaml; do
            [ ! -f "$dir/work/$f" ] || cp "$dir/work/$f" "$GPU_CHECK_OUT/"
        done
    fi
    echo "gpu check: $((SECONDS - started)) s in all (install, sweep, read-back); exit $rc"
    return $rc
}

case ${1:-} in
download) shift; download "$@" ;;
run) shift; run_check "" "$@" ;;
smoke) shift; run_check --smoke "$@" ;;
*) die "usage: scripts/gpu_check.sh download [--python 3.12] [--have NAMES|FILE] | run [--set KEY=VALUE ...] | smoke" ;;
esac
