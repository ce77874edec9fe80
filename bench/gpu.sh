#!/usr/bin/env bash
# The runtime on an NVIDIA GPU in one command: install what bench/gpu.py needs, then prove the
# CUDA provider runs, check it against the CPU provider and time both side by side.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/gpu.sh [BUNDLE] [bench/gpu.py options: --batches 1 256 2000 --reps 10 --out PATH]

On a machine with an NVIDIA GPU and its driver, from anywhere in the repository:
  1. prints nvidia-smi (and stops if there is none);
  2. uses the environment $VENV, default .venv; where it does not exist, makes it with
     --system-site-packages, so a torch and CUDA libraries already on the machine are used;
  3. installs the project with its runtime dependencies (onnxruntime-gpu among them), and
     torch for the export when none is importable (the pinned CPU build: the export needs no
     CUDA torch);
  4. runs bench/gpu.py --device cuda: a random model of the default shape exported to a
     temporary bundle (or BUNDLE), the CUDA provider asserted, parity with the CPU provider,
     step_rows, rebuild and top_k timed at batch 1, 256 and 2000 on both; the table is
     printed, and written as JSON to $OUT/gpu.json when OUT is set or to --out PATH.

Environment:
  WHEELHOUSE=dir   no internet: install from the wheels in dir alone (pip --no-index
                   --find-links dir), and only what bench/gpu.py imports: onnxruntime-gpu,
                   onnx, numpy, numba, and torch where none is importable
  VENV=dir         the environment to use, or to make
  PYTHON=python3   the interpreter a new environment is made from
  SKIP_INSTALL=1   install nothing: the environment is ready

onnxruntime-gpu must match the machine's CUDA major version and find cuDNN; where it does not,
bench/gpu.py stops with ORT's own words ("the CUDA provider did not load: ...").
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

args=("$@")
if [[ $# -gt 0 && "$1" != -* ]]; then
  args[0]=$(realpath "$1") # the bundle, as given from the caller's directory
fi
cd "$(dirname "$0")/.."

echo "== nvidia-smi"
if ! nvidia-smi; then
  echo "error: nvidia-smi failed: this machine has no NVIDIA GPU or driver" >&2
  exit 1
fi

venv=${VENV:-.venv}
if [[ ! -x "$venv/bin/python" ]]; then
  echo "== making $venv"
  "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"

if [[ "${SKIP_INSTALL:-}" != 1 ]]; then
  echo "== installing into $venv${WHEELHOUSE:+ from $WHEELHOUSE}"
  pip=("$py" -m pip install -q --disable-pip-version-check)
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    pip+=(--no-index --find-links "$WHEELHOUSE")
  fi
  torch=()
  if ! "$py" -c 'import torch' 2>/dev/null; then
    torch=("$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')")
  fi
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    # bench/gpu.py puts the tree on its path: no build of the project, no build backend to fetch
    "${pip[@]}" onnxruntime-gpu onnx numpy numba "${torch[@]}"
  else
    if [[ ${#torch[@]} -gt 0 ]]; then
      "${pip[@]}" "${torch[@]}" --index-url https://download.pytorch.org/whl/cpu
    fi
    "${pip[@]}" -e .
  fi
  # The CPU package 'onnxruntime' installs into the same folder as onnxruntime-gpu: whichever
  # came last wins, and the CPU one has no CUDA provider.
  if ! "$py" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    echo "== onnxruntime in $venv has no CUDA provider: reinstalling onnxruntime-gpu"
    "$py" -m pip uninstall -y -q onnxruntime onnxruntime-gpu || true
    "${pip[@]}" onnxruntime-gpu
  fi
fi

echo "== bench/gpu.py --device cuda ${args[*]}"
PYTHONUNBUFFERED=1 exec "$py" bench/gpu.py --device cuda "${args[@]}"
