"""Compile every Triton kernel for real CUDA targets, on a machine without a GPU.

Triton's interpreter runs the kernels' arithmetic on CPU but not its compiler, which
rejects things the interpreter accepts (a non-constexpr global, an illegal layout, a
tile that does not fit in shared memory). This tool runs the real pipeline, Triton IR ->
PTX -> cubin with the ptxas Triton ships, for each kernel at the shapes and dtypes the
model uses, and reports registers, spills and shared memory per variant:

    python -m benchmarks.compile_check [--arch 90 80] [--dtype fp32 bf16] [--quick]

It stands in a fake driver for the missing GPU (it only answers "which target") and
launches every kernel in warm-up mode (compile, do not run), so nothing is executed.
Must run without TRITON_INTERPRET. Exit status 1 when a kernel fails to compile or a
variant needs more shared memory than the architecture gives one block.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

# shared memory one block may use (opt-in maximum), by compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _ptxas_info(ptx: str, arch: int) -> str:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"{regs.group(1) if regs else '?':>3s} regs, "
            f"spills {spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} B")


def run(archs, dtypes, quick: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print("compile_check: unset TRITON_INTERPRET (it replaces the compiler)", file=sys.stderr)
        return 2
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from benchmarks.kernel_checks import SSDShape, fourier_inputs, ssd_inputs
    from mmm4rec.kernels import fourier_fused, ssd_combined

    state = {"arch": None, "tag": ""}

    class _TargetOnlyDriver:
        def get_current_device(self):       # one "device" per target: separate kernel caches
            return state["arch"]

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", state["arch"], 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    rows, failures, seen = [], [], set()
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (state["arch"], self.fn.__name__, kernel.asm["ptx"])
        if key not in seen:
            seen.add(key)
            smem = kernel.metadata.shared
            limit = SMEM_LIMIT.get(state["arch"])
            over = limit is not None and smem > limit
            rows.append(f"sm_{state['arch']:<3d} {self.fn.__name__:28s} {state['tag']:34s} "
                        f"warps {kernel.metadata.num_warps}  smem {smem:>6d} B  "
                        f"{_ptxas_info(kernel.asm['ptx'], state['arch'])}"
                        + ("  <-- over the shared-memory limit" if over else ""))
            if over:
                failures.append(f"{self.fn.__name__} sm_{state['arch']}: {smem} B shared memory")
        return kernel

    # the wrappers refuse CPU tensors without the interpreter: nothing runs here anyway
    checks = (ssd_combined, fourier_fused)
    saved = [(m, m.check_device) for m in checks]
    saved_driver = driver._active           # (reset_active() would probe for a real GPU)
    driver.set_active(_TargetOnlyDriver())
    JITFunction.run = compile_only
    try:
        for m in checks:
            m.check_device = lambda *a, **k: None
        for arch in archs:
            state["arch"] = arch
            for dt_name in dtypes:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt_name]
                shapes = [SSDShape(2, 200, 8, 64, 8, 64), SSDShape(1, 100, 2, 64, 1, 256)]
                if not quick:
                    shapes[1:1] = [SSDShape(2, 50, 8, 64, 1, 64), SSDShape(1, 100, 2, 64, 2, 128)]
                for s in shapes:
                    state["tag"] = f"{dt_name} ssd {s}"
                    try:
                        ins = [t.requires_grad_(True) for t in ssd_inputs(s, 0, "cpu", dtype)]
                        y = ssd_combined.ssd_chunked_triton(*ins, chunk_size=64)
                        y.backward(torch.zeros_like(y))
                    except Exception as e:  # noqa: BLE001 - report every failure, keep going
                        failures.append(f"sm_{arch} {state['tag']}: {type(e).__name__}: {e}")
                for L in (200,) if quick else (20, 512):
                    state["tag"] = f"{dt_name} fourier L={L}"
                    try:
                        d_t, d_v, cls = fourier_inputs(2, 8, L, 0, "cpu", dtype)
                        flat = [t.requires_grad_(True) for t in (d_t, d_v, *(w for c in cls for w in c))]
                        out = fourier_fused.fourier_filter_triton(flat[0], flat[1], flat[2:6],
                                                                  flat[6:10], flat[10:14])
                        out.backward(torch.zeros_like(out))
                    except Exception as e:  # noqa: BLE001
                        failures.append(f"sm_{arch} {state['tag']}: {type(e).__name__}: {e}")
    finally:
        JITFunction.run = original_run
        driver._active = saved_driver
        for m, fn in saved:
            m.check_device = fn
    print("\n".join(rows))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\n{len(rows)} kernel variants compiled for " + ", ".join(f"sm_{a}" for a in archs))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quick", action="store_true",
                   help="two SSD shapes (multi-chunk; S=256) and one filter length")
    args = p.parse_args(argv)
    return run(args.arch, args.dtype, args.quick)


if __name__ == "__main__":
    sys.exit(main())
