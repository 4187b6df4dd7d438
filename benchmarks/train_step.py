#!/usr/bin/env python
"""MMM4Rec training step on CPU: this tree against a baseline commit, in the same run.

The baseline is the ``mmm4rec`` package of ``--baseline-commit`` (default 0bf4054, the
main before issue 14), extracted with ``git archive`` into a temporary folder. Two worker
processes (one per tree, same thread count) build the same model at the paper's
fine-tuning sizes (N=256, 8 heads of 64, state 64, 768-d text and image features, ID term,
4,385 items, full softmax with the padding class, NAdam, release numerics) and take turns:
baseline, new, new, baseline, ... (``--rounds`` rounds of ``--steps`` steps each), so that
load from other processes hits both alike. Reported per configuration: the median and
the minimum seconds per step of each, and baseline / new for both.

Before timing, ``numerics`` loads the baseline's weights into the new tree and compares
the loss and every gradient of one step with dropout off (fp32: rtol 1e-4, atol 1e-5 x the
largest entry of each gradient + 1e-7 x the largest gradient entry of the model).
``--profile`` adds each tree's top ops (torch.profiler, self CPU time) at the first
configuration. ``--allocator retain`` runs both workers with freed memory kept for reuse
(``mmm4rec/cpu_memory.py``, the trainer's opt-in ``MMM4REC_RETAIN_FREED_MEMORY=1``);
the default is glibc's defaults, what a run gets. The last table is the SSD alone in this tree:
the dual (quadratic) form against the chunked scan, and what the CPU dispatch runs.

    python -m benchmarks.train_step                      # the full table (~15 min on 2 cores)
    python -m benchmarks.train_step --quick              # every code path at tiny sizes
    python -m benchmarks.train_step --batches 256 --threads 1 --layers 1 --long --profile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "0bf4054"
NUM_ITEMS = 4385


# --------------------------------------------------------------------------- worker side
def _retain_freed_memory() -> bool:
    """This tree's ``mmm4rec/cpu_memory.py`` (what the trainer applies on CPU when asked),
    loaded by path so that the baseline tree's worker gets the same process setting."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cpu_memory", ROOT / "mmm4rec" / "cpu_memory.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.retain_freed_memory()


