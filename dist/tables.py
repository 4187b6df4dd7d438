"""The item tables in torchrec: sharded ``EmbeddingCollection``s with fused optimizers.

A model's ``table_specs()`` (``mmm4rec/models/base.py``) names its per-item tables:
frozen ``feature`` tables (text / image vectors, modality masks) and ``trainable``
ones (the per-domain ID term, per-item fusion logits, SASRec's item embeddings).
Here they become at most two ``EmbeddingCollection`` tables, one per kind, with the
specs packed side by side as columns (every spec is indexed by the same item id,
so one lookup, and one all-to-all, serves all of them; the packed width is padded
to a multiple of 4 for fbgemm):

* ``features``: frozen. Its output is detached, so backward never reaches it; its
  fused optimizer is plain SGD with lr 0 (stateless: no optimizer memory).
* ``trainable``: updated once per optimizer step from the gradient accumulated over
  the step's micro-batches (``step()``): by fbgemm's fused row-wise optimizer
  (``tables.optimizer``: adagrad, rowwise_adagrad, sgd, adam), fed through one extra
  backward of the accumulated rows, or by the model's optimizer over the whole table
  (``dense``: the release's treatment of the ID term, for tables that fit every rank).

Both are built on the meta device, planned row-wise (or table-wise) with a
``Topology`` of the job and ``collective_plan``, and wrapped ALONE in torchrec's
``DistributedModelParallel``; the dense model goes to DeepSpeed (``dist/engine.py``).

Boundary with DeepSpeed (the contract ``dist/model.py`` relies on):

* lookups return plain tensors ``{spec name: [..., dim]}``: the dense engine never
  sees torchrec types;
* gradients of looked-up trainable rows are *averaged* over ranks, like DeepSpeed's
  dense gradients: torchrec's all-to-all backward divides by the world size
  (``torchrec.distributed.comm_ops`` gradient division, asserted on here), so both
  sides follow the gradient of the same global loss and 1 and N processes agree;
* ``engine.backward(loss)`` only accumulates the row gradients (DeepSpeed's loss
  scaling for gradient accumulation applies to them too); ``tables.step()`` and the
  dense optimizer both step at accumulation boundaries (``DistRecModel.step``).

Initialisation and checkpoints are by *global row*: every row's initial value is a
function of (seed, table, row), and checkpoints store each rank's row ranges with
their offsets, so a checkpoint loads into any number of processes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from mmm4rec.models.base import TableSpec

from .config import TablesConfig

__all__ = ["PackedTable", "pack_specs", "ShardedItemTables", "init_rows"]

_ALIGN = 4          # fbgemm wants embedding dims in multiples of 4
_INIT_BLOCK = 65536  # rows per independently seeded init block
FEATURE = "feature"
TRAINABLE = "trainable"
_TABLE_NAMES = {FEATURE: "features", TRAINABLE: "trainable"}


@dataclasses.dataclass(frozen=True)
class Column:
    spec: TableSpec
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.spec.dim


@dataclasses.dataclass(frozen=True)
class PackedTable:
    """One torchrec table holding several specs of one kind as column blocks."""

    name: str
    kind: str
    num_rows: int
    dim: int
    columns: tuple[Column, ...]

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "num_rows": self.num_rows, "dim": self.dim,
                "columns": [[c.spec.name, c.start, c.spec.dim, c.spec.init] for c in self.columns]}


def pack_specs(specs: Iterable[TableSpec]) -> list[PackedTable]:
    specs = list(specs)
    if len({s.num_rows for s in specs}) > 1:
        raise ValueError(f"table specs disagree on the number of rows: { {s.name: s.num_rows for s in specs} }")
    out = []
    for kind in (FEATURE, TRAINABLE):
        cols, start = [], 0
        for s in specs:
            if s.kind == kind and s.dim > 0:
                cols.append(Column(s, start))
                start += s.dim
        if cols:
            dim = -(-start // _ALIGN) * _ALIGN
            out.append(PackedTable(_TABLE_NAMES[kind], kind, specs[0].num_rows, dim, tuple(cols)))
    return out


def init_rows(spec: TableSpec, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Initial values of rows ``lo..hi-1`` of a trainable spec: the same for any sharding."""
    if spec.init == "zeros":
        return torch.zeros(hi - lo, spec.dim)
    out = torch.empty(hi - lo, spec.dim)
    name_key = int.from_bytes(spec.name.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 31)
    for block in range(lo // _INIT_BLOCK, (hi - 1) // _INIT_BLOCK + 1):
        b_lo, b_hi = block * _INIT_BLOCK, min((block + 1) * _INIT_BLOCK, spec.num_rows)
        g = torch.Generator().manual_seed((seed * 1_000_003 + name_key * 7919 + block) % (2 ** 63))
        vals = torch.empty(b_hi - b_lo, spec.dim).normal_(0.0, 0.02, generator=g)
        a, b = max(lo, b_lo), min(hi, b_hi)
        out[a - lo:b - lo] = vals[a - b_lo:b - b_lo]
    return out


class _TablesRoot(nn.Module):
    """What DistributedModelParallel wraps: one EmbeddingCollection per packed table."""

    def __init__(self, packed: list[PackedTable], device: torch.device, feature_dtype: str = "fp32"):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.types import DataType

        def dtype(t: PackedTable):
            return DataType.FP16 if t.kind == FEATURE and feature_dtype == "fp16" else DataType.FP32

        self.collections = nn.ModuleDict({
            t.name: EmbeddingCollection(
                tables=[EmbeddingConfig(num_embeddings=t.num_rows, embedding_dim=t.dim, name=t.name,
                                        feature_names=[f"{t.name}.item"], data_type=dtype(t))],
                device=device)
            for t in packed})

    def forward(self, kjts: dict) -> dict:
        return {name: ec(kjts[name]) for name, ec in self.collections.items()}


def _fused_optimizer(cfg: TablesConfig, device: torch.device):
    """(optimizer class, kwargs) for ``apply_optimizer_in_backward`` of the trainable table."""
    import torchrec.optim as trec_optim
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    if cfg.optimizer == "adam" and device.type != "cuda":
        raise ValueError("tables.optimizer: adam runs only on GPU (fbgemm's CPU kernels implement adagrad, "
                         "rowwise_adagrad and sgd); choose one of those on CPU")
    # torchrec's wrappers: the fbgemm kernel is chosen from the class, extra kwargs pass through
    cls = {"adagrad": trec_optim.Adagrad, "rowwise_adagrad": trec_optim.RowWiseAdagrad,
           "sgd": trec_optim.SGD, "adam": trec_optim.Adam}[cfg.optimizer]
    kwargs = {"lr": cfg.lr}
    if cfg.optimizer != "sgd":
        kwargs["eps"] = cfg.eps
    if cfg.weight_decay > 0:
        kwargs["weight_decay"] = cfg.weight_decay
        kwargs["weight_decay_mode"] = WeightDecayMode.DECOUPLE if cfg.optimizer == "adam" else WeightDecayMode.L2
    return cls, kwargs


class ShardedItemTables:
    """The item tables of one model, sharded over the job (``env``).

    ``lookup(ids)`` -> ``{spec name: rows [*ids.shape, dim]}`` (feature rows detached;
    trainable rows are leaves whose gradients accumulate until ``step()``).
    """

    def __init__(self, specs: list[TableSpec], cfg: TablesConfig, env, seed: int, dense_optimizer=None):
        import torch.distributed as tdist
        from torchrec.distributed import DistributedModelParallel, comm_ops
        from torchrec.distributed.types import ShardingEnv

        if not comm_ops.get_gradient_division():
            raise RuntimeError("torchrec gradient division is off (comm_ops.set_gradient_division(False)): table "
                               "gradients would be summed over ranks while DeepSpeed averages the dense ones")
        self.env = env
        self.cfg = cfg
        self.dense_optimizer_cfg = dense_optimizer   # train.optimizer (tables.optimizer: dense)
        if cfg.optimizer == "dense" and dense_optimizer is None:
            raise ValueError("tables.optimizer: dense needs the model's optimizer settings (train.optimizer)")
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # accumulated row gradients
        self.seed = int(seed)
        self.specs = list(specs)
        self.packed = pack_specs(self.specs)
        self.device = env.device
        root, sharders, planner = table_planner(self.packed, cfg, env)
        pg = tdist.GroupMember.WORLD
        plan = run_planner(lambda: planner.collective_plan(root, sharders, pg), cfg)
        self.dmp = DistributedModelParallel(root, env=ShardingEnv.from_process_group(pg), plan=plan,
                                            sharders=sharders, device=self.device)
        self.plan = plan
        self._init_trainable()
        # a model without a trainable item table (no ID term, static fusion) has nothing to step
        has_trainable = any(t.kind == TRAINABLE for t in self.packed)
        self._dense_opt = self._build_dense_optimizer() if cfg.optimizer == "dense" and has_trainable else None

    # ------------------------------------------------------------------ shards
    def _weights(self) -> dict[str, object]:
        """table name -> its ShardedTensor (from the module's state dict)."""
        sd = self.dmp.state_dict()
        out = {}
        for t in self.packed:
            key = next(k for k in sd if k.endswith(f"collections.{t.name}.embeddings.{t.name}.weight"))
            out[t.name] = sd[key]
        return out

    def local_shards(self, table: str) -> list[tuple[int, torch.Tensor]]:
        """``[(first global row, tensor [rows, dim])]`` of this rank (views: writes go to the
        table; the fused optimizers update them in place, so they are looked up once)."""
        cache = self.__dict__.setdefault("_local_shards", {})
        if table not in cache:
            st = self._weights()[table]
            cache[table] = [(int(s.metadata.shard_offsets[0]), s.tensor) for s in st.local_shards()]
        return cache[table]

    def _optimizer_states(self) -> dict[str, dict[str, object]]:
        """table name -> {state name: ShardedTensor} of the fused optimizer (views)."""
        osd = self.dmp.fused_optimizer.state_dict()["state"]
        out = {}
        for t in self.packed:
            key = next((k for k in osd if k.endswith(f"collections.{t.name}.embeddings.{t.name}.weight")), None)
            out[t.name] = dict(osd[key]) if key is not None else {}
        return out

    @torch.no_grad()
    def _init_trainable(self) -> None:
        for t in self.packed:
            for lo, w in self.local_shards(t.name):
                w.zero_()
                if t.kind != TRAINABLE:
                    continue
                for c in t.columns:
                    w[:, c.start:c.stop] = init_rows(c.spec, lo, lo + w.shape[0], self.seed).to(w)

    def feature_rows(self) -> tuple[int, int]:
        """``(lo, hi)``: the global rows of the frozen feature table this rank holds (its
        shards' span; ``(0, 0)`` when it holds none): what it reads at start-up."""
        spans = [(lo, lo + w.shape[0]) for t in self.packed if t.kind == FEATURE
                 for lo, w in self.local_shards(t.name) if w.shape[0]]
        if not spans:
            return 0, 0
        return min(a for a, _ in spans), max(b for _, b in spans)

    @torch.no_grad()
    def load_features(self, features: dict[str, np.ndarray], row_offset: int = 0) -> None:
        """Fill the frozen columns from ``{spec name: rows [n, dim]}`` (numpy or torch),
        the global rows ``row_offset .. row_offset + n - 1``; each rank copies the rows
        it owns among them (so a rank may load its :meth:`feature_rows` block by block)."""
        for t in self.packed:
            if t.kind != FEATURE:
                continue
            for c in t.columns:
                if c.spec.name not in features:
                    raise ValueError(f"item tables: no '{c.spec.name}' features given (have {sorted(features)})")
                src = features[c.spec.name]
                n = src.shape[0]
                if src.ndim != 2 or src.shape[1] != c.spec.dim or row_offset + n > c.spec.num_rows:
                    raise ValueError(f"item table '{c.spec.name}': expected rows of shape (n, {c.spec.dim}) within "
                                     f"0..{c.spec.num_rows - 1} (num_items + 1 rows), got {tuple(src.shape)} "
                                     f"from row {row_offset}")
                for lo, w in self.local_shards(t.name):
                    a, b = max(lo, row_offset), min(lo + w.shape[0], row_offset + n)   # rows in both
                    if a >= b:
                        continue
                    # copied in its own type (no float32 copy of an fp16 block: start-up memory)
                    rows = torch.as_tensor(np.asarray(src[a - row_offset:b - row_offset]))
                    w[a - lo:b - lo, c.start:c.stop].copy_(rows)

    # ------------------------------------------------------------------ this rank's items
    def local_range(self) -> tuple[int, int] | None:
        """``(lo, hi)``: the item rows whose every table this rank holds (row-wise sharding:
        one shard per table, the same rows), or None when the tables are split otherwise
        (table-wise: then :meth:`rows_of_range` looks the rows up)."""
        spans = set()
        for t in self.packed:
            shards = self.local_shards(t.name)
            if len(shards) > 1:
                return None
            spans.add((shards[0][0], shards[0][0] + shards[0][1].shape[0]) if shards else None)
        if len(spans) != 1:
            return None
        span = spans.pop()
        return span if span is not None else (self.packed[0].num_rows, self.packed[0].num_rows)

    def rows_of_range(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """``{spec name: rows [hi - lo, dim]}`` of items ``lo .. hi - 1``: read from this
        rank's own shards when it holds them (no communication), else looked up (then
        collective: every rank calls it once). Trainable rows are leaves whose gradient
        is accumulated until :meth:`step`, as with :meth:`lookup`."""
        own = self.local_range()
        if own is None or not (own[0] <= lo and hi <= own[1]):
            return self.lookup(torch.arange(lo, hi, device=self.device))
        ids = torch.arange(lo, hi, device=self.device)
        rows: dict[str, torch.Tensor] = {}
        for t in self.packed:
            shards = self.local_shards(t.name)
            w = shards[0][1] if shards else torch.zeros(0, t.dim, device=self.device)
            v = w[lo - own[0]:hi - own[0]].detach().to(torch.float32)
            if t.kind == TRAINABLE and torch.is_grad_enabled():
                v = v.clone().requires_grad_(True)
                v.register_hook(lambda g, name=t.name, ids=ids: self._accumulate(name, ids, g))
            for c in t.columns:
                rows[c.spec.name] = v[:, c.start:c.stop]
        return rows

    # ------------------------------------------------------------------ lookup
    def _raw_lookup(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """table name -> looked-up rows [len(flat), dim] (collective: every rank calls it)."""
        from torchrec import KeyedJaggedTensor

        lengths = torch.ones(flat.numel(), dtype=torch.int32, device=self.device)
        kjts = {t.name: KeyedJaggedTensor.from_lengths_sync(keys=[f"{t.name}.item"], values=flat, lengths=lengths)
                for t in self.packed}
        out = self.dmp(kjts)
        return {t.name: out[t.name][f"{t.name}.item"].values() for t in self.packed}

    def lookup(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of ``ids``. Trainable rows come out as leaves whose gradient is
        accumulated (per unique id) until :meth:`step`, never applied in backward."""
        shape = tuple(ids.shape)
        flat = ids.reshape(-1).to(self.device, torch.int64)
        out = self._raw_lookup(flat)
        rows: dict[str, torch.Tensor] = {}
        for t in self.packed:
            v = out[t.name].detach().to(torch.float32)   # (an fp16 feature table computes in fp32)
            if t.kind == TRAINABLE and torch.is_grad_enabled():
                v = v.requires_grad_(True)
                v.register_hook(lambda g, name=t.name, ids=flat: self._accumulate(name, ids, g))
            for c in t.columns:
                rows[c.spec.name] = v[:, c.start:c.stop].reshape(*shape, c.spec.dim)
        return rows

    # ------------------------------------------------------------------ accumulation
    def _accumulate(self, name: str, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one backward's row gradients to the step's sum, one row per unique id."""
        grad = grad.detach().to(torch.float32)
        if name in self._pending:
            prev_ids, prev_g = self._pending[name]
            ids, grad = torch.cat([prev_ids, ids]), torch.cat([prev_g, grad])
        uniq, inv = torch.unique(ids, return_inverse=True)
        self._pending[name] = (uniq, torch.zeros(len(uniq), grad.shape[1], dtype=grad.dtype,
                                                 device=grad.device).index_add_(0, inv, grad))

    def step(self) -> None:
        """Apply the gradient accumulated since the last step to the trainable rows, once
        (collective: every rank calls it at every optimizer step)."""
        if not self.has_trainable:
            return
        if self._dense_opt is not None:
            self._dense_step()
        else:
            self._fused_step()
        self._pending.clear()

    def _pending_of(self, t: PackedTable) -> tuple[torch.Tensor, torch.Tensor]:
        if t.name in self._pending:
            return self._pending[t.name]
        # nothing looked up with a gradient on this rank: a zero gradient of row 0 keeps
        # the collective lookup of _fused_step aligned over ranks
        return (torch.zeros(1, dtype=torch.int64, device=self.device),
                torch.zeros(1, t.dim, device=self.device))

    def _fused_step(self) -> None:
        """One backward of sum(rows * accumulated grad) through the table: the fused fbgemm
        optimizer sees the step's gradient once (torchrec's all-to-all backward averages it
        over ranks, as DeepSpeed averages the dense gradients)."""
        t = next(t for t in self.packed if t.kind == TRAINABLE)
        ids, g = self._pending_of(t)
        with torch.enable_grad():
            rows = self._raw_lookup(ids)[t.name]
            (rows * g.to(rows.dtype)).sum().backward()

    def _build_dense_optimizer(self):
        """The model's optimizer over this rank's shards of the trainable table."""
        from .engine import build_optimizer

        t = next(t for t in self.packed if t.kind == TRAINABLE)
        self._dense_params = [(lo, torch.nn.Parameter(w, requires_grad=True)) for lo, w in self.local_shards(t.name)]
        return build_optimizer([p for _, p in self._dense_params], self.dense_optimizer_cfg)

    @torch.no_grad()
    def _dense_step(self) -> None:
        """The model's optimizer on the whole table: the accumulated row gradients as a
        dense [rows, dim] matrix, averaged over ranks, stepped on every rank's own rows."""
        t = next(t for t in self.packed if t.kind == TRAINABLE)
        full = torch.zeros(t.num_rows, t.dim, device=self.device)
        if t.name in self._pending:
            ids, g = self._pending[t.name]
            full.index_add_(0, ids, g.to(full.dtype))
        self.env.all_reduce_sum(full)
        full /= self.env.world_size
        for lo, p in self._dense_params:
            p.grad = full[lo:lo + p.shape[0]].clone()
        self._dense_opt.step()
        for _, p in self._dense_params:
            p.grad = None

    @property
    def base_lr(self) -> float:
        """The trainable rows' LR before the schedule's multiplier."""
        return self.dense_optimizer_cfg.lr if self._dense_opt is not None else self.cfg.lr

    # ------------------------------------------------------------------ LR
    def set_lr(self, lr: float) -> None:
        """Set the LR of the trainable rows' optimizer (applied from the next step)."""
        if self._dense_opt is not None:
            for g in self._dense_opt.param_groups:
                g["lr"] = lr
            return
        for key, opt in self.dmp.fused_optimizer.optimizers:
            if key.endswith(f"collections.{_TABLE_NAMES[TRAINABLE]}"):
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()   # torchrec's fused optimizers only push the LR into the kernels here

    @property
    def has_trainable(self) -> bool:
        return any(t.kind == TRAINABLE for t in self.packed)

    # ------------------------------------------------------------------ checkpoint
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's rows (+ fused optimizer state of the trainable table) for a
        checkpoint: ``({key: tensor}, meta)``; keys are ``<table>/<state>@<first row>``."""
        tensors, shards = {}, []
        for t in self.packed:
            if t.kind != TRAINABLE:
                continue   # frozen features are re-read from the data, not checkpointed
            for lo, w in self.local_shards(t.name):
                tensors[f"{t.name}/weight@{lo}"] = w.detach().cpu().contiguous()
                shards.append([t.name, "weight", lo, int(w.shape[0])])
            for state_name, st in self._optimizer_states()[t.name].items():
                if not hasattr(st, "local_shards"):
                    continue
                for s in st.local_shards():
                    lo = int(s.metadata.shard_offsets[0])
                    tensors[f"{t.name}/{state_name}@{lo}"] = s.tensor.detach().cpu().contiguous()
                    shards.append([t.name, state_name, lo, int(s.tensor.shape[0])])
        meta = {"packed": [t.describe() for t in self.packed], "shards": shards,
                "optimizer": self.cfg.optimizer, "world_size": self.env.world_size}
        if self._dense_opt is not None:
            meta["dense_scalars"] = self._dense_state_tensors(tensors, shards)
        return tensors, meta

    def _dense_state_tensors(self, tensors: dict, shards: list) -> dict:
        """Add the dense optimizer's per-row states (``dense_<name>``) of this rank's shards;
        returns its scalar states (step counts, the same for every shard)."""
        t = next(t for t in self.packed if t.kind == TRAINABLE)
        scalars = {}
        for lo, p in self._dense_params:
            for k, v in self._dense_opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() and v.shape[0] == p.shape[0]:
                    tensors[f"{t.name}/dense_{k}@{lo}"] = v.detach().cpu().contiguous()
                    shards.append([t.name, f"dense_{k}", lo, int(p.shape[0])])
                else:
                    scalars[k] = float(v)
        return scalars

    @torch.no_grad()
    def _load_dense_state(self, reader: ShardReader) -> None:
        t = next(t for t in self.packed if t.kind == TRAINABLE)
        scalars = reader.metas[0].get("dense_scalars", {}) if reader.metas else {}
        names = sorted({s for table, s, *_ in reader._index if table == t.name and s.startswith("dense_")})
        for lo, p in self._dense_params:
            state = {k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()}
            for name in names:
                state[name[len("dense_"):]] = reader.rows(t.name, name, lo, lo + p.shape[0]).to(p).clone()
            if state:
                self._dense_opt.state[p] = state

    @torch.no_grad()
    def load_state(self, reader: ShardReader, load_optimizer: bool = True) -> None:
        """Load rows (and optimizer state) saved by any number of processes."""
        want = [t.describe() for t in self.packed if t.kind == TRAINABLE]
        have = [p for p in reader.packed if p["kind"] == TRAINABLE]
        if want != have:
            raise ValueError(f"checkpoint item tables {have} do not match the model's {want}")
        for t in self.packed:
            if t.kind != TRAINABLE:
                continue
            for lo, w in self.local_shards(t.name):
                w.copy_(reader.rows(t.name, "weight", lo, lo + w.shape[0]).to(w))
            if not load_optimizer:
                continue
            if reader.optimizer != self.cfg.optimizer:
                raise ValueError(f"checkpoint tables were trained with {reader.optimizer}, the config says "
                                 f"{self.cfg.optimizer}; cannot resume the optimizer state")
            if self._dense_opt is not None:
                self._load_dense_state(reader)
                continue
            for state_name, st in self._optimizer_states()[t.name].items():
                if not hasattr(st, "local_shards"):
                    continue
                for s in st.local_shards():
                    lo = int(s.metadata.shard_offsets[0])
                    s.tensor.copy_(reader.rows(t.name, state_name, lo, lo + s.tensor.shape[0]).to(s.tensor))


class ShardReader:
    """Reads row ranges of a checkpoint's tables from the per-rank safetensors files
    (any writer world size): ``rows(table, state, lo, hi)``."""

    def __init__(self, files: list[str], metas: list[dict]):
        self.files = files
        self.metas = metas
        self.packed = metas[0]["packed"] if metas else []
        self.optimizer = metas[0].get("optimizer") if metas else None
        self._index = []   # (table, state, lo, n, file)
        for f, m in zip(files, metas, strict=True):
            for table, state, lo, n in m["shards"]:
                self._index.append((table, state, int(lo), int(n), f))

    def rows(self, table: str, state: str, lo: int, hi: int) -> torch.Tensor:
        from safetensors import safe_open

        parts = []
        covered = 0
        for t, s, a, n, f in sorted(self._index, key=lambda x: x[2]):
            if t != table or s != state or a + n <= lo or a >= hi:
                continue
            with safe_open(f, framework="pt") as fh:
                sl = fh.get_slice(f"{table}/{state}@{a}")
                x, y = max(lo, a), min(hi, a + n)
                parts.append(sl[x - a:y - a])
                covered += y - x
        if covered != hi - lo:
            raise ValueError(f"checkpoint holds {covered} of rows {lo}..{hi - 1} of {table}/{state}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def full(self, table: str, state: str = "weight") -> torch.Tensor:
        n = next(p["num_rows"] for p in self.packed if p["name"] == table)
        return self.rows(table, state, 0, n)


def table_planner(packed: list[PackedTable], cfg: TablesConfig, env):
    """``(root on the meta device with the fused optimizers attached, sharders, planner)``
    for ``env`` (anything with ``world_size`` and ``device``): what training shards, and
    what ``--dry-run`` plans without a process group (``planner.plan(root, sharders)``)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
    )
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.apply_optimizer_in_backward import (
        apply_optimizer_in_backward,
    )

    root = _TablesRoot(packed, torch.device("meta"), cfg.feature_dtype)
    for t in packed:
        params = root.collections[t.name].parameters()
        if t.kind == FEATURE or cfg.optimizer == "dense":   # frozen, or updated by _dense_step
            apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": 0.0})
        else:
            cls, kwargs = _fused_optimizer(cfg, env.device)
            apply_optimizer_in_backward(cls, params, kwargs)
    sharding = ShardingType.ROW_WISE.value if cfg.sharding == "row_wise" else ShardingType.TABLE_WISE.value
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding]) for t in packed}
    planner = EmbeddingShardingPlanner(topology=_topology(env, cfg.memory_per_rank_gb), constraints=constraints)
    return root, [EmbeddingCollectionSharder()], planner


