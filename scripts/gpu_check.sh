#!/usr/bin/env bash
# The GPU check of issue 14: one command, about 8 minutes on one H200, one output folder.
#
#   scripts/gpu_check.sh --out DIR              on a CUDA machine (the device tool: --out "$OUT")
#   scripts/gpu_check.sh --out DIR --cpu-smoke  anywhere: every step's code path, tiny, on CPU
#
# 1. tests/test_kernels_gpu.py: compiled Triton SSD and Fourier filter vs their PyTorch
#    twins (fp32, bf16) and vs mamba_ssm's mamba_chunk_scan_combined  -> kernel_tests.log
# 2. benchmarks/kernels.py at batch 1024, L 20/50/200/1000, 8 heads of 64, state 64, in
#    bf16 and fp32: ratios vs the PyTorch reference, the quadratic form and mamba_ssm, and
#    achieved bandwidth / FLOP/s against measured ceilings  -> kernels_{bf16,fp32}.{json,txt}
# 3. benchmarks/gpu_step.py step: MMM4Rec training step (paper sizes, 1 and 2 layers) in
#    bf16 and fp32 vs SASRec; the catalog loss at 10^6 items  -> train_step.json
# 4. benchmarks/gpu_step.py report  -> summary.json + summary.md (with meta.json, log.txt)
#
# Needs torch with CUDA and triton; no deepspeed, torchrec, fbgemm or webdataset (none is
# imported). mamba_ssm: an installed one, else its pure-Python Triton sources found in this
# checkout's .venv (scripts/setup.sh --dev installs them there; the device tool carries
# them with carry [".venv/lib/python3.11/site-packages/mamba_ssm"]). Each part has its own
# time limit; a part that fails or times out is recorded, the others still run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="" SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required (see --help)" >&2; exit 2; }
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rm -f "$OUT/meta.json"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET MMM4REC_KERNELS
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("mamba_ssm") is None)' 2>/dev/null; then
  for d in .venv/lib/python3*/site-packages; do
    if [ -d "$d/mamba_ssm" ]; then
      MAMBA=$(mktemp -d); ln -s "$PWD/$d/mamba_ssm" "$MAMBA/mamba_ssm"
      export PYTHONPATH="$PYTHONPATH:$MAMBA"; break
    fi
  done
fi
LOG="$OUT/log.txt"
: > "$LOG"
part() {  # part SECONDS NAME COMMAND...: run with a limit, log it, never stop the script
  local limit=$1 name=$2; shift 2
  echo "[gpu_check] $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  return 0
}
"$PY" - "$OUT/meta.json" "$SMOKE" <<'PY'
import json, subprocess, sys, time
import torch
meta = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_smoke": sys.argv[2] == "1",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    meta["driver"] = q.stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    meta["driver"] = None
try:
    import triton
    meta["triton"] = triton.__version__
except ImportError:
    meta["triton"] = None
from benchmarks.kernel_checks import load_mamba_chunk_scan_combined
meta["mamba_ssm"] = load_mamba_chunk_scan_combined()[1]
json.dump(meta, open(sys.argv[1], "w"), indent=2)
print("[gpu_check]", meta)
PY
[ -f "$OUT/meta.json" ] || { echo "gpu_check.sh: $PY cannot import torch / mmm4rec (set PYTHON=...)" >&2; exit 2; }
if [ "$SMOKE" = 1 ]; then
  part 300 "kernel tests (CPU: they skip, with their reason)" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py > /dev/null
  cp "$LOG" "$OUT/kernel_tests.log"
  part 300 "kernels benchmark bf16 (CPU: interpreter smoke)" \
    "$PY" -m benchmarks.kernels --interpret-smoke --json "$OUT/kernels_bf16.json"
  sed -n "/\[gpu_check\] kernels benchmark bf16 (/,\$p" "$LOG" > "$OUT/kernels_bf16.txt"
  part 600 "training step (CPU smoke)" "$PY" -m benchmarks.gpu_step step --out "$OUT" --cpu-smoke
else
  echo "[gpu_check] kernel tests (limit 210s)" | tee -a "$LOG"
  timeout --kill-after=10 210 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py \
    > "$OUT/kernel_tests.log" 2>&1
  echo "[gpu_check] kernel tests: exit $?" | tee -a "$LOG"
  tail -n 5 "$OUT/kernel_tests.log" | tee -a "$LOG"
  for dt in bf16 fp32; do
    part 100 "kernels benchmark $dt" "$PY" -m benchmarks.kernels --dtype "$dt" --batch 1024 \
      --lengths 20,50,200,1000 --json "$OUT/kernels_$dt.json"
    sed -n "/\[gpu_check\] kernels benchmark $dt (/,\$p" "$LOG" > "$OUT/kernels_$dt.txt"
  done
  part 150 "training step" "$PY" -m benchmarks.gpu_step step --out "$OUT"
fi
part 60 "report" "$PY" -m benchmarks.gpu_step report --out "$OUT"
echo "[gpu_check] done: $OUT/summary.md"