def _worker(src: str, threads: int, allocator: str) -> None:
    """Serve JSON commands on stdin with the ``mmm4rec`` package found in ``src``."""
    import torch

    sys.path.insert(0, src)
    torch.set_num_threads(threads)
    if allocator == "retain" and not _retain_freed_memory():
        print("train_step.py: --allocator retain: mallopt not available here; default allocator", file=sys.stderr)
    import mmm4rec
    from benchmarks.gpu_step import make_batch  # the same batches as the GPU rows
    from mmm4rec import MMM4Rec, MMM4RecConfig

    state: dict = {}

    def setup(layers: int, L: int, batch: int, dropout: bool) -> dict:
        p = 0.4 if dropout else 0.0
        cfg = MMM4RecConfig(num_items=NUM_ITEMS, max_len=L, num_layers=layers, use_id=True, chunk_size=32,
                            time_padding="window", missing_modality="bias", padding_class=True,
                            dropout_prob=p, embedding_drop_prob=p, time_dropout_prob=p)
        torch.manual_seed(0)
        model = MMM4Rec(cfg)
        g = torch.Generator().manual_seed(0)
        model.tables.load_features({"text": torch.randn(NUM_ITEMS + 1, 768, generator=g),
                                    "image": torch.randn(NUM_ITEMS + 1, 768, generator=g),
                                    "modality_mask": (torch.rand(NUM_ITEMS + 1, 2, generator=g) > 0.1).float()})
        with torch.no_grad():   # a trained-looking ID term (the tables start at zero)
            model.tables.tables["id_text"].weight.normal_(0, 0.02, generator=g)
            model.tables.tables["id_image"].weight.normal_(0, 0.02, generator=g)
        opt = torch.optim.NAdam([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=6.25e-4)
        state.update(model=model, batch=make_batch(torch, batch, L, NUM_ITEMS, "cpu", g), opt=opt)
        return {"params": sum(q.numel() for q in model.parameters() if q.requires_grad),
                "package": str(Path(mmm4rec.__file__).resolve().parent)}

    def step() -> None:
        state["opt"].zero_grad(set_to_none=True)
        state["model"].calculate_loss(state["batch"], "full").backward()
        state["opt"].step()

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
        return out

    def grads(path: str, load: str | None) -> dict:
        model = state["model"]
        if load:
            model.load_state_dict(torch.load(load))
        else:
            torch.save(model.state_dict(), path + ".state")
        model.zero_grad(set_to_none=True)
        loss = model.calculate_loss(state["batch"], "full")
        loss.backward()
        out = {"loss": loss.detach()}
        out.update({n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None})
        torch.save(out, path)
        return {"loss": loss.item()}

    def profile(n: int, rows: int) -> dict:
        from torch.profiler import profile as prof

        with prof() as p:
            for _ in range(n):
                step()
        ka = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ka) or 1.0
        return {"top": [[e.key, e.count // n, e.self_cpu_time_total / n / 1e3, e.self_cpu_time_total / total]
                        for e in ka[:rows]], "total_ms": total / n / 1e3}

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "setup":
            res = setup(**cmd)
        elif op == "time":
            res = {"times": timed(cmd["n"])}
        elif op == "grads":
            res = grads(cmd["path"], cmd.get("load"))
        elif op == "profile":
            res = profile(cmd["n"], cmd["rows"])
        else:
            res = {"error": f"unknown op {op}"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- parent side
class Worker:
    def __init__(self, src: Path, threads: int, allocator: str):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(dict.fromkeys([str(src), str(ROOT)])))   # src's mmm4rec first
        env.pop("TRITON_INTERPRET", None)
        env.pop("MMM4REC_KERNELS", None)
        env.pop("MMM4REC_RETAIN_FREED_MEMORY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.train_step", "--worker", str(src),
                                      "--threads", str(threads), "--allocator", allocator],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=src)

    def __call__(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (rc {self.proc.wait()}); its error is above")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(res["error"])
        return res

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def extract_baseline(commit: str, dest: Path) -> None:
    """``mmm4rec/`` of ``commit`` into ``dest`` (exit 2 with one line when git cannot)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "mmm4rec"],
                         capture_output=True, check=False)
    if tar.returncode != 0:
        sys.exit(f"train_step.py: baseline commit {commit!r} is not in this repository "
                 f"({tar.stderr.decode().strip().splitlines()[-1] if tar.stderr else 'git failed'}); "
                 "fetch it (git fetch --unshallow) or pass --baseline-commit")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)


def compare_grads(base_path: str, new_path: str) -> tuple[bool, list[str]]:
    import torch

    a, b = torch.load(base_path), torch.load(new_path)
    lines, ok = [], set(a) == set(b)
    if not ok:
        lines.append(f"gradient sets differ: only baseline {sorted(set(a) - set(b))}, "
                     f"only new {sorted(set(b) - set(a))}")
    floor = max((t.abs().max().item() for t in a.values() if t.numel()), default=0.0)
    worst = (0.0, "")
    for k in sorted(set(a) & set(b)):
        scale = a[k].abs().max().item()
        err = (a[k] - b[k]).abs().max().item()
        # fp32 tolerance: relative to the entry and to the tensor's largest entry, with a
        # floor (1e-7 x the largest gradient entry of the model) for vanishing gradients
        if not torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-5 * scale + 1e-7 * floor):
            ok = False
            lines.append(f"  {k}: max |diff| {err:.3g} (largest entry {scale:.3g})")
        worst = max(worst, (err / max(scale, 1e-7 * floor, 1e-30), k))
    lines.append(f"loss {a['loss'].item():.7f} vs {b['loss'].item():.7f}; {len(a) - 1} gradients, largest "
                 f"max|diff| / max|grad| {worst[0]:.1e} ({worst[1]})")
    return ok, lines


def run_config(pair: dict, cfg: dict, rounds: int, steps: int) -> dict:
    for w in pair.values():
        w(op="setup", dropout=True, **cfg)
        w(op="time", n=1)                                       # warm-up
    times: dict[str, list[float]] = {"base": [], "new": []}
    for r in range(rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for name in order:
            times[name] += pair[name](op="time", n=steps)["times"]
    med = {k: statistics.median(v) for k, v in times.items()}
    mn = {k: min(v) for k, v in times.items()}
    return {**cfg, "base_median_s": med["base"], "new_median_s": med["new"], "base_min_s": mn["base"],
            "new_min_s": mn["new"], "ratio_median": med["base"] / med["new"], "ratio_min": mn["base"] / mn["new"],
            "steps_each": len(times["base"])}


def ssd_rows_table(lengths: list[int], tokens: int, repeats: int) -> list[dict]:
    import torch

    from mmm4rec.kernels.dispatch import _ssd_reference
    from mmm4rec.kernels.ssd_ref import (
        ssd_chunked_folded,
        ssd_chunked_ref,
        ssd_quadratic_folded,
        ssd_quadratic_ref,
    )

    g = torch.Generator().manual_seed(0)
    H, P, S, G = 8, 64, 64, 8
    out = []
    for L in lengths:
        b = max(1, tokens // L)
        ins = [torch.randn(b, L, H, P, generator=g), torch.randn(b, L, H, generator=g),
               -torch.rand(H, generator=g) * 4 - 0.5, torch.randn(b, L, G, S, generator=g),
               torch.randn(b, L, G, S, generator=g), torch.ones(H), torch.zeros(H)]
        ins = [t.requires_grad_() for t in ins]
        forms = {"quadratic": ssd_quadratic_ref,
                 "chunked": lambda *a: ssd_chunked_ref(*a, chunk_size=64),
                 "dual_cpu": ssd_quadratic_folded,
                 "chunked_cpu": lambda *a: ssd_chunked_folded(*a, chunk_size=64),
                 "dispatch": lambda *a: _ssd_reference(*a, 64)}
        res: dict[str, list[float]] = {k: [] for k in forms}
        for fn in forms.values():
            fn(*ins).sum().backward()                           # warm-up
        for _ in range(repeats):
            for name, fn in forms.items():
                t0 = time.perf_counter()
                fn(*ins).sum().backward()
                res[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in res.items()}
        out.append({"L": L, "batch": b, **{f"{k}_s": v for k, v in med.items()}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-commit", default=DEFAULT_BASELINE,
                    help=f"git commit whose mmm4rec/ is the baseline (default {DEFAULT_BASELINE})")
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="batch sizes at L=20")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="MMM4Rec layer counts")
    ap.add_argument("--long", type=int, nargs="*", default=[200, 1000],
                    help="long history lengths (batch = --long-tokens / L); none with an empty list")
    ap.add_argument("--long-tokens", type=int, default=5120, help="batch x L of the long-history rows")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round and tree")
    ap.add_argument("--profile", action="store_true", help="top ops of both trees at the first configuration")
    ap.add_argument("--allocator", choices=["default", "retain"], default="default",
                    help="default: glibc's defaults (what a run gets); retain: both workers keep freed memory "
                         "for reuse (mmm4rec/cpu_memory.py, the trainer's MMM4REC_RETAIN_FREED_MEMORY=1)")
    ap.add_argument("--quick", action="store_true", help="every code path at tiny sizes (tests)")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.threads[0], args.allocator)
        return 0
    if args.quick:
        args.batches, args.threads, args.layers, args.long = [8], [1], [1, 2], [64]
        args.long_tokens, args.rounds, args.steps, args.profile = 128, 2, 1, True

    load = os.getloadavg()
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, allocator {args.allocator})")
    lines = [f"# Training step, this tree vs {args.baseline_commit} ({head})", ""]
    results: dict = {"header": head, "baseline_commit": args.baseline_commit, "allocator": args.allocator,
                     "numerics": [], "steps": [],
                     "profile": {}, "ssd": []}
    configs = [dict(layers=n, L=20, batch=b) for b in args.batches for n in args.layers]
    configs += [dict(layers=n, L=L, batch=max(1, args.long_tokens // L)) for L in args.long for n in args.layers]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        base_src = Path(tmp) / "baseline"
        base_src.mkdir()
        extract_baseline(args.baseline_commit, base_src)
        for threads in args.threads:
            pair = {"base": Worker(base_src, threads, args.allocator), "new": Worker(ROOT, threads, args.allocator)}
            try:
                if threads == args.threads[0]:     # numerics once per layer count and length
                    for cfg in {(c["layers"], c["L"]): c for c in configs}.values():
                        small = dict(cfg, batch=min(cfg["batch"], 64))
                        for name, w in pair.items():
                            pkg = Path(w(op="setup", dropout=False, **small)["package"])
                            want = (base_src if name == "base" else ROOT) / "mmm4rec"
                            if pkg != want.resolve():
                                sys.exit(f"train_step.py: the {name} worker imported {pkg}, not {want}")
                        bp, np_ = str(Path(tmp) / "g_base.pt"), str(Path(tmp) / "g_new.pt")
                        pair["base"](op="grads", path=bp)
                        pair["new"](op="grads", path=np_, load=bp + ".state")
                        ok, msg = compare_grads(bp, np_)
                        failed |= not ok
                        results["numerics"].append({**small, "equal": ok, "detail": msg})
                        print(f"numerics {small}: {'equal' if ok else 'DIFFERENT'}; " + "\n".join(msg), flush=True)
                for cfg in configs:
                    row = run_config(pair, cfg, args.rounds, args.steps)
                    row["threads"] = threads
                    results["steps"].append(row)
                    print(f"threads {threads} layers {cfg['layers']} L {cfg['L']} batch {cfg['batch']}: "
                          f"baseline {row['base_median_s'] * 1e3:.0f} ms, new {row['new_median_s'] * 1e3:.0f} ms "
                          f"(median), ratio {row['ratio_median']:.2f}x (min {row['ratio_min']:.2f}x)", flush=True)
                    if args.profile and not results["profile"]:
                        results["profile"] = {"config": {**cfg, "threads": threads},
                                              **{k: w(op="profile", n=args.steps, rows=12) for k, w in pair.items()}}
            finally:
                for w in pair.values():
                    w.close()
    load_end = os.getloadavg()
    results["load_end"] = list(load_end)
    lines += ["## Numerics (dropout off, one step, baseline weights in both trees)", ""]
    for r in results["numerics"]:
        lines.append(f"- layers {r['layers']}, L {r['L']}, batch {r['batch']}: "
                     f"{'equal within fp32 tolerance' if r['equal'] else 'DIFFERENT'}; {r['detail'][-1]}")
    lines += ["", "## Forward+backward+NAdam step, seconds per step (baseline / new = speed-up)", "",
              "| threads | layers | L | batch | baseline median | new median | speed-up (median) | speed-up (min) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        lines.append(f"| {r['threads']} | {r['layers']} | {r['L']} | {r['batch']} | {r['base_median_s']:.3f} | "
                     f"{r['new_median_s']:.3f} | {r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x |")
    if results["profile"]:
        p = results["profile"]
        lines += ["", f"## Top ops, self CPU ms per step ({p['config']})", ""]
        for k in ("base", "new"):
            lines.append(f"{'baseline' if k == 'base' else 'new'} ({p[k]['total_ms']:.0f} ms profiled per step): " +
                         ", ".join(f"{name} {ms:.0f} ({frac:.0%}, {n} calls)" for name, n, ms, frac in p[k]["top"]))
            lines.append("")
    ssd_len = [20, 50, *args.long] if not args.quick else [20, *args.long]
    results["ssd"] = ssd_rows_table(ssd_len, args.long_tokens if args.quick else 4000, 1 if args.quick else 3)
    lines += ["", "## SSD alone in this tree, forward+backward (8 heads x 64, state 64, chunk 64), ms", "",
              "References (the Triton kernels' twins) and the CPU forms (step factors folded into the "
              "chunk matrices); dispatch = what the model runs on CPU.", "",
              "| L | batch | dual (ref) | chunked (ref) | dual (CPU) | chunked (CPU) | "
              "chunked / dual speed (CPU) | chunked / dual speed (ref) | dispatch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["ssd"]:
        lines.append(f"| {r['L']} | {r['batch']} | {r['quadratic_s'] * 1e3:.1f} | {r['chunked_s'] * 1e3:.1f} | "
                     f"{r['dual_cpu_s'] * 1e3:.1f} | {r['chunked_cpu_s'] * 1e3:.1f} | "
                     f"{r['dual_cpu_s'] / r['chunked_cpu_s']:.2f}x | {r['quadratic_s'] / r['chunked_s']:.2f}x | "
                     f"{r['dispatch_s'] * 1e3:.1f} |")
    lines += ["", f"Load average at the end: {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f}."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if failed:
        print("train_step.py: the new tree's loss or gradients differ from the baseline's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