def run_planner(plan_fn, cfg: TablesConfig):
    """``plan_fn()`` (torchrec's planner); a plan that does not fit the memory given
    (``tables.memory_per_rank_gb``) is a ConfigError naming the setting."""
    from torchrec.distributed.planner.types import PlannerError

    from mmm4rec.config import ConfigError

    try:
        return plan_fn()
    except PlannerError as e:
        first = " ".join(str(e).split())[:400]
        raise ConfigError(f"tables: torchrec's planner finds no plan for the item tables within "
                          f"memory_per_rank_gb={cfg.memory_per_rank_gb:g} per rank ({first}); give the tables "
                          f"more memory, more processes, or feature_dtype: fp16") from None


def _topology(env, memory_gb: float = 0.0):
    import os

    from torchrec.distributed.planner.types import (
        HardwareConfig,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or env.world_size)
    cuda = env.device.type == "cuda"
    hardware = None
    if memory_gb:   # the memory each rank may give the tables: the planner fails early if a plan does not fit
        cap = int(memory_gb * 2 ** 30)
        hardware = HardwareConfig(hbm_cap_bytes=cap) if cuda else HardwareConfig(ddr_cap_bytes=cap)
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=env.world_size, local_world_size=min(local, env.world_size)),
        hardware_config=hardware, kernel_config=KernelConfig(compute_device="cuda" if cuda else "cpu"))
