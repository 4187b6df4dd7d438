"""Transfer study on real data: pretrain MMM4Rec on a multi-domain Amazon mix, export,
fine-tune on Amazon Scientific, against scratch and SASRec (issue 15, docs/transfer.md).

    python -m benchmarks.transfer --data ../shared/data --out runs/transfer            # the study
    python -m benchmarks.transfer --data ../shared/data --out runs/transfer-quick --quick

Everything runs through the project's commands as subprocesses (``mmm4rec data build``,
``mmm4rec train`` = ``dist/train.py`` under the deepspeed launcher for ``--nproc`` > 1,
``mmm4rec export``); the study reads each run's ``metrics.json``. Steps:

1. shard sets (``mmm4rec data build``) under ``OUT/shards``:
   ``pretrain``: the eight Amazon sets of ``seqrec_benchmark`` (title as item text,
   real day-level timestamps), ``--users-per-domain`` users drawn per domain with
   ``--sample-seed`` (0 = all users: the full 3.57 M-interaction mix, for a cluster);
   ``pretrain_ml``: the same plus MovieLens-1M (run e); ``scientific``:
   ``unisrec_scientific`` (text "title. categories. brand.") + the CLIP image vectors of
   ``missrec_scientific_mm_subset`` joined by ASIN; ``scientific_title``: the same with
   the title alone as item text (the pretraining sets' format).
2. pretraining (``configs/transfer_pretrain.yaml``), then ``mmm4rec export``.
3. fine-tuning on Scientific with the release's recipe (``configs/finetune_scientific.yaml``):
   a: from the export, with the ID term;  b: from the export, without it;
   c: from scratch, with the ID term;     d: SASRec from scratch (``configs/transfer_sasrec.yaml``);
   e: from the export of pretraining with MovieLens-1M added, with the ID term;
   title: as a, on the title-only Scientific text.
4. ``OUT/results.json``, ``OUT/results.md`` and ``OUT/curves.png`` (validation NDCG@10
   per epoch and per second of fine-tuning).

A run whose ``metrics.json`` exists is not run again; a run directory without one is
continued with ``--resume``; so the same command finishes an interrupted study.
``--quick``: a test of the script itself in CI time (two domains, a few dozen users,
Scientific users sampled too, one epoch); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: the pretraining domains of seqrec_benchmark (all Amazon), in the order of the mix
AMAZON = ("amazon2014-beauty", "amazon2014-toy", "amazon2014-clothing", "amazon2014-health",
          "amazon2014-electronic_1000000", "amazon2014-book_1000000", "amazon2018-game",
          "amazon2018-electronic_1000000")
MOVIELENS = "movielens-1m"
QUICK_DOMAINS = AMAZON[:2]

#: run -> (label, model config, init from which pretraining ("" = scratch), target shards, extra --set)
RUNS = {
    "a": ("(a) pretrained, ID term", "finetune_scientific.yaml", "pretrain", "scientific", ()),
    "b": ("(b) pretrained, no ID term", "finetune_scientific.yaml", "pretrain", "scientific",
          ("model.use_id=false",)),
    "c": ("(c) scratch, ID term", "finetune_scientific.yaml", "", "scientific", ()),
    "d": ("(d) SASRec scratch", "transfer_sasrec.yaml", "", "scientific", ()),
    "e": ("(e) pretrained with MovieLens-1M, ID term", "finetune_scientific.yaml", "pretrain_ml", "scientific", ()),
    "title": ("(a') pretrained, ID term, title-only text", "finetune_scientific.yaml", "pretrain",
              "scientific_title", ()),
}
DEFAULT_RUNS = "a,c,d,b,title,e"     # the order they run in: the main comparison first
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")


class StudyError(Exception):
    """Bad input to the study (exit 2, one line)."""


def _say(msg: str) -> None:
    print(f"[transfer] {msg}", flush=True)


# ---------------------------------------------------------------------- data
def scientific_title(text: str) -> str:
    """The title of a UniSRec Scientific item text ``"<title>. <categories>. <brand>. "``.

    The category path starts with "Industrial & Scientific" or is empty (``". . "``); every
    one of the 4,385 rows has one of the two forms."""
    cut = text.rfind(". Industrial & Scientific")
    if cut < 0:
        cut = text.rfind(". . ")
    return text[:cut] if cut >= 0 else text.strip()


def write_title_only(src: Path, dst: Path) -> Path:
    """A copy of a UniSRec Scientific directory whose ``.text`` holds the titles only
    (the other files are symbolic links to the source)."""
    texts = sorted(src.glob("*.text"))
    if len(texts) != 1:
        raise StudyError(f"{src}: expected one <name>.text file, found {len(texts)}")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".text" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    lines = texts[0].read_text(encoding="utf-8").split("\n")
    out = [lines[0]]
    for n, line in enumerate(lines[1:], 2):
        if not line:
            continue
        asin, sep, text = line.partition("\t")
        if not sep:
            raise StudyError(f"{texts[0]}:{n}: malformed row: no tab between the item id and its text")
        out.append(f"{asin}\t{scientific_title(text)}")
    (dst / texts[0].name).write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


def check_data(data: Path, names: list[str]) -> None:
    if not data.is_dir():
        raise StudyError(f"--data {data}: not a directory (the shared data folder holding seqrec_benchmark/, "
                         "unisrec_scientific/ and missrec_scientific_mm_subset/)")
    for name in names:
        if not (data / name).is_dir():
            raise StudyError(f"--data {data}: {name}/ is missing")


# ---------------------------------------------------------------------- subprocesses
def _mmm4rec(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist", *args]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _start(name: str, cmd: list[str], log: Path, env: dict) -> tuple[subprocess.Popen, object]:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "a")
    fh.write(f"$ {shlex.join(cmd)}\n")
    fh.flush()
    _say(f"{name}: {shlex.join(cmd)}  (log: {log})")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT), fh


def _run(name: str, cmd: list[str], log: Path, env: dict) -> None:
    t0 = time.time()
    proc, fh = _start(name, cmd, log, env)
    rc = proc.wait()
    fh.close()
    if rc != 0:
        raise RuntimeError(f"{name} failed (exit {rc}) after {time.time() - t0:.0f} s; see {log}:\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    _say(f"{name}: done in {time.time() - t0:.0f} s")


def _run_pool(jobs: list[tuple[str, list[str], Path]], env: dict, parallel: int) -> dict[str, int]:
    """Run ``jobs`` with at most ``parallel`` at a time; returns the exit codes by name."""
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            running[name] = (*_start(name, cmd, log, env), time.time())
        time.sleep(2)
        for name, (proc, fh, t0) in list(running.items()):
            if proc.poll() is not None:
                fh.close()
                codes[name] = proc.returncode
                del running[name]
                _say(f"{name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} "
                     f"in {time.time() - t0:.0f} s")
    return codes


# ---------------------------------------------------------------------- the study
def plan(args) -> dict:
    """Scales and sizes of this invocation (all recorded in results.json)."""
    if args.quick:
        users = 40 if args.users_per_domain is None else args.users_per_domain
        return {"domains": list(QUICK_DOMAINS), "users_per_domain": users,
                "movielens_users": 10, "pretrain_k_core": 0, "target_users": 150, "target_k_core": 0,
                "pretrain_epochs": 1, "finetune_epochs": 1, "pretrain_wall_time": 0, "finetune_wall_time": 0}
    if args.users_per_domain is None:
        args.users_per_domain = 2000
    ml = args.movielens_users
    if ml is None:   # about one Amazon domain's interactions (ML-1M users have ~18x as many)
        ml = max(1, args.users_per_domain // 16) if args.users_per_domain else 0
    return {"domains": list(AMAZON), "users_per_domain": args.users_per_domain,
            "movielens_users": ml, "pretrain_k_core": args.pretrain_k_core,
            "target_users": 0, "target_k_core": 5, "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs, "pretrain_wall_time": args.pretrain_wall_time,
            "finetune_wall_time": args.finetune_wall_time}


def build_commands(data: Path, shards: Path, p: dict, need: set[str], seed: int) -> dict[str, list[str]]:
    bench = data / "seqrec_benchmark"
    sci = data / "unisrec_scientific"
    mm = data / "missrec_scientific_mm_subset"
    image = f"{mm / 'Scientific.feat3CLS'},dim=512,ids={mm / 'Scientific.item2index'},encoder=CLIP ViT-B/32"
    cmds = {}

    def mix(domains):
        cmd = _mmm4rec("data", "build")
        for d in domains:
            cmd += ["--format", "recbole", "--input", str(bench / d), "--domain", d]
        return cmd

    def users(counts):   # --max-users once per source ('-' = all users)
        if not any(counts):
            return []
        return [a for c in counts for a in ("--max-users", str(c or "-"))] + ["--sample-seed", str(seed)]

    amazon = [p["users_per_domain"]] * len(p["domains"])
    k_core = ["--k-core", str(p["pretrain_k_core"])]
    if "pretrain" in need:
        cmds["pretrain"] = [*mix(p["domains"]), *users(amazon), *k_core, "--out", str(shards / "pretrain")]
    if "pretrain_ml" in need:
        cmds["pretrain_ml"] = [*mix([*p["domains"], MOVIELENS]), *users([*amazon, p["movielens_users"]]), *k_core,
                               "--out", str(shards / "pretrain_ml")]
    target_users = ["--max-users", str(p["target_users"]), "--sample-seed", str(seed)] if p["target_users"] else []
    for name, src in (("scientific", sci), ("scientific_title", shards.parent / "data" / "scientific_title")):
        if name in need:
            cmds[name] = [*_mmm4rec("data", "build"), "--format", "unisrec", "--input", str(src),
                          "--image-features", image, *target_users, "--k-core", str(p["target_k_core"]),
                          "--out", str(shards / name)]
    return cmds


def train_command(cfg: str, out: Path, sets: list[str], nproc: int, resume: bool) -> list[str]:
    cmd = _mmm4rec("train", "--config", str(CONFIGS / cfg), "--output-dir", str(out), "--nproc", str(nproc))
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def scale_sets(quick: bool, nproc: int) -> list[str]:
    """``--quick``: two small steps per epoch (a test of the pipeline). Otherwise the three
    configs' micro-batch of 1024 rows is split over ``nproc`` processes, so that a step
    sees the same 1024 x accumulation rows on any number of processes."""
    if quick:
        return ["train.steps_per_epoch=2", "data.batch_size=128", "train.gradient_accumulation_steps=1"]
    if nproc > 1:
        if 1024 % nproc:
            raise StudyError(f"--nproc {nproc}: must divide the micro-batch of 1024 rows")
        return [f"data.batch_size={1024 // nproc}"]
    return []


def run_study(args) -> dict:
    out = Path(args.out).resolve()
    data = Path(args.data).resolve()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise StudyError(f"--runs: unknown run(s) {bad}; choose from {','.join(RUNS)}")
    p = plan(args)
    need_pre = {RUNS[r][2] for r in runs} - {""}
    need_target = {RUNS[r][3] for r in runs}
    check_data(data, ["seqrec_benchmark", "unisrec_scientific", "missrec_scientific_mm_subset"])
    check_data(data / "seqrec_benchmark", [*p["domains"], *([MOVIELENS] if "pretrain_ml" in need_pre else [])])
    out.mkdir(parents=True, exist_ok=True)
    env = _env(args.threads)
    shards, logs = out / "shards", out / "logs"
    t_study = time.time()

    # 1. shards
    if "scientific_title" in need_target:
        write_title_only(data / "unisrec_scientific", out / "data" / "scientific_title")
    for name, cmd in build_commands(data, shards, p, need_pre | need_target, args.sample_seed).items():
        stamp = shards / f"{name}.command.json"
        if (shards / name / "manifest.json").is_file():
            if stamp.is_file() and json.loads(stamp.read_text()) != cmd[3:]:
                raise StudyError(f"{shards / name} was built with other options ({stamp}); use a new --out")
            _say(f"shards {name}: exist, reused")
            continue
        _run(f"build {name}", cmd, logs / f"build-{name}.log", env)
        stamp.write_text(json.dumps(cmd[3:]))

    # 2. pretraining + export (OUT/runs/<shards>[-<pretrain tag>], OUT/exports/...)
    exports = {}
    pre_jobs = []
    for name in sorted(need_pre):
        tagged = pretrain_name(name, args.pretrain_tag)
        run_dir = out / "runs" / tagged
        sets = ["data.sample=null", f"data.url={shards / name}", f"train.epochs={p['pretrain_epochs']}",
                f"train.max_wall_time={p['pretrain_wall_time']}", *scale_sets(args.quick, args.nproc),
                *args.overrides, *args.pretrain_sets]
        if not (run_dir / "metrics.json").is_file():
            pre_jobs.append((f"pretrain {tagged}", train_command(args.pretrain_config, run_dir, sets, args.nproc,
                                                                   (run_dir / "checkpoints").is_dir()),
                             logs / f"pretrain-{tagged}.log"))
    codes = _run_pool(pre_jobs, env, args.parallel)
    for name in sorted(need_pre):
        tagged = pretrain_name(name, args.pretrain_tag)
        if codes.get(f"pretrain {tagged}", 0) != 0:
            _say(f"pretraining {tagged} failed: runs that start from it are skipped")
            continue
        exp = out / "exports" / tagged
        if not (exp / "model.safetensors").is_file():
            _run(f"export {tagged}", _mmm4rec("export", str(out / "runs" / tagged), str(exp)),
                 logs / f"export-{tagged}.log", env)
        exports[name] = exp

    # 3. fine-tuning on Scientific (OUT/runs/ft-<key>: run_key() names the variant)
    ft_jobs = []
    for r in runs:
        label, cfg, pre, target, extra = RUNS[r]
        if pre and pre not in exports:
            continue
        for seed in seeds_of(args):
            key = run_key(r, args, seed)
            run_dir = out / "runs" / f"ft-{key}"
            sets = ["data.sample=null", f"data.url={shards / target}", f"train.epochs={p['finetune_epochs']}",
                    f"train.max_wall_time={p['finetune_wall_time']}", *extra, *scale_sets(args.quick, args.nproc),
                    *args.overrides, *args.finetune_sets, *([f"train.seed={seed}"] if seed is not None else [])]
            if pre:
                sets.append(f"train.init_from={exports[pre]}")
            if not (run_dir / "metrics.json").is_file():
                ft_jobs.append((f"fine-tune {key}", train_command(cfg, run_dir, sets, args.nproc,
                                                                  (run_dir / "checkpoints").is_dir()),
                                logs / f"ft-{key}.log"))
    _run_pool(ft_jobs, env, args.parallel)

    results = collect(out, runs, p, args, time.time() - t_study)
    write_report(out, results)
    if args.records:
        record_runs(Path(args.records), out, results, args)
    return results


def pretrain_name(shards: str, tag: str) -> str:
    """The pretraining run / export folder of shard set ``shards`` under ``--pretrain-tag``."""
    return f"{shards}-{tag}" if tag else shards


def seeds_of(args) -> list[int | None]:
    """``--seeds 2020,2021`` -> [2020, 2021]; none given: [None] (the config's own seed)."""
    return [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [None]


def run_key(r: str, args, seed: int | None) -> str:
    """A fine-tuning run's name: the run letter, then the pretraining tag (for a run that
    starts from an export), the fine-tuning tag and the seed, where given."""
    parts = [r]
    if RUNS[r][2] and args.pretrain_tag:
        parts.append(args.pretrain_tag)
    if args.finetune_tag:
        parts.append(args.finetune_tag)
    if seed is not None:
        parts.append(f"s{seed}")
    return "-".join(parts)


# ---------------------------------------------------------------------- results
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _seconds(run_dir: Path) -> dict[int, float]:
    """Cumulative train + evaluation seconds at the end of each epoch, from the run's
    ``logs/epochs.csv`` (metrics.json's history has the metrics, not the times)."""
    import csv

    try:
        with open(run_dir / "logs" / "epochs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    out = {}
    for row in rows:
        try:
            out[int(row["epoch"])] = float(row.get("train_seconds") or 0) + float(row.get("eval_seconds") or 0)
        except (KeyError, ValueError):
            continue
    return out


def _curve(m: dict, run_dir: Path, metric: str = "ndcg@10") -> list[dict]:
    secs = _seconds(run_dir)
    return [{"epoch": h["epoch"], "value": h[f"valid/{metric}"], "seconds": secs.get(h["epoch"])}
            for h in m.get("history", []) if f"valid/{metric}" in h]


def _steps_per_epoch(m: dict, run_dir: Path) -> int | None:
    """Optimizer steps of a full epoch of the run: its train samples (shard manifest) over
    micro-batch x world size, micro-batches over the accumulation (the last step takes
    the remainder), or ``train.steps_per_epoch`` where set."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        samples = _load(Path(cfg["data"]["url"]) / "manifest.json")["splits"]["train"]["samples"]
        micro = -(-samples // (cfg["data"]["batch_size"] * int(m.get("world_size") or 1)))
        steps = -(-micro // cfg["train"].get("gradient_accumulation_steps", 1))
        cap = cfg["train"].get("steps_per_epoch") or 0
        return min(steps, cap) if cap else steps
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _partial_point(m: dict, run_dir: Path) -> list[dict]:
    """A run cut by its wall time before its first full epoch has one evaluation (the
    trainer's mid-epoch stop): it becomes a point at a fractional epoch. Its seconds
    include the test evaluation that follows it."""
    if m.get("history") or not m.get("best_valid") or "ndcg@10" not in m["best_valid"]:
        return []
    spe = _steps_per_epoch(m, run_dir)
    t = m.get("timings", {})
    return [{"epoch": round(m["best_step"] / spe, 3) if spe else None, "value": m["best_valid"]["ndcg@10"],
             "seconds": (t.get("train_seconds") or 0) + (t.get("eval_seconds") or 0), "partial": True,
             "steps": m["best_step"], "steps_per_epoch": spe}]


def collect(out: Path, runs: list[str], p: dict, args, seconds: float) -> dict:
    res = {"plan": p, "command": shlex.join([sys.executable, *sys.argv]) if args.record_command else None,
           "runs": {}, "pretraining": {}, "study_seconds_this_invocation": round(seconds, 1)}
    for shard_name in ("pretrain", "pretrain_ml"):
        name = pretrain_name(shard_name, getattr(args, "pretrain_tag", ""))
        m = _load(out / "runs" / name / "metrics.json")
        man = _load(out / "shards" / shard_name / "manifest.json")
        if m or man:
            res["pretraining"][name] = {
                "finished": m is not None,
                "best_epoch": m and m.get("best_epoch"), "epochs_run": m and len(m.get("history", [])),
                "train_seconds": m and m.get("timings", {}).get("train_seconds"),
                "stopped_by_wall_time": m and m.get("stopped_by_wall_time"),
                "valid_ndcg@10": m and max((c["value"] for c in _curve(m, out / "runs" / name)), default=None),
                "data": man and {k: man[k] for k in ("num_users", "num_items", "num_interactions")},
            }
    keys = [(r, run_key(r, args, seed)) for r in runs for seed in seeds_of(args)]
    for r, key in keys:
        m = _load(out / "runs" / f"ft-{key}" / "metrics.json")
        label = RUNS[r][0] + ("" if key == r else f" [{key}]")
        entry = {"label": label, "run": r, "finished": m is not None}
        if m:
            curve = _curve(m, out / "runs" / f"ft-{key}") or _partial_point(m, out / "runs" / f"ft-{key}")
            entry.update({
                "test": {k: (m.get("test") or {}).get(k) for k in METRICS},
                "best_epoch": m.get("best_epoch"), "epochs_run": len(m.get("history", [])),
                "steps": m.get("steps"), "best_step": m.get("best_step"),
                "partial_epoch": curve[0]["epoch"] if curve and curve[0].get("partial") else None,
                "stopped_early": m.get("stopped_early"), "stopped_by_wall_time": m.get("stopped_by_wall_time"),
                "train_seconds": m.get("timings", {}).get("train_seconds"),
                "eval_seconds": m.get("timings", {}).get("eval_seconds"),
                "curve": curve, "selection_metric": m.get("metric"),
            })
        res["runs"][key] = entry
    res["expectations"] = expectations(res["runs"])
    return res


def samples_seen(run_dir: Path) -> int | None:
    """Training samples a (pretraining) run consumed, as its trainer counted them
    (``metrics.json``: samples per second x train seconds; a resumed run's totals)."""
    t = (_load(run_dir / "metrics.json") or {}).get("timings", {})
    if not t.get("samples_per_second") or not t.get("train_seconds"):
        return None
    return round(t["samples_per_second"] * t["train_seconds"])


def _git_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return r.stdout.strip() or None


def record_runs(path: Path, out: Path, res: dict, args) -> None:
    """Upsert one record per finished fine-tuning run of this study into ``path`` (the
    committed docs/transfer_results.json that docs/transfer.md's tables are made from)."""
    import datetime
    import platform

    import yaml

    records = json.loads(path.read_text()) if path.is_file() else []
    commit = _git_commit()
    for key, e in res["runs"].items():
        if not e["finished"]:
            continue
        run_dir = out / "runs" / f"ft-{key}"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        init = cfg["train"].get("init_from")
        pre = None
        if init:
            pre_dir = out / "runs" / Path(init).name
            pre_cfg = yaml.safe_load((pre_dir / "config.yaml").read_text()) if (pre_dir / "config.yaml").is_file() \
                else {}
            pre = {"name": Path(init).name, "config": args.pretrain_config, "overrides": list(args.pretrain_sets),
                   "samples_seen": samples_seen(pre_dir),
                   "model": {k: pre_cfg.get("model", {}).get(k) for k in ("use_id", "num_layers")},
                   "gradient_accumulation_steps": pre_cfg.get("train", {}).get("gradient_accumulation_steps"),
                   "users_per_domain": res["plan"].get("users_per_domain")}
        rec = {"name": key, "run": e["run"], "label": e["label"], "study": str(out),
               "start": "scratch" if not init else "pretrained", "pretraining": pre,
               "config": RUNS[e["run"]][1], "overrides": [*RUNS[e["run"]][4], *args.finetune_sets],
               "pretraining_samples_seen": pre and pre["samples_seen"],
               "seed": cfg["train"].get("seed"), "best_epoch": e["best_epoch"], "epochs_run": e["epochs_run"],
               "stopped_early": e["stopped_early"], "stopped_by_wall_time": e["stopped_by_wall_time"],
               "test": e["test"], "train_seconds": e["train_seconds"], "eval_seconds": e["eval_seconds"],
               "valid_curve_ndcg@10": [[c["epoch"], c["value"]] for c in e.get("curve", [])],
               "git_commit": commit, "recorded": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per run"}
        records = [r for r in records if (r["study"], r["name"]) != (rec["study"], rec["name"])] + [rec]
    path.write_text(json.dumps(records, indent=1) + "\n")
    _say(f"recorded {sum(e['finished'] for e in res['runs'].values())} run(s) in {path}")


RECORDS_BEGIN = "<!-- transfer_results: generated by python -m benchmarks.transfer --report-only --records ... -->"
RECORDS_END = "<!-- /transfer_results -->"


def records_table(records: list[dict]) -> str:
    """The Markdown table of every recorded fine-tuning run, with the mean and spread over
    seeds of each variant (same name but the seed)."""
    lines = ["| run | start (pretraining) | pretraining samples | overrides | seed | test HR@10 | NDCG@10 | HR@50 "
             "| NDCG@50 | best epoch / run | train s | commit |", "|" + "---|" * 12]
    for r in records:
        pre = r.get("pretraining") or {}
        start = "scratch" if r["start"] == "scratch" else (f"{pre.get('name')} ({pre.get('config')}"
                                                           + (f"; {', '.join(pre['overrides'])}" if pre.get(
                                                               "overrides") else "") + ")")
        t = r["test"]
        lines.append(f"| {r['label']} | {start} | {_fi(r.get('pretraining_samples_seen'))} | "
                     f"{', '.join(r['overrides']) or '-'} | {r.get('seed')} | "
                     + " | ".join(_f(t.get(k)) for k in METRICS)
                     + f" | {r['best_epoch']} / {r['epochs_run']} | {_f(r.get('train_seconds'), 0)} | "
                       f"{(r.get('git_commit') or '-')[:7]} |")
    groups: dict[str, list[dict]] = {}
    for r in records:
        base = r["name"].rsplit("-s", 1)[0] if r.get("seed") is not None and r["name"].endswith(f"-s{r['seed']}") \
            else r["name"]
        groups.setdefault(f"{r['study']}::{base}", []).append(r)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "| variant | seeds | test NDCG@10 mean | spread (max - min) | best epoch mean |",
                  "|---|---|---|---|---|"]
        for k, v in multi.items():
            nd = [x["test"]["ndcg@10"] for x in v]
            lines.append(f"| {k.split('::', 1)[1]} | {len(v)} | {sum(nd) / len(nd):.4f} | {max(nd) - min(nd):.4f} | "
                         f"{sum(x['best_epoch'] for x in v) / len(v):.1f} |")
    return "\n".join(lines)


def _fi(v) -> str:
    return "-" if v is None else f"{v:,}"


def write_records_doc(records_path: Path, doc: Path) -> None:
    """Replace the generated block of ``doc`` with the table of ``records_path``."""
    records = json.loads(records_path.read_text())
    text = doc.read_text()
    block = f"{RECORDS_BEGIN}\n{records_table(records)}\n{RECORDS_END}"
    if RECORDS_BEGIN in text and RECORDS_END in text:
        head, rest = text.split(RECORDS_BEGIN, 1)
        text = head + block + rest.split(RECORDS_END, 1)[1]
    else:
        raise StudyError(f"{doc}: no generated block ({RECORDS_BEGIN} ... {RECORDS_END}) to replace")
    doc.write_text(text)
    _say(f"wrote the {len(records)} record(s) of {records_path} into {doc}")


def _ran(e: dict) -> str:
    """How much of the schedule a fine-tuning run did: epochs, or the steps of a partial first one."""
    if e.get("partial_epoch") is not None:
        c = e["curve"][0]
        return f"{e['partial_epoch']:.2f} ({c['steps']} of {c['steps_per_epoch']} steps of epoch 1)"
    return str(e.get("epochs_run"))


def _time_to_reach(curve: list[dict], target: float) -> tuple[int, float | None] | None:
    """(epoch, seconds) of the first evaluation at or above ``target``; None if never."""
    return next(((c["epoch"], c["seconds"]) for c in curve if c["value"] >= target), None)


def expectations(runs: dict) -> list[dict]:
    """The paper's expectations, each with its outcome or why it was not measured."""
    def ok(*names):
        missing = [n for n in names if not runs.get(n, {}).get("finished")]
        return None if not missing else "not measured: run(s) " + ", ".join(missing) + " did not finish / not run"

    def nd(n):
        return runs[n]["test"]["ndcg@10"]

    out = []
    why = ok("a", "c")
    if why:
        out.append({"claim": "(a) beats (c) on test NDCG@10", "outcome": why})
        out.append({"claim": "(a) reaches its best epoch in at most a third of (c)'s epochs", "outcome": why})
    else:
        a, c = runs["a"], runs["c"]
        out.append({"claim": "(a) beats (c) on test NDCG@10", "holds": nd("a") > nd("c"),
                    "outcome": f"(a) {nd('a'):.4f} vs (c) {nd('c'):.4f}"})
        capped = [n for n in ("a", "c") if runs[n].get("stopped_by_wall_time")
                  or not runs[n].get("stopped_early")]
        ca, cc = a["curve"], c["curve"]
        text = (f"best epoch (a) {a['best_epoch']} of {_ran(a)} run, (c) {c['best_epoch']} of "
                f"{_ran(c)} run (selected on valid {a.get('selection_metric')})")
        if cc:
            c_best = max(cc, key=lambda x: x["value"])
            reach = _time_to_reach(ca, c_best["value"])
            text += (f"; (a) reached (c)'s best valid NDCG@10 ({c_best['value']:.4f}, (c)'s epoch "
                     f"{c_best['epoch']}, {_f(c_best['seconds'], 0)} s) "
                     + (f"at its epoch {reach[0]}, {_f(reach[1], 0)} s of fine-tuning" if reach else "never"))
        if ca and cc:   # the other way round: how long scratch takes to get where the pretrained run peaks
            a_best = max(ca, key=lambda x: x["value"])
            back = _time_to_reach(cc, a_best["value"])
            text += (f"; (c) reached (a)'s best valid NDCG@10 ({a_best['value']:.4f}, (a)'s epoch "
                     f"{a_best['epoch']}, {_f(a_best['seconds'], 0)} s) "
                     + (f"at its epoch {back[0]}, {_f(back[1], 0)} s" if back else "never"))
        if capped:
            text += ("; run(s) " + ", ".join(capped) + " stopped by the epoch or wall-time cap before early "
                     "stopping, so their best epoch is a lower bound")
        out.append({"claim": "(a) reaches its best epoch in at most a third of (c)'s epochs",
                    "holds": None if capped else a["best_epoch"] * 3 <= c["best_epoch"], "outcome": text})
    for mm in ("a", "c"):
        why = ok(mm, "d")
        out.append({"claim": f"MMM4Rec {RUNS[mm][0]} beats SASRec (d) on test NDCG@10",
                    **({"outcome": why} if why else {"holds": nd(mm) > nd("d"),
                                                      "outcome": f"{nd(mm):.4f} vs {nd('d'):.4f}"})})
    for x, y, claim in (("a", "b", "the ID term: (a) with vs (b) without"),
                        ("e", "a", "MovieLens-1M in pretraining: (e) with vs (a) without"),
                        ("title", "a", "Scientific text: (a') title only vs (a) title. categories. brand.")):
        why = ok(x, y)
        out.append({"claim": claim, **({"outcome": why} if why else {
            "difference": nd(x) - nd(y), "outcome": f"test NDCG@10 {nd(x):.4f} vs {nd(y):.4f} "
                                                    f"({nd(x) - nd(y):+.4f})"})})
    return out


def write_report(out: Path, res: dict) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = ["# Transfer study results", "",
             f"Plan: {json.dumps(res['plan'])}", ""]
    if res.get("command"):
        lines += [f"Command: `{res['command']}`", ""]
    lines += ["| pretraining | finished | users | items | interactions | epochs run | best epoch | valid NDCG@10 "
              "| train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in res["pretraining"].items():
        d = e.get("data") or {}
        lines.append(f"| {name} | {e['finished']} | {d.get('num_users', '-')} | {d.get('num_items', '-')} | "
                     f"{d.get('num_interactions', '-')} | {e['epochs_run'] or '-'} | {e['best_epoch'] or '-'} | "
                     f"{_f(e['valid_ndcg@10'])} | {_f(e['train_seconds'], 0)} |")
    lines += ["", "| fine-tuning on Scientific | test HR@10 | NDCG@10 | HR@50 | NDCG@50 | best epoch | epochs run "
              "| train s | eval s | stop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in res["runs"].values():
        if not e["finished"]:
            lines.append(f"| {e['label']} | did not finish / not run | | | | | | | | |")
            continue
        stop = ("wall time" if e["stopped_by_wall_time"]
                else "early stop" if e["stopped_early"] else "epoch or step cap")
        lines.append(f"| {e['label']} | " + " | ".join(_f(e["test"][k]) for k in METRICS)
                     + f" | {e['best_epoch']} | {_ran(e)} | {_f(e['train_seconds'], 0)} | "
                       f"{_f(e['eval_seconds'], 0)} | {stop} |")
    lines += ["", "Expectations:", ""]
    for x in res["expectations"]:
        verdict = {True: "holds", False: "does not hold", None: ""}.get(x.get("holds"), "")
        lines.append(f"- {x['claim']}: {verdict + ': ' if verdict else ''}{x['outcome']}")
    png = plot(out, res)
    if png:
        lines += ["", f"![validation curves]({png.name})"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _say(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {png}" if png else ""))


def _f(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def plot(out: Path, res: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed: no plot (pip install \"mmm4rec[plots]\")")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for e in res["runs"].values():
        if not e.get("curve"):
            continue
        c = [x for x in e["curve"] if x["epoch"] is not None and x["seconds"] is not None]
        axes[0].plot([x["epoch"] for x in c], [x["value"] for x in c], marker="o", label=e["label"])
        axes[1].plot([x["seconds"] for x in c], [x["value"] for x in c], marker="o", label=e["label"])
    axes[0].set_xlabel("fine-tuning epoch")
    axes[1].set_xlabel("fine-tuning seconds (train + evaluation, cumulative; pretraining not counted)")
    for ax in axes:
        ax.set_ylabel("valid NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Scientific: validation NDCG@10 (full ranking over all items)")
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer", description=__doc__.split("\n\n")[0],
        epilog="Runs: " + "; ".join(f"{k}: {v[0]}" for k, v in RUNS.items()) + ". See docs/transfer.md.")
    ap.add_argument("--data", help="the shared data folder (holds seqrec_benchmark/, "
                                   "unisrec_scientific/, missrec_scientific_mm_subset/)")
    ap.add_argument("--out", help="study folder: shards, runs, exports, logs, results (new or an "
                                  "earlier study's, which is continued)")
    ap.add_argument("--quick", action="store_true",
                    help="a test of the script in CI time: 2 domains, 40 users each, 150 Scientific users, 1 epoch "
                         "of 2 steps per run; the numbers mean nothing")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"fine-tuning runs, in order (default {DEFAULT_RUNS})")
    ap.add_argument("--users-per-domain", type=int, default=None,
                    help="users drawn per pretraining domain (0 = all: the full mix; default 2000, --quick 40)")
    ap.add_argument("--movielens-users", type=int, default=None,
                    help="MovieLens-1M users drawn for run e (default: --users-per-domain / 16, about one Amazon "
                         "domain's interactions; 0 = all)")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the user samples (default 0)")
    ap.add_argument("--pretrain-k-core", type=int, default=0,
                    help="k-core of the sampled pretraining sets (the sources are 5-core already; default 0 keeps "
                         "every interaction of the sampled users)")
    ap.add_argument("--pretrain-epochs", type=int, default=40, help="pretraining epochs (paper: 40)")
    ap.add_argument("--finetune-epochs", type=int, default=100, help="fine-tuning epochs (release: 100, patience 10)")
    ap.add_argument("--pretrain-wall-time", type=float, default=0,
                    help="seconds: stop pretraining after the step that passes it (0: off)")
    ap.add_argument("--finetune-wall-time", type=float, default=0,
                    help="seconds per fine-tuning run, same rule (0: off)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per training run (deepspeed launcher if > 1)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every subprocess (default 1)")
    ap.add_argument("--parallel", type=int, default=1, help="training runs at the same time (default 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every training run, repeatable (e.g. --set train.max_steps=3 "
                         "--set data.num_workers=0)")
    ap.add_argument("--pretrain-config", default="transfer_pretrain.yaml",
                    help="the pretraining config in configs/ (default transfer_pretrain.yaml; the release's "
                         "recipe: transfer_pretrain_release.yaml)")
    ap.add_argument("--pretrain-set", dest="pretrain_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of the pretraining run only, repeatable")
    ap.add_argument("--finetune-set", dest="finetune_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of the fine-tuning runs only, repeatable (e.g. "
                         "--finetune-set train.param_groups.rows.lr_scale=0.3)")
    ap.add_argument("--pretrain-tag", default="", help="names this pretraining variant: OUT/runs/pretrain-TAG, "
                                                        "OUT/exports/pretrain-TAG (the shards are shared)")
    ap.add_argument("--finetune-tag", default="", help="names this fine-tuning variant: OUT/runs/ft-RUN[-PTAG]-FTAG")
    ap.add_argument("--seeds", default="", help="fine-tuning seeds, comma-separated (default: the config's, 2020); "
                                                "each seed is its own run, ft-...-sSEED")
    ap.add_argument("--records", default="", metavar="JSON",
                    help="upsert a record per finished fine-tuning run into this file (docs/transfer_results.json)")
    ap.add_argument("--doc", default="", metavar="MD", help="with --report-only --records: rewrite the generated "
                                                            "table of this Markdown file (docs/transfer.md)")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the results from finished runs "
                                                               "(with --records and --doc and no --out: only the doc)")
    ap.add_argument("--no-record-command", dest="record_command", action="store_false",
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag in ("users_per_domain", "movielens_users", "pretrain_k_core", "pretrain_wall_time", "finetune_wall_time"):
        if (getattr(args, flag) or 0) < 0:
            ap.error(f"--{flag.replace('_', '-')}: must be >= 0")
    for flag in ("pretrain_epochs", "finetune_epochs", "nproc", "threads", "parallel"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')}: must be >= 1")
    for tag in (args.pretrain_tag, args.finetune_tag):
        if tag and not all(c.isalnum() or c in "_." for c in tag):
            ap.error(f"--pretrain-tag/--finetune-tag {tag!r}: letters, digits, '_' and '.' only")
    if not args.report_only and not (args.data and args.out):
        ap.error("--data and --out are required (except for --report-only --records ... --doc ...)")
    if args.report_only and not args.out and not (args.records and args.doc):
        ap.error("--report-only needs --out (a study folder), or --records and --doc")
    try:
        if args.report_only:
            if args.out:
                out = Path(args.out).resolve()
                runs = [r for r in args.runs.split(",") if r in RUNS]
                res = collect(out, runs, plan(args), args, 0.0)
                write_report(out, res)
                if args.records:
                    record_runs(Path(args.records), out, res, args)
            if args.records and args.doc:
                write_records_doc(Path(args.records), Path(args.doc))
            return 0
        res = run_study(args)
    except StudyError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    failed = [r for r, e in res["runs"].items() if not e["finished"]]
    if failed:
        _say(f"runs without results: {', '.join(failed)} (see {Path(args.out) / 'logs'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
