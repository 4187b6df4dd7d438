"""Process setup: environment, process group, device, seeds and RNG state.

One code path for every launcher: ``deepspeed``, ``torchrun`` and Slurm's ``srun``
(through ``slurm/common.sh``) export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``; a plain ``python dist/train.py`` has none of them
and runs as a world of one (a free local port is picked). CUDA -> NCCL, else gloo
through DeepSpeed's CPU accelerator.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmm4rec.config import ConfigError
from mmm4rec.cpu_memory import retain_freed_memory_if_asked

from .cli import free_port, process_env

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)
__all__ = ["DistEnv", "slurm_task_env", "tasks_on_node", "prepare_process_env", "init_distributed", "seed_everything",
           "rng_state", "set_rng_state"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: set by slurm/common.sh for srun's tasks: read this process's place from SLURM_* variables
SLURM_TASK_FLAG = "MMM4REC_SLURM_TASK"


def tasks_on_node(spec: str, node: int) -> int:
    """The task count of node ``node`` from Slurm's compressed per-node counts ("2(x3),1")."""
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            break
        count, reps = int(m.group(1)), int(m.group(2) or 1)
        if node < reps:
            return count
        node -= reps
    raise ConfigError(f"cannot read this node's task count from SLURM_STEP_TASKS_PER_NODE={spec!r}")


def slurm_task_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The env:// variables of one srun task (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    LOCAL_SIZE for DeepSpeed's CPU accelerator, GROUP_RANK) from its SLURM_* variables;
    MASTER_ADDR/MASTER_PORT must be set (slurm/common.sh)."""
    for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(v):
            raise ConfigError(f"{v} is not set: with {SLURM_TASK_FLAG}=1, dist/train.py runs as one srun task "
                              f"of slurm/pretrain.sh or slurm/finetune.sh")
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    local = str(tasks_on_node(spec, int(environ["SLURM_NODEID"])))
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"], "LOCAL_WORLD_SIZE": local, "LOCAL_SIZE": local,
            "GROUP_RANK": environ["SLURM_NODEID"]}


def prepare_process_env() -> None:
    """Environment that must be set before DeepSpeed is imported.

    * ``DS_ACCELERATOR=cpu`` when there is no CUDA device (DeepSpeed then uses gloo),
    * ``TORCH_EXTENSIONS_DIR`` under ``$MMM4REC_CACHE`` (default ``<repo>/.cache``), where
      any op DeepSpeed JIT-builds is cached (none by default: the CPU shared-memory comm
      op is skipped, see :func:`_skip_deepspeed_shm_op`),
    * an srun task of slurm/common.sh (``MMM4REC_SLURM_TASK=1``) gets its env:// variables
      from its SLURM_* ones (:func:`slurm_task_env`),
    * a single-process run gets ``RANK=0 WORLD_SIZE=1`` and a free local port,
    * CPU threads: ``OMP_NUM_THREADS`` if set, else the cores split between the
      processes of this node,
    * on CPU with ``MMM4REC_RETAIN_FREED_MEMORY=1``, freed memory kept for reuse
      (:func:`mmm4rec.cpu_memory.retain_freed_memory`: faster steps, higher peak memory).
    """
    import warnings

    import torch

    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 marks deprecated, once per
    # call site and rank: noise in every log, nothing a user can act on.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    # an srun task's rank is its SLURM_PROCID, whatever RANK/WORLD_SIZE the submitting shell exported
    if os.environ.get(SLURM_TASK_FLAG) == "1":
        task = slurm_task_env(os.environ)
        os.environ.update(task)
        _log.info(f"task rank {task['RANK']}/{task['WORLD_SIZE']} on host {platform.node()} (node index "
                  f"{task['GROUP_RANK']}, local rank {task['LOCAL_RANK']}/{task['LOCAL_WORLD_SIZE']})",
                  extra={"all_ranks": True})
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cuda = torch.cuda.is_available()
    process_env(os.environ, local_world, cuda)   # the one policy (dist/cli.py)
    if not cuda:
        os.environ.setdefault("LOCAL_SIZE", str(local_world))   # DeepSpeed's CPU accelerator counts devices by it
    threads = os.environ.get("OMP_NUM_THREADS") or (os.cpu_count() or 1) // max(local_world, 1)
    torch.set_num_threads(max(1, int(threads)))
    if not cuda:   # opt-in: activations from reused heap memory, not fresh pages each step
        retain_freed_memory_if_asked()


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def barrier(self) -> None:
        import torch.distributed as tdist

        tdist.barrier()

    def all_reduce_sum(self, t):
        """In-place sum over ranks (gloo on CPU, NCCL on the device), returns ``t``."""
        import torch.distributed as tdist

        if self.world_size > 1:
            if self.backend == "nccl" and t.device.type != "cuda":
                moved = t.to(self.device)
                tdist.all_reduce(moved)
                t.copy_(moved.cpu())
            else:
                tdist.all_reduce(t)
        return t

    def broadcast_object(self, obj, src: int = 0):
        import torch.distributed as tdist

        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        import torch.distributed as tdist

        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from loading its shared-memory all-reduce op.

    The op serves only ``inference_all_reduce`` (tensor-parallel inference), which
    training never calls; every collective here goes through gloo either way. Loading it
    costs 60-95 s of g++ on a machine's first start, and each rank maps a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` segment that
    DeepSpeed 0.19 never unlinks: RAM-backed memory lost per launch until reboot (this
    project's test machine filled 20 GB of its 24 GB that way before we noticed). Marking
    the op incompatible is the switch DeepSpeed itself reads (``build_shm_op``)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> DistEnv:
    """Initialise the default process group through DeepSpeed (env:// rendezvous)."""
    import deepspeed
    import torch
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not tdist.is_initialized():
        if backend == "gloo":
            _skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   rank=rank, world_size=world)
    return DistEnv(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank, device=device)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; every rank gets its own stream (``seed + rank``),
    so dropout masks differ between ranks as they would between micro-batches."""
    import numpy as np
    import torch

    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def rng_state() -> tuple[dict, dict]:
    """This process's RNG state as (JSON-able dict, tensors dict): no pickle needed."""
    import numpy as np
    import torch

    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, pos, has_gauss, g = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


@contextlib.contextmanager
def rng_isolated():
    """Run a block without touching the caller's torch CPU RNG stream (used around data
    loading: a DataLoader with workers draws its base seed from the global generator,
    which would otherwise shift every later dropout mask after a resume)."""
    import torch

    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def rng_isolated_batches(batches):
    """Iterate ``batches``, each one fetched under :func:`rng_isolated`."""
    it = iter(batches)
    while True:
        with rng_isolated():
            batch = next(it, None)
        if batch is None:
            return
        yield batch
