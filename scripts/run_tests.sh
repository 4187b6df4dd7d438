#!/usr/bin/env bash
# Run the whole test suite (what `make test` and CI call): ruff over the repo
# ([tool.ruff] in pyproject.toml), mypy over the core packages ([tool.mypy]), then two pytest processes:
#   1. everything but the Triton kernel tests
#   2. the kernel tests with TRITON_INTERPRET=1 (set before triton is imported)
# then print one combined closing line. Extra arguments go to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${MMM4REC_VENV:-.venv}
PY=$VENV/bin/python
# the venv first on PATH: Triton's compile check and any DeepSpeed JIT op use its tools
# (two ninjas on PATH invalidate each other's cached builds)
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=$(mktemp -d)
shopt -s nullglob
kernel_tests=(tests/test_kernels_*.py)
ignore=()
for f in "${kernel_tests[@]}"; do ignore+=(--ignore "$f"); done

if $PY -m ruff check .; then rc0=0; else rc0=1; echo "lint: ruff found problems (ruff check --fix . mends the [*] ones)"; fi
# types: mypy over the core packages ([tool.mypy] in pyproject.toml: the files and settings)
if $PY -m mypy; then :; else rc0=1; echo "types: mypy found problems"; fi

$PY -m pytest tests "${ignore[@]}" --junitxml "$OUT/main.xml" "$@"
rc1=$?
rc2=0
if [ ${#kernel_tests[@]} -gt 0 ]; then
  TRITON_INTERPRET=1 $PY -m pytest "${kernel_tests[@]}" --junitxml "$OUT/kernels.xml" "$@"
  rc2=$?
fi
$PY - "$OUT" <<'PY'
import sys, glob, xml.etree.ElementTree as ET
t = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for s in ET.parse(f).getroot().iter("testsuite"):
        for k in t:
            t[k] += int(s.get(k, 0))
failed = t["failures"] + t["errors"]
passed = t["tests"] - failed - t["skipped"]
print(f"all: {passed} passed, {failed} failed, {t['skipped']} skipped")
PY
# pytest exit 5 = no tests collected (e.g. a -m filter): not a failure of the suite
[ $rc1 -eq 5 ] && rc1=0
[ $rc2 -eq 5 ] && rc2=0
exit $(( rc0 != 0 || rc1 != 0 || rc2 != 0 ))
