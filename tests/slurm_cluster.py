"""A real single-node Slurm cluster for tests, on loopback only.

``slurm_cluster`` (session fixture) starts ``slurmctld`` and ``slurmd`` from the
Debian ``slurm-wlm`` package with every state, spool, log and pid file under a
temporary directory, and yields a :class:`SlurmCluster`: the environment to run
``sbatch``/``srun``/``scontrol`` against it (``SLURM_CONF``) and helpers to
submit jobs and wait for their final state.

Settings (what made a root, loopback-only, systemd-less cluster work here):
``AuthType=auth/none`` + ``CredType=cred/none`` (no munged needed),
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none`` (no cgroups),
``SelectType=select/cons_tres``, ``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``,
``SlurmctldHost=localhost(127.0.0.1)``, one ``NodeName=localhost NodeAddr=127.0.0.1``
with this machine's CPUs, accounting and job completion logging off.  Ports are
picked free at start, so two test sessions on one machine do not collide.

Job ids start at a random ``FirstJobId``, so that the rendezvous ports the scripts
derive from them do not collide between test sessions sharing a machine.

Accounting is off, so there is no ``sacct``: :meth:`SlurmCluster.wait` polls
``scontrol show job``; ``MinJobAge=3600`` keeps finished jobs visible to it.

Only a missing Slurm binary skips (with the binary named); any other failure to
start the cluster is an error whose message carries the daemons' log tails.
Every daemon is stopped by its own pid afterwards.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

__all__ = ["TERMINAL_STATES", "JobResult", "SlurmCluster", "find_slurm_binaries", "slurm_cluster"]

# Daemons live in /usr/sbin, which is not on a normal user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
_REQUIRED = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")

# Job states after which a job never runs again.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
})


def find_slurm_binaries() -> tuple[dict[str, str], list[str]]:
    """(name -> path for the binaries found, names of the missing ones)."""
    found, missing = {}, []
    for name in _REQUIRED:
        path = shutil.which(name, path=_SEARCH_PATH)
        if path:
            found[name] = path
        else:
            missing.append(name)
    return found, missing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{path}: {e}>"
    return "\n".join(lines[-n:])


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` record (``Key=Value`` pairs, values may hold spaces)."""
    text = " ".join(text.split("\n")).strip()
    fields: dict[str, str] = {}
    # A key starts after whitespace and runs up to '='; its value runs to the next ' Key='.
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", text):
        fields[m.group(1)] = m.group(2)
    return fields


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str          # e.g. COMPLETED, FAILED; PENDING when Reason=DependencyNeverSatisfied
    exit_code: int      # the batch script's exit status (first half of ExitCode=N:S)
    signal: int         # the signal that ended it, if any (second half)
    reason: str
    fields: dict[str, str]

    @property
    def stdout_path(self) -> Path | None:
        p = self.fields.get("StdOut")
        return Path(p) if p else None

    def log(self) -> str:
        p = self.stdout_path
        if p is None or not p.exists():
            return f"<no log at {p}>"
        return p.read_text(errors="replace")


