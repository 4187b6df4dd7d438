"""Real Slurm clusters for tests: one node on loopback, or two nodes in network namespaces.

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

``slurm_two_nodes`` (session fixture): the same daemons as a two-node cluster on this
machine. Each ``slurmd`` runs in its own network namespace (a veth pair to a bridge the
fixture creates on an unused private 10.x.y.0/24), under its own host name, with a
private ``/etc/hosts`` naming the controller and both nodes (:class:`NamespaceNetwork`);
authentication is ``auth/munge`` through a private ``munged`` (:class:`Munge`). It skips,
saying why, where network namespaces are not permitted.

Only a missing Slurm binary (or, for two nodes, munge or namespaces) skips, with the
reason named; any other failure to start the cluster is an error whose message carries
the daemons' log tails. Every daemon is stopped by its own pid afterwards, and the
namespaces, veths and bridge are deleted.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from dist.cli import free_port

__all__ = ["TERMINAL_STATES", "JobResult", "Munge", "NamespaceNetwork", "NodeSpec", "SlurmCluster",
           "find_slurm_binaries", "slurm_cluster", "slurm_two_nodes"]

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


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """A Slurm node (or the controller): its name, its address and, for a node in a
    network namespace, the command prefix that runs a program inside it."""

    name: str
    addr: str
    launch: tuple[str, ...] = ()


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
    """A running cluster: one node on loopback by default, or the ``nodes`` given (each
    started through its ``launch`` prefix). Use :attr:`env` for every Slurm client call."""

    def __init__(self, root: Path, binaries: Mapping[str, str], *, nodes: Sequence[NodeSpec] | None = None,
                 ctld: NodeSpec | None = None, munge_socket: Path | None = None):
        self.root = root
        self.bin = dict(binaries)
        # One node on loopback by default; a multi-node cluster passes its nodes (each in
        # its own network namespace) and the controller's address on their network.
        self.nodes = list(nodes or [NodeSpec("localhost", "127.0.0.1")])
        self.ctld = ctld or NodeSpec("localhost", "127.0.0.1")
        self.munge_socket = munge_socket
        self.conf = root / "slurm.conf"
        self.state_dir = root / "state"
        self.spool_dir = root / "spool"
        self.log_dir = root / "log"
        self.run_dir = root / "run"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.cpus = os.cpu_count() or 1
        self.node = self.nodes[0].name
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
        # Every node has this machine's CPUs and memory (they share it: overcommitted).
        mem = max(256, int(_memory_mb() * 0.8))
        if self.munge_socket is not None:
            auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.munge_socket}"
        else:
            auth = "AuthType=auth/none\nCredType=cred/none"
        node_lines = "\n".join(
            f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} CPUs={self.cpus} RealMemory={mem} "
            "State=UNKNOWN" for n in self.nodes)
        node_names = ",".join(n.name for n in self.nodes)
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py: a throw-away cluster of {len(self.nodes)} node(s).
ClusterName=mmm4rec-test-{os.getpid()}
# Job ids (and so the scripts' MASTER_PORT, derived from them) differ between test
# sessions running side by side on one machine.
FirstJobId={random.randrange(1000, 20000)}
SlurmctldHost={self.ctld.name}({self.ctld.addr})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
{auth}
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
SlurmdSpoolDir={self.spool_dir}/%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName={self.partition} Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        daemon_env = dict(self.env)
        argv = [self.bin["slurmctld"], "-D", "-c", "-f", str(self.conf)]
        self._spawn("slurmctld", [*self.ctld.launch, *argv], daemon_env)
        self._wait_for(lambda: self._ping(), timeout, "slurmctld to answer 'scontrol ping'")
        for n in self.nodes:
            argv = [self.bin["slurmd"], "-D", "-N", n.name, "-f", str(self.conf)]
            self._spawn(f"slurmd-{n.name}", [*n.launch, *argv], daemon_env)
        for n in self.nodes:
            self._wait_for(lambda n=n: self.node_state(n.name).startswith("IDLE"), timeout,
                           f"node {n.name} to become IDLE")

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
        files = [self.ctld_log, self.log_dir / "slurmctld.stderr"]
        for n in self.nodes:
            files += [self.log_dir / f"slurmd-{n.name}.log", self.log_dir / f"slurmd-{n.name}.stderr"]
        for f in files:
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
        for name in [f"slurmd-{n.name}" for n in self.nodes] + ["slurmctld"]:
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

    def node_state(self, node: str | None = None) -> str:
        p = self.run(["scontrol", "show", "node", "-o", node or self.node], check=False, timeout=10)
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


# ------------------------------------------------------------------ two nodes
class NamespaceNetwork:
    """Nodes on a private network on this machine: one network namespace per node.

    A bridge on the host holds ``10.A.B.1/24`` (an unused 10.x /24 picked at start,
    the controller's address); node ``i`` is a namespace with a veth pair to the bridge
    (``eth0`` inside, ``10.A.B.(11+i)``). :meth:`node` gives the command prefix that runs a
    program "on" a node: inside its namespace, under its own hostname (``unshare --uts``)
    and with a private ``/etc/hosts`` (``unshare --mount`` + a bind mount) naming every
    node and the controller, so that each host name resolves to its namespace address
    there, as on a real cluster. The file system is shared (only the network and the
    host name are per node). :meth:`destroy` removes everything it created.
    """

    def __init__(self, root: Path, count: int):
        self.root = root
        self.tag = f"{random.randrange(16 ** 6):06x}"
        self.bridge = f"m4rb{self.tag}"
        self.ns = [f"m4r{self.tag}n{i + 1}" for i in range(count)]
        self.veths = [f"m4r{self.tag}h{i + 1}" for i in range(count)]
        self.names = [f"m4r{self.tag}-node{i + 1}" for i in range(count)]
        self.ctld_name = f"m4r{self.tag}-ctl"
        self.hosts = root / "hosts"
        self.prefix = ""
        self._created: list[tuple[str, str]] = []   # ("netns"|"link", name), for destroy

    @staticmethod
    def _ip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)

    def _used_prefixes(self) -> set[str]:
        text = self._ip("-4", "-o", "addr", "show").stdout + self._ip("-4", "route", "show").stdout
        return {".".join(m.split(".")[:3]) for m in re.findall(r"\b10\.\d+\.\d+\.\d+", text)}

    def _check(self, p: subprocess.CompletedProcess, what: str) -> None:
        if p.returncode != 0:
            raise RuntimeError(f"{what} failed ({p.returncode}): {p.stderr.strip()}")

    def create(self) -> None:
        used = self._used_prefixes()
        while True:
            self.prefix = f"10.{random.randrange(200, 255)}.{random.randrange(0, 255)}"
            if self.prefix not in used:
                break
        self._check(self._ip("link", "add", self.bridge, "type", "bridge"), f"ip link add {self.bridge}")
        self._created.append(("link", self.bridge))
        self._check(self._ip("addr", "add", f"{self.ctld_addr}/24", "dev", self.bridge), "address of the bridge")
        self._check(self._ip("link", "set", self.bridge, "up"), "bridge up")
        for i, (ns, veth) in enumerate(zip(self.ns, self.veths)):
            self._check(self._ip("netns", "add", ns), f"ip netns add {ns}")
            self._created.append(("netns", ns))
            self._check(self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns),
                        f"veth pair {veth}")
            self._created.append(("link", veth))
            self._check(self._ip("link", "set", veth, "master", self.bridge, "up"), f"{veth} up")
            self._check(self._ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"), f"address in {ns}")
            self._check(self._ip("-n", ns, "link", "set", "eth0", "up"), f"eth0 up in {ns}")
            self._check(self._ip("-n", ns, "link", "set", "lo", "up"), f"lo up in {ns}")
        lines = ["127.0.0.1 localhost", f"{self.ctld_addr} {self.ctld_name}"]
        lines += [f"{self.addr(i)} {name}" for i, name in enumerate(self.names)]
        self.hosts.write_text("\n".join(lines) + "\n")

    @property
    def ctld_addr(self) -> str:
        return f"{self.prefix}.1"

    def addr(self, i: int) -> str:
        return f"{self.prefix}.{11 + i}"

    def _as_host(self, name: str) -> tuple[str, ...]:
        """Run a program under host name ``name`` with the private hosts file."""
        return ("unshare", "--uts", "--mount", "--", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"', str(self.hosts), name)

    def node(self, i: int) -> NodeSpec:
        # nsenter rather than 'ip netns exec', which remounts /sys (slurmd needs the host's
        # /sys/fs/cgroup there).
        return NodeSpec(self.names[i], self.addr(i),
                        ("nsenter", f"--net=/run/netns/{self.ns[i]}", "--", *self._as_host(self.names[i])))

    def ctld(self) -> NodeSpec:
        """The controller: on the host's side of the bridge (slurmctld wants its own host name)."""
        return NodeSpec(self.ctld_name, self.ctld_addr, self._as_host(self.ctld_name))

    def destroy(self) -> None:
        """Delete what :meth:`create` made (a namespace's veth end goes with it)."""
        for kind, name in reversed(self._created):
            if kind == "netns":
                self._ip("netns", "del", name)
            else:
                self._ip("link", "del", name)
        self._created.clear()


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can)."""
    for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
        if shutil.which(tool, path=_SEARCH_PATH) is None:
            return f"{tool} not found (Debian: iproute2, util-linux, hostname)"
    probe = f"m4rprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return f"network namespaces are not permitted here ('ip netns add' said: {p.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, timeout=30)
    return None


class Munge:
    """A private ``munged``: fresh key, socket, pid and log files under ``root``; every
    node of the cluster reaches it through the socket (network namespaces do not isolate
    the file system). The key is random per session and deleted with ``root``."""

    def __init__(self, root: Path, munged: str):
        self.root = root
        self.munged = munged
        self.socket = root / "munge.socket"
        self.key = root / "munge.key"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        argv = [self.munged, "--foreground", f"--socket={self.socket}", f"--key-file={self.key}",
                f"--log-file={self.root / 'munged.log'}", f"--pid-file={self.root / 'munged.pid'}",
                f"--seed-file={self.root / 'munged.seed'}"]
        if os.getuid() == 0:
            argv.append("--force")   # munged refuses root without it
        with open(self.root / "munged.stderr", "wb") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {_tail(self.root / 'munged.stderr')}")
            time.sleep(0.1)

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.key.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """A two-node cluster: ``slurmctld`` on a host bridge, each ``slurmd`` in its own
    network namespace with its own host name and address (:class:`NamespaceNetwork`),
    authentication by a shared private ``munged`` (:class:`Munge`). Skips, saying why,
    without Slurm, munge or permission for network namespaces."""
    binaries, missing = find_slurm_binaries()
    munged = shutil.which("munged", path=_SEARCH_PATH)
    if missing or munged is None:
        pytest.skip(f"Slurm/munge not installed: {', '.join(missing + ([] if munged else ['munged']))} not found "
                    f"(Debian: apt-get install slurm-wlm munge)")
    why = namespaces_unavailable()
    if why:
        pytest.skip(f"two-node Slurm cluster needs network namespaces: {why}")
    base = Path(tempfile.mkdtemp(prefix="m4r-2n-"))   # short: unix socket paths are at most 108 bytes
    net = NamespaceNetwork(base, 2)
    munge = Munge(base / "munge", munged)
    cluster: SlurmCluster | None = None

    def teardown() -> None:
        if cluster is not None:
            cluster.stop()
        munge.stop()
        net.destroy()

    atexit.register(teardown)
    try:
        net.create()
        munge.start()
        cluster = SlurmCluster(base / "slurm", binaries, nodes=[net.node(0), net.node(1)], ctld=net.ctld(),
                               munge_socket=munge.socket)
        cluster.start()
    except BaseException:
        teardown()
        raise
    try:
        yield cluster
    finally:
        teardown()
        shutil.rmtree(base, ignore_errors=True)
