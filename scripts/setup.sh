#!/usr/bin/env bash
# Set up MMM4Rec's Python environment in ./.venv (idempotent).
#
#   scripts/setup.sh            runtime deps + the package (quickstart)
#   scripts/setup.sh --dev      + test deps, moto S3 server, mamba-ssm's Triton sources,
#                               Slurm/munge/iproute2 (Debian)
#   scripts/setup.sh --latest   the newest versions pyproject.toml allows instead of the lock
#                               (`make test-latest`: into a throwaway venv, MMM4REC_VENV=DIR)
#
# Every install is constrained by scripts/requirements-cpu.lock (the versions the suite passed
# with; `scripts/lock.py` regenerates it), so a fresh venv and an old one end at the same stack;
# a changed lock changes the stamp below, and the next run reinstalls.
#
# The same extras as a pip user's install (pyproject.toml, docs/install.md); the order matters:
#   1. torch 2.13.0 CPU build first; a constraints file pins it for every later step
#   2. mmm4rec with [cpu,s3,features,plots] (+ trackers,dev): [cpu] = fbgemm-gpu-cpu 1.8.0,
#      the one fbgemm build that loads against torch 2.13.0
#   3. torchrec 1.8.0 with --no-deps (its metadata asks for the CUDA fbgemm-gpu, so no
#      extra can name it on CPU)
# GPU clusters: see docs/install.md (pip install "mmm4rec[gpu,s3]", torchrec included).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
LATEST=0
for a in "$@"; do
  case "$a" in
    --dev) DEV=1 ;;
    --latest) LATEST=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=${MMM4REC_VENV:-.venv}
LOCK=scripts/requirements-cpu.lock
STAMP="$VENV/.mmm4rec-setup-$(cat pyproject.toml scripts/setup.sh scripts/constraints-cpu.txt $LOCK | sha256sum | cut -c1-16)-$DEV-$LATEST"
if [ -f "$STAMP" ]; then
  echo "[setup] $VENV is up to date"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"
  if [ "$LATEST" = 1 ]; then
    C="-c scripts/constraints-cpu.txt"
    echo "[setup] --latest: the newest versions pyproject.toml allows (not $LOCK)"
  else
    C="-c scripts/constraints-cpu.txt -c $LOCK"
  fi
  echo "[setup] torch (CPU build)"
  $PIP $C "torch==2.13.0"
  if [ "$DEV" = 1 ]; then EXTRAS="[cpu,s3,features,plots,trackers,serve,dev]"; else EXTRAS="[cpu,s3,features,plots]"; fi
  echo "[setup] mmm4rec$EXTRAS (fbgemm-gpu-cpu through [cpu])"
  DS_BUILD_OPS=0 $PIP $C -e ".$EXTRAS"
  echo "[setup] torchrec (no-deps)"
  $PIP $C --no-deps "torchrec==1.8.0"
  if [ "$DEV" = 1 ]; then
    # mamba_ssm's Triton sources without its CUDA extensions: the kernel tests compare our
    # SSD with its mamba_chunk_scan_combined under Triton's interpreter (docs/kernels.md)
    echo "[setup] mamba-ssm 2.3.2.post1 (Triton sources only, no CUDA build)"
    $PIP $C wheel
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
      $PIP $C --no-deps --no-build-isolation "mamba-ssm==2.3.2.post1"
  fi
  "$VENV/bin/python" - <<'PY'
import torch, sys
if "+cpu" not in torch.__version__ and not torch.cuda.is_available():
    sys.exit(f"[setup] torch {torch.__version__} is not the CPU build: the constraints were bypassed")
import fbgemm_gpu, torchrec  # noqa: F401  (fails loudly on an fbgemm/torch mismatch)
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec,'__version__') else 'ok'}")
PY
  rm -f "$VENV"/.mmm4rec-setup-*
  touch "$STAMP"
fi
if [ "$DEV" = 1 ] && ! { command -v slurmctld && command -v munged && command -v shellcheck && command -v ip; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] Slurm, munge, shellcheck and iproute2 (two-node Slurm tests) from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge shellcheck iproute2 >/dev/null
  else
    echo "[setup] not root or no apt-get: Slurm tests will skip (install slurm-wlm and munge yourself)" >&2
  fi
fi
