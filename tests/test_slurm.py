"""slurm/*.sh against real Slurm clusters (tests/slurm_cluster.py).

Three groups:

* quick checks of the scripts that need only bash (usage, syntax, the per-task
  env:// variables, the head-node and port rules);
* ``@pytest.mark.slurm`` + ``@pytest.mark.slow``: jobs submitted to a real
  ``slurmctld``/``slurmd`` started by the ``slurm_cluster`` fixture, training
  ``dist/train.py`` on CPU with 2 tasks and the tiny configs
  (configs/tiny_pretrain.yaml, configs/tiny_finetune.yaml).
* ``two_nodes``: the same scripts on a two-node cluster (``slurm_two_nodes``: each
  ``slurmd`` in its own network namespace, with its own host name and address),
  one task per node, gloo over the namespaces' interfaces.

Only a missing Slurm binary skips (the fixture names it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmm4rec.config import ConfigError

try:  # tests/ on sys.path (no tests/__init__.py) ...
    from slurm_cluster import SlurmCluster, slurm_cluster, slurm_two_nodes  # noqa: F401  (the fixtures)
except ModuleNotFoundError:  # ... or tests/ as a package
    from tests.slurm_cluster import SlurmCluster, slurm_cluster, slurm_two_nodes  # noqa: F401  (the fixtures)

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = ["pretrain.sh", "finetune.sh", "transfer.sh", "common.sh"]
TINY_PRETRAIN = "configs/tiny_pretrain.yaml"
TINY_FINETUNE = "configs/tiny_finetune.yaml"
JOB_TIMEOUT = 240.0  # seconds to wait for one training job (each should take well under 2 min)
SHORT = "--set train.epochs=1 --set train.steps_per_epoch=4"  # a shorter run of the tiny configs



def cluster_test(timeout: float | None = None):
    """A test that submits jobs to a real cluster: marked slurm and slow (and a timeout)."""
    def mark(fn):
        for m in (pytest.mark.slurm, pytest.mark.slow, *([pytest.mark.timeout(timeout)] if timeout else [])):
            fn = m(fn)
        return fn
    return mark


def _python() -> str:
    """The interpreter the jobs run: MMM4REC_PYTHON, else the repo's venv, else this one."""
    if os.environ.get("MMM4REC_PYTHON"):
        return os.environ["MMM4REC_PYTHON"]
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _bash(args, env=None, cwd=REPO, timeout=60) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    for k in list(full):
        if k.startswith(("SLURM_", "SBATCH_")) or k in ("MMM4REC_MASTER_ADDR", "MMM4REC_MASTER_PORT", "ENVIRONMENT"):
            del full[k]
    full.update(env or {})
    return subprocess.run(["bash", *map(str, args)], check=False, env=full, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _stub(dir_: Path, name: str, body: str) -> None:
    p = dir_ / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(0o755)


# ----------------------------------------------------------------- quick checks
@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    p = _bash(["-n", SLURM / script])
    assert p.returncode == 0, p.stderr


def test_shellcheck():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed (Debian: apt-get install shellcheck)")
    p = subprocess.run([sc, "-x", *[str(SLURM / s) for s in SCRIPTS]], check=False, cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script,must_mention", [
    ("pretrain.sh", ["CONFIG", "OUTPUT_DIR", "LAUNCHER", "MMM4REC_DEVICE", "MMM4REC_PYTHON", "NODES", "LOG_DIR",
                     "#SBATCH --gpus-per-node", "#SBATCH --output=logs/slurm/%x-%j.out"]),
    ("finetune.sh", ["PRETRAINED", "train.init_from", "CONFIG", "OUTPUT_DIR", "LAUNCHER", "NODES"]),
    ("transfer.sh", ["PRETRAIN_JOB_ID", "FINETUNE_JOB_ID", "afterok", "NODES", "LOG_DIR", "PRETRAIN_CONFIG"]),
])
def test_help_prints_usage_without_submitting(tmp_path, script, must_mention):
    marker = tmp_path / "sbatch-called"
    _stub(tmp_path, "sbatch", f'touch "{marker}"; echo 1')
    p = _bash([SLURM / script, "--help"], env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr
    assert not marker.exists(), "--help submitted a job"
    for word in must_mention:
        assert word in p.stdout, f"{script} --help does not mention {word}:\n{p.stdout}"


_SHOW_TASK_ENV = """
import os
from mmm4rec.log import setup_logging
from dist.env import prepare_process_env
setup_logging()
prepare_process_env()
print(*(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')))
"""


def test_an_srun_task_gets_the_torch_env_from_slurm():
    """dist/train.py as one srun task of slurm/common.sh (MMM4REC_SLURM_TASK=1): its env://
    variables come from the task's SLURM_* ones (dist/env.py), in the process itself."""
    base = {"MMM4REC_SLURM_TASK": "1", "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x2),4",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "12345"}
    for task, want in (({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}, "3 8 1 2"),
                       ({"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NODEID": "2"}, "7 8 3 4")):
        p = _bash(["-c", f'exec "{sys.executable}" -c "$0"', _SHOW_TASK_ENV], env={**base, **task})
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == [*want.split(), "node-a", "12345"]
        rank, world = want.split()[:2]
        assert f"task rank {rank}/{world} on host " in p.stderr, p.stderr   # every rank says where it runs


def test_an_srun_task_refuses_without_slurm_vars():
    from dist.env import slurm_task_env, tasks_on_node

    with pytest.raises(ConfigError, match="SLURM_PROCID is not set"):
        slurm_task_env({"MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert [tasks_on_node("2(x2),4", i) for i in range(3)] == [2, 2, 4]
    with pytest.raises(ConfigError, match="task count"):
        tasks_on_node("2(x2),4", 3)


def test_head_node_is_first_host_and_never_a_silent_localhost(tmp_path):
    fn = f'source "{SLURM / "common.sh"}"; mmm4rec_head_node'
    # scontrol expands the node list: the first host is the head.
    _stub(tmp_path, "scontrol", 'printf "gpu-017\\ngpu-018\\n"')
    path = f"{tmp_path}:{os.environ['PATH']}"
    p = _bash(["-c", fn], env={"PATH": path, "SLURM_JOB_NODELIST": "gpu-[017-018]"})
    assert (p.returncode, p.stdout.strip()) == (0, "gpu-017"), p.stderr
    # scontrol yields nothing: a loud failure, not localhost.
    _stub(tmp_path, "scontrol", "exit 0")
    p = _bash(["-c", fn], env={"PATH": path, "SLURM_JOB_NODELIST": "gpu-[017-018]"})
    assert p.returncode != 0 and "head node" in p.stderr and "localhost" not in p.stdout
    # outside an allocation: a loud failure too.
    p = _bash(["-c", fn], env={"PATH": path})
    assert p.returncode != 0 and "SLURM_JOB_NODELIST" in p.stderr
    # an explicit override is honoured.
    p = _bash(["-c", fn], env={"PATH": path, "MMM4REC_MASTER_ADDR": "gpu-017-ib"})
    assert p.stdout.strip() == "gpu-017-ib"


def test_master_port_is_derived_from_the_job_id():
    fn = f'source "{SLURM / "common.sh"}"; mmm4rec_master_port'
    ports = [int(_bash(["-c", fn], env={"SLURM_JOB_ID": str(j)}).stdout) for j in (1, 12345, 12346, 987654)]
    assert ports == [10001, 22345, 22346, 10000 + 987654 % 20000]
    assert all(1024 < p < 32768 for p in ports)  # below the ephemeral range
    assert _bash(["-c", fn]).returncode != 0


def test_job_body_refuses_to_run_outside_slurm():
    p = _bash([SLURM / "pretrain.sh", "--run"])
    assert p.returncode != 0 and "not inside a Slurm job" in p.stderr


# ------------------------------------------------------------- cluster tests
def _job_env(tmp_path: Path) -> dict[str, str]:
    """Variables every training job of these tests gets."""
    return {
        "MMM4REC_ROOT": str(REPO),
        "MMM4REC_DEVICE": "cpu",
        "MMM4REC_PYTHON": _python(),
        # Compiled DeepSpeed ops are cached across jobs and test runs (.gitignore'd).
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "LOG_DIR": str(tmp_path / "logs"),
    }


def _cpu_sbatch_opts(cluster: SlurmCluster, tmp_path: Path) -> list[str]:
    (tmp_path / "logs").mkdir(exist_ok=True)  # plain sbatch: Slurm does not create the log dir
    opts = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
            f"--output={tmp_path}/logs/%x-%j.out"]
    if cluster.cpus < 2:
        opts.append("--overcommit")
    return opts


def _require_training_entry_point():
    # dist/train.py and the tiny configs are part of the repository: missing ones are an error.
    missing = [p for p in ("dist/train.py", TINY_PRETRAIN, TINY_FINETUNE) if not (REPO / p).exists()]
    assert not missing, f"missing from the repository: {missing}"


def _assert_completed(res, what: str) -> None:
    assert (res.state, res.exit_code) == ("COMPLETED", 0), (
        f"{what}: job {res.job_id} ended {res.state} exit {res.exit_code}:{res.signal} ({res.reason})\n"
        f"--- log {res.stdout_path} ---\n{res.log()[-6000:]}")


def _run_job(cluster: SlurmCluster, tmp_path: Path, script: str, args=(), opts=None, timeout: float = JOB_TIMEOUT,
             **variables: str):
    """``sbatch slurm/SCRIPT ARGS`` (2 CPU tasks on one node unless ``opts``) with the test job
    variables plus ``variables``; waits for it -> (job id, result)."""
    opts = _cpu_sbatch_opts(cluster, tmp_path) if opts is None else opts
    job = cluster.sbatch([*opts, f"slurm/{script}", *args], env={**_job_env(tmp_path), **variables}, cwd=REPO)
    return job, cluster.wait(job, timeout=timeout)


def _train_job(cluster: SlurmCluster, tmp_path: Path, what: str, args=(), opts=None, **variables: str):
    """A real training job of slurm/pretrain.sh with the tiny pretraining config that must
    complete and leave its outputs -> (job id, result, output dir)."""
    _require_training_entry_point()
    out = tmp_path / "pretrain"
    job, res = _run_job(cluster, tmp_path, "pretrain.sh", args, opts, CONFIG=TINY_PRETRAIN, OUTPUT_DIR=str(out),
                        **variables)
    _assert_completed(res, what)
    _assert_run_outputs(out)
    return job, res, out


def _submit_transfer(cluster: SlurmCluster, tmp_path: Path, nodes: int | None, tasks_per_node: int,
                     **variables: str) -> tuple[Path, dict[str, str]]:
    """``bash slurm/transfer.sh`` with the tiny configs (``variables`` add or override): the run
    directory and the ids it prints (PRETRAIN_JOB_ID, FINETUNE_JOB_ID, RUN_DIR)."""
    run_dir = tmp_path / "run"
    env = {**_job_env(tmp_path), "RUN_DIR": str(run_dir), "PRETRAIN_CONFIG": TINY_PRETRAIN,
           "FINETUNE_CONFIG": TINY_FINETUNE, "TASKS_PER_NODE": str(tasks_per_node), "CPUS_PER_TASK": "1",
           "SBATCH_TIMELIMIT": "10", **({"NODES": str(nodes)} if nodes else {}), **variables}
    extra = ["--overcommit"] if cluster.cpus < 2 and nodes != 2 else []
    p = cluster.run(["bash", str(SLURM / "transfer.sh"), *extra], env=env, cwd=REPO)
    return run_dir, dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def _assert_run_outputs(out: Path) -> None:
    export = out / "export"
    assert (export / "model.safetensors").is_file(), f"no export in {out}: {sorted(map(str, out.rglob('*')))[:50]}"
    assert (export / "config.json").is_file()
    ckpt = out / "checkpoints"
    assert ckpt.is_dir() and any(p.is_file() for p in ckpt.rglob("*")), f"no checkpoint under {ckpt}"
    assert (out / "metrics.json").is_file()
    json.loads((out / "metrics.json").read_text())


@cluster_test()
def test_cluster_runs_a_two_task_job(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\nsrun bash -c 'echo procid=$SLURM_PROCID ntasks=$SLURM_NTASKS'\n")
    opts = ["-n", "2", f"--output={tmp_path}/%j.out", "--time=2"]
    if slurm_cluster.cpus < 2:
        opts.append("--overcommit")
    job = slurm_cluster.sbatch([*opts, str(script)], cwd=tmp_path)
    res = slurm_cluster.wait(job, timeout=60)
    _assert_completed(res, "self-test")
    log = res.log()
    assert "procid=0 ntasks=2" in log and "procid=1 ntasks=2" in log, log


# A stand-in for the Python interpreter: it reports what each task was given and
# honours the output contract, without training (checks the plumbing in seconds).
_FAKE_PYTHON = r"""#!/usr/bin/env bash
set -eu
echo "task PROCID=$SLURM_PROCID NTASKS=$SLURM_NTASKS LOCALID=$SLURM_LOCALID SLURM_TASK=$MMM4REC_SLURM_TASK" \
     "MASTER=$MASTER_ADDR:$MASTER_PORT OMP=$OMP_NUM_THREADS DS=${DS_ACCELERATOR:-} ARGS=$*"
out=""
prev=""
for a in "$@"; do [ "$prev" = --output-dir ] && out=$a; prev=$a; done
if [ "$SLURM_PROCID" = 0 ] && [ "${FAKE_EXIT:-0}" = 0 ] && [ -z "${FAKE_NO_EXPORT:-}" ]; then
  mkdir -p "$out/export" "$out/checkpoints"
  : > "$out/export/model.safetensors"; echo '{}' > "$out/export/config.json"
fi
exit "${FAKE_EXIT:-0}"
"""


@cluster_test()
def test_job_environment_and_exit_status_with_a_stand_in_python(slurm_cluster, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_1").write_text("x")  # RESUME=auto must add --resume
    env = {**_job_env(tmp_path), "MMM4REC_PYTHON": str(fake), "CONFIG": str(cfg), "OUTPUT_DIR": str(out),
           "OMP_NUM_THREADS": "7", "EXTRA_ARGS": "--set train.a=1"}
    job, res = _run_job(slurm_cluster, tmp_path, "pretrain.sh", ["--set", "train.b=two words"], timeout=60, **env)
    _assert_completed(res, "stand-in")
    log = res.log()
    port = 10000 + int(job) % 20000
    for rank in (0, 1):
        line = next((ln for ln in log.splitlines() if ln.startswith(f"task PROCID={rank} ")), None)
        assert line is not None, log
        assert f"NTASKS=2 LOCALID={rank} SLURM_TASK=1" in line, line   # dist/env.py maps them
        assert f"MASTER={slurm_cluster.node}:{port} OMP=1 DS=cpu" in line, line
        assert line.endswith(f"ARGS={REPO}/dist/train.py --config {cfg} --output-dir {out} "
                             "--set train.a=1 --set train.b=two words --resume"), line

    # The job's exit status is training's (FAILED, same code), and the failure is logged.
    env["FAKE_EXIT"] = "3"
    job, res = _run_job(slurm_cluster, tmp_path, "pretrain.sh", timeout=60, **env)
    assert (res.state, res.exit_code) == ("FAILED", 3), (res, res.log())
    assert "training FAILED with exit code 3" in res.log()

    # A pre-training that exits 0 without an export fails the job: there is nothing to transfer.
    env["FAKE_EXIT"] = "0"
    env["FAKE_NO_EXPORT"] = "1"
    env["OUTPUT_DIR"] = str(tmp_path / "out-no-export")
    job, res = _run_job(slurm_cluster, tmp_path, "pretrain.sh", timeout=60, **env)
    assert res.state == "FAILED" and res.exit_code != 0, (res, res.log())
    assert "left no export" in res.log()


@cluster_test()
def test_finetune_refuses_a_missing_export(slurm_cluster, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    _, res = _run_job(slurm_cluster, tmp_path, "finetune.sh", timeout=60, CONFIG=str(cfg),
                      OUTPUT_DIR=str(tmp_path / "out"), PRETRAINED=str(tmp_path / "nowhere" / "export"))
    assert res.state == "FAILED" and res.exit_code != 0, res
    assert "is not an export" in res.log(), res.log()


@cluster_test(timeout=600)
def test_sbatch_pretrain_cpu_two_tasks(slurm_cluster, tmp_path):
    job, res, _ = _train_job(slurm_cluster, tmp_path, "pretrain")
    log = res.log()
    assert "device=cpu launcher=srun tasks=2" in log, log
    assert res.stdout_path == tmp_path / "logs" / f"mmm4rec-pretrain-{job}.out"


@cluster_test(timeout=900)
def test_transfer_chains_pretrain_export_into_finetune(slurm_cluster, tmp_path):
    _require_training_entry_point()
    run_dir, ids = _submit_transfer(slurm_cluster, tmp_path, 1, 2, PRETRAIN_EXTRA_ARGS=SHORT, FINETUNE_EXTRA_ARGS=SHORT)
    assert set(ids) == {"PRETRAIN_JOB_ID", "FINETUNE_JOB_ID", "RUN_DIR"}, ids
    pre, fine = ids["PRETRAIN_JOB_ID"], ids["FINETUNE_JOB_ID"]
    assert Path(ids["RUN_DIR"]) == run_dir
    assert slurm_cluster.show_job(fine)["Dependency"].startswith(f"afterok:{pre}")
    assert (tmp_path / "logs").is_dir()  # transfer.sh created LOG_DIR

    res_pre = slurm_cluster.wait(pre, timeout=JOB_TIMEOUT)
    _assert_completed(res_pre, "transfer: pretrain")
    res_fine = slurm_cluster.wait(fine, timeout=JOB_TIMEOUT)
    _assert_completed(res_fine, "transfer: finetune")
    export = run_dir / "pretrain" / "export"
    _assert_run_outputs(run_dir / "pretrain")
    _assert_run_outputs(run_dir / "finetune")
    # The fine-tuning job was started from the pre-training export ...
    log = res_fine.log()
    assert f"--set train.init_from={export}" in log, log
    # ... and training itself recorded that (its log, metrics or saved config name the export).
    evidence = [log] + [f.read_text(errors="replace") for f in (run_dir / "finetune").rglob("*")
                        if f.is_file() and f.suffix in (".json", ".yaml", ".yml", ".txt", ".log")]
    train_lines = [t for t in evidence if str(export) in t.replace(f"--set train.init_from={export}", "")]
    assert train_lines, f"nothing written by training names {export} as init_from"


@cluster_test(timeout=600)
def test_torchrun_launcher(slurm_cluster, tmp_path):
    job, res, _ = _train_job(slurm_cluster, tmp_path, "pretrain with torchrun", SHORT.split(), LAUNCHER="torchrun")
    log = res.log()
    assert "launcher=torchrun" in log and "--nproc-per-node=2" in log, log
    assert f"--rdzv-endpoint={slurm_cluster.node}:{10000 + int(job) % 20000}" in log, log


@cluster_test(timeout=600)
def test_failing_training_fails_the_job(slurm_cluster, tmp_path):
    _require_training_entry_point()
    out = tmp_path / "bad"
    _, res = _run_job(slurm_cluster, tmp_path, "pretrain.sh", ["--set", "train.no_such_key_xyz=1"],
                      CONFIG=TINY_PRETRAIN, OUTPUT_DIR=str(out))
    log = res.log()
    assert res.state == "FAILED" and res.exit_code != 0, (res, log[-4000:])
    # dist/train.py exits 2 on a configuration error. srun's status is the highest of its
    # tasks': 2, or 143 when --kill-on-bad-exit terminated a rank that had not exited yet.
    assert res.exit_code in (2, 143), (res, log[-4000:])
    assert re.search(r"srun: error: .*Exited with exit code 2", log), log[-4000:]
    assert "no_such_key_xyz" in log, log[-4000:]
    assert f"training FAILED with exit code {res.exit_code}" in log, log[-4000:]
    assert not (out / "export" / "model.safetensors").exists()


@cluster_test(timeout=600)
def test_transfer_does_not_finetune_after_failed_pretrain(slurm_cluster, tmp_path):
    _require_training_entry_point()
    run_dir, ids = _submit_transfer(slurm_cluster, tmp_path, None, 2,
                                    PRETRAIN_EXTRA_ARGS="--set train.no_such_key_xyz=1")
    res_pre = slurm_cluster.wait(ids["PRETRAIN_JOB_ID"], timeout=JOB_TIMEOUT)
    assert res_pre.state == "FAILED" and res_pre.exit_code != 0, res_pre.log()[-4000:]
    res_fine = slurm_cluster.wait(ids["FINETUNE_JOB_ID"], timeout=60)
    # --kill-on-invalid-dep=yes: cancelled, never started.
    assert res_fine.state == "CANCELLED" and res_fine.reason == "DependencyNeverSatisfied", res_fine
    # Never started: no node ran its batch script, so there is no start time and no output
    # file. (RunTime is no witness: for a job cancelled while pending, some Slurm versions
    # report the time since the epoch there.)
    assert res_fine.fields.get("BatchHost") in (None, "", "(null)"), res_fine.fields
    assert res_fine.fields.get("StartTime") in (None, "", "None", "Unknown") \
        or res_fine.fields.get("StartTime") == res_fine.fields.get("EndTime"), res_fine.fields
    assert res_fine.stdout_path is None or not res_fine.stdout_path.exists(), res_fine.fields
    assert not (run_dir / "finetune" / "export").exists()


# ---------------------------------------------------------- two-node cluster
KILL_TO_FAILED_LIMIT = 90.0   # seconds from SIGKILL of one rank to the job's FAILED state


def _rank_hosts(log: str) -> dict[int, str]:
    """{rank: host} from the per-task lines every rank logs (dist/env.py)."""
    found = re.findall(r"task rank (\d+)/\d+ on host (\S+) ", log)
    return {int(r): h for r, h in found}


def _assert_one_rank_per_node(cluster: SlurmCluster, log: str) -> None:
    hosts = _rank_hosts(log)
    names = [n.name for n in cluster.nodes]
    assert hosts == {0: names[0], 1: names[1]}, f"ranks ran on {hosts}, expected one per node {names}\n{log[-4000:]}"


def _two_node_opts(tmp_path: Path) -> list[str]:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
            f"--output={tmp_path}/logs/%x-%j.out"]


@cluster_test(timeout=600)
def test_two_nodes_pretrain_one_rank_per_node(slurm_two_nodes, tmp_path):
    cluster = slurm_two_nodes
    job, res, out = _train_job(cluster, tmp_path, "two-node pretrain", SHORT.split(), _two_node_opts(tmp_path))
    log = res.log()
    # The rendezvous host is the first node by its name, which resolves to its namespace address.
    assert f"master={cluster.nodes[0].name}:{10000 + int(job) % 20000}" in log, log[-4000:]
    assert "device=cpu launcher=srun tasks=2" in log, log[-4000:]
    _assert_one_rank_per_node(cluster, log)
    assert "world 2 (gloo, cpu)" in log, log[-4000:]
    assert res.fields.get("NumNodes") == "2", res.fields

    # 2 nodes -> 1 node: the run continues (a second epoch) on one node with the same global
    # batch (2 x 128 rows -> 1 x 256); RESUME=auto passes --resume.
    opts = [o for o in _two_node_opts(tmp_path) if not o.startswith(("--nodes", "--ntasks-per-node"))]
    job, res = _run_job(cluster, tmp_path, "pretrain.sh",
                        [*SHORT.replace("train.epochs=1", "train.epochs=2").split(), "--set", "data.batch_size=256"],
                        [*opts, "--nodes=1", "--ntasks-per-node=1"], CONFIG=TINY_PRETRAIN, OUTPUT_DIR=str(out))
    _assert_completed(res, "pretrain resumed on one node")
    log = res.log()
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'}: epoch 2, step 4" in log, log[-4000:]
    assert "world 1 (gloo, cpu)" in log and _rank_hosts(log) == {0: cluster.nodes[0].name}, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["steps"], metrics["epochs_run"], metrics["world_size"]) == (8, 2, 1), metrics


@cluster_test(timeout=900)
def test_two_nodes_transfer_chains_finetune_on_the_export(slurm_two_nodes, tmp_path):
    _require_training_entry_point()
    cluster = slurm_two_nodes
    run_dir, ids = _submit_transfer(cluster, tmp_path, 2, 1, PRETRAIN_EXTRA_ARGS=SHORT, FINETUNE_EXTRA_ARGS=SHORT)
    pre, fine = ids["PRETRAIN_JOB_ID"], ids["FINETUNE_JOB_ID"]
    assert cluster.show_job(fine)["Dependency"].startswith(f"afterok:{pre}")
    res_pre = cluster.wait(pre, timeout=JOB_TIMEOUT)
    _assert_completed(res_pre, "two-node transfer: pretrain")
    res_fine = cluster.wait(fine, timeout=JOB_TIMEOUT)
    _assert_completed(res_fine, "two-node transfer: finetune")
    _assert_run_outputs(run_dir / "pretrain")
    _assert_run_outputs(run_dir / "finetune")
    for res in (res_pre, res_fine):
        assert res.fields.get("NumNodes") == "2", res.fields
        _assert_one_rank_per_node(cluster, res.log())
    export = run_dir / "pretrain" / "export"
    log = res_fine.log()
    assert f"--set train.init_from={export}" in log, log[-4000:]
    assert f"initialised the dense weights from {export}" in log, log[-4000:]


def _find_rank_process(job_id: str, rank: int) -> int | None:
    """pid of the training process of ``rank`` in ``job_id`` (the namespaces share the pid space)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"dist/train.py" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ
                and f"SLURM_PROCID={rank}".encode() in environ):
            return int(proc.name)
    return None


@cluster_test(timeout=600)
def test_two_nodes_killed_rank_fails_the_job_and_cancels_finetune(slurm_two_nodes, tmp_path):
    _require_training_entry_point()
    cluster = slurm_two_nodes
    run_dir, ids = _submit_transfer(cluster, tmp_path, 2, 1,
                                    PRETRAIN_EXTRA_ARGS="--set train.epochs=50")   # far longer than the test waits
    pre, fine = ids["PRETRAIN_JOB_ID"], ids["FINETUNE_JOB_ID"]
    # Wait until training runs on both nodes (the process group is up: rank 0 announced the world).
    deadline = time.monotonic() + JOB_TIMEOUT
    log_path = tmp_path / "logs" / f"mmm4rec-pretrain-{pre}.out"
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if "world 2 (gloo, cpu)" in log:
            break
        state = cluster.show_job(pre).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"pretrain ended {state} before the kill\n{log[-4000:]}"
        time.sleep(1)
    else:
        pytest.fail(f"pretraining did not start within {JOB_TIMEOUT:.0f}s\n{log[-4000:]}")
    _assert_one_rank_per_node(cluster, log)
    pid = _find_rank_process(pre, 1)
    assert pid is not None, "no training process of rank 1 found"
    # the process killed is on the second node: its UTS namespace carries that node's host name
    host = subprocess.run(["nsenter", "-t", str(pid), "--uts", "hostname"], capture_output=True, text=True,
                          check=False).stdout.strip()
    assert host == cluster.nodes[1].name, host
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    res_pre = cluster.wait(pre, timeout=KILL_TO_FAILED_LIMIT, poll=0.5)
    took = time.monotonic() - t_kill
    log = res_pre.log()
    assert res_pre.state == "FAILED" and res_pre.exit_code != 0, (res_pre, log[-4000:])
    assert "training FAILED with exit code" in log, log[-4000:]
    print(f"killed rank 1 (pid {pid}) on {cluster.nodes[1].name}: job {pre} FAILED after {took:.1f}s")
    assert took < KILL_TO_FAILED_LIMIT
    res_fine = cluster.wait(fine, timeout=60)
    assert res_fine.state == "CANCELLED" and res_fine.reason == "DependencyNeverSatisfied", res_fine
    assert res_fine.fields.get("RunTime") == "00:00:00", res_fine.fields
    assert not (run_dir / "pretrain" / "export").exists()