class SlurmCluster:
    """A running single-node cluster. Use :attr:`env` for every Slurm client call."""

    def __init__(self, root: Path, binaries: Mapping[str, str]):
        self.root = root
        self.bin = dict(binaries)
        self.conf = root / "slurm.conf"
        self.state_dir = root / "state"
        self.spool_dir = root / "spool"
        self.log_dir = root / "log"
        self.run_dir = root / "run"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.slurmd_log = self.log_dir / "slurmd.log"
        self.cpus = os.cpu_count() or 1
        self.node = "localhost"
        self.partition = "debug"
        self._procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env["PATH"] = _SEARCH_PATH
        self.env["SLURM_CONF"] = str(self.conf)
        # Nothing from an enclosing allocation or a user's defaults may leak into test jobs.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_")) and k != "SLURM_CONF":
                del self.env[k]

    # -- lifecycle -----------------------------------------------------------
    def write_config(self) -> None:
        for d in (self.state_dir, self.spool_dir, self.log_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        user = _current_user()
        mem = max(256, int(_memory_mb() * 0.8))
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py: a throw-away single-node cluster on 127.0.0.1.
ClusterName=mmm4rec-test-{os.getpid()}
# Job ids (and so the scripts' MASTER_PORT, derived from them) differ between test
# sessions running side by side on one machine.
FirstJobId={random.randrange(1000, 20000)}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation={self.state_dir}
SlurmdSpoolDir={self.spool_dir}
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd.pid
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        daemon_env = dict(self.env)
        self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-c", "-f", str(self.conf)], daemon_env)
        self._wait_for(lambda: self._ping(), timeout, "slurmctld to answer 'scontrol ping'")
        self._spawn("slurmd", [self.bin["slurmd"], "-D", "-N", self.node, "-f", str(self.conf)], daemon_env)
        self._wait_for(lambda: self.node_state().startswith("IDLE"), timeout,
                       f"node {self.node} to become IDLE")

    def _spawn(self, name: str, argv: list[str], env: dict) -> None:
        with open(self.log_dir / f"{name}.stderr", "wb") as out:  # the child keeps its own copy
            self._procs[name] = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       + self.diagnostics())
            try:
                if ok():
                    return
            except subprocess.SubprocessError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.diagnostics())

    def diagnostics(self) -> str:
        parts = []
        for f in (self.ctld_log, self.slurmd_log, self.log_dir / "slurmctld.stderr",
                  self.log_dir / "slurmd.stderr"):
            parts.append(f"--- {f} (tail) ---\n{_tail(f)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel whatever is left, then stop each daemon by its own pid."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            try:
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False)
                    self._wait_quiet(30)
            except Exception as e:  # noqa: BLE001 - teardown must go on to stop the daemons
                print(f"slurm_cluster: cancelling leftover jobs failed: {e}")
        for name in ("slurmd", "slurmctld"):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def _wait_quiet(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"], check=False).stdout.strip():
                return
            time.sleep(0.5)

    # -- clients -------------------------------------------------------------
    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment (``env`` entries added on top)."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        argv = list(argv)
        if argv and argv[0] in self.bin:
            argv[0] = self.bin[argv[0]]
        p = subprocess.run(argv, check=False, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {p.returncode}\n"
                               f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def _ping(self) -> bool:
        p = self.run(["scontrol", "ping"], check=False, timeout=10)
        return p.returncode == 0 and "UP" in p.stdout

    def node_state(self) -> str:
        p = self.run(["scontrol", "show", "node", "-o", self.node], check=False, timeout=10)
        return parse_scontrol_record(p.stdout).get("State", "") if p.returncode == 0 else ""

    def sbatch(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        p = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return p.stdout.strip().split(";")[0]

    def show_job(self, job_id: str) -> dict[str, str]:
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=10)
        return parse_scontrol_record(p.stdout)

    def wait(self, job_id: str, timeout: float = 180.0, poll: float = 1.0) -> JobResult:
        """Wait for ``job_id`` to reach a final state; returns it.

        A pending job whose dependency can never be satisfied counts as final.
        On timeout the job is cancelled and an error carrying its log is raised.
        """
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.show_job(job_id)
            state = fields.get("JobState", "")
            reason = fields.get("Reason", "")
            if state in TERMINAL_STATES or (state == "PENDING" and reason == "DependencyNeverSatisfied"):
                code, _, sig = fields.get("ExitCode", "0:0").partition(":")
                return JobResult(str(job_id), state, int(code or 0), int(sig or 0), reason, fields)
            time.sleep(poll)
        self.run(["scancel", str(job_id)], check=False)
        res = JobResult(str(job_id), fields.get("JobState", "?"), -1, 0, fields.get("Reason", ""), fields)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s (state {res.state}, "
                           f"reason {res.reason}); cancelled.\n--- job log ---\n{res.log()[-4000:]}\n"
                           + self.diagnostics())


def _current_user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    binaries, missing = find_slurm_binaries()
    if missing:
        pytest.skip(f"Slurm not installed: {', '.join(missing)} not found on PATH or in /usr/sbin "
                    f"(Debian: apt-get install slurm-wlm)")
    # slurmstepd puts unix sockets in the spool dir: keep the path short (sun_path is 108 bytes).
    base = tmp_path_factory.mktemp("slurm")
    if len(str(base)) > 60:
        base = Path(tempfile.mkdtemp(prefix="mmm4rec-slurm-"))
    cluster = SlurmCluster(base, binaries)
    atexit.register(cluster.stop)  # in case the session dies without running finalizers
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
