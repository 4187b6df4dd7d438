"""Catalog-scale scoring: the item catalog split over processes, never gathered.

Each process holds the item vectors of one contiguous range of global item ids
(``V_local`` = rows ``offset .. offset + n_local - 1``; a range may be empty) and its
own users (``u`` [b, N]; the ranks' batch sizes may differ). Three operations:

* :func:`vocab_parallel_ce` -- the full softmax over all items, completed across the
  processes: the users' vectors are all-gathered (small: [sum b, N]), each process
  scores them against its own items only (chunk by chunk, never [b, |I|]), and the
  log-partition is assembled from an all-reduce of the running max and of the sum of
  exponentials; the target logit comes from the process that owns the target.
  Backward recomputes the local logits chunk by chunk: the gradient of the local items
  stays local, the users' gradient is summed over the processes. The loss of a process
  is a function of every process's items, so its gradient is that of the *sum* of all
  processes' losses (what data-parallel training averages). One process = the plain
  full softmax (``mmm4rec.losses.full_softmax_ce``), to float rounding.
* :func:`sampled_softmax_ce` -- softmax over the positive and sampled candidates (the
  batch's targets, optionally gathered across processes, and/or negatives drawn
  uniformly or by popularity) with the log-Q correction and accidental hits masked.
* :func:`sharded_target_ranks` / :func:`sharded_topk` -- full-ranking evaluation: the
  rank of a target is the sum over processes of the items scored strictly higher (the
  ties rule of ``mmm4rec.metrics.target_ranks``), top-K lists are merged across processes.

``group=None`` is the default process group when one is initialised, else a world of one.
"""
from __future__ import annotations

import torch

__all__ = ["even_ranges", "vocab_parallel_ce", "sampled_softmax_ce", "sharded_target_ranks", "sharded_topk",
           "local_topk", "NegativeSampler", "gather_rows"]


# ---------------------------------------------------------------------- process group
def _world(group=None) -> tuple[int, int]:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return 0, 1
    return tdist.get_rank(group), tdist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    import torch.distributed as tdist

    if _world(group)[1] > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM, group=group)
    return t


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``x`` [b_r, ...] of every process in rank order (no autograd):
    ``(x_all [sum b_r, ...], [b_0, b_1, ...])``; batch sizes may differ."""
    import torch.distributed as tdist

    _, ws = _world(group)
    if ws == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    tdist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((top, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(ws)]
    tdist.all_gather(parts, torch.cat([x, pad]).contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), sizes


class _GatherRows(torch.autograd.Function):
    """``gather_rows`` with a gradient: each process gets the sum over processes of the
    gradients of its rows (the gradient of the sum of all processes' losses)."""

    @staticmethod
    def forward(ctx, x, group):
        out, sizes = gather_rows(x, group)
        ctx.meta = (group, sizes)
        return out

    @staticmethod
    def backward(ctx, grad):
        group, sizes = ctx.meta
        rank, _ = _world(group)
        grad = _all_reduce(grad.contiguous().clone(), "sum", group)
        start = sum(sizes[:rank])
        return grad[start:start + sizes[rank]], None


def even_ranges(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` per rank: torchrec's row-wise split (blocks of ceil(rows / world),
    the last ones shorter or empty), the layout of the item tables' shards."""
    block = -(-num_rows // world_size)
    return [(min(r * block, num_rows), min((r + 1) * block, num_rows)) for r in range(world_size)]


def _chunks(n: int, chunk: int | None):
    step = n if not chunk or chunk >= n else chunk
    return [(lo, min(n, lo + step)) for lo in range(0, max(n, 1), max(step, 1)) if lo < n]


def _local_logits(u, V, lo, hi, offset, mask_below: int):
    """u @ V[lo:hi].T with global items < ``mask_below`` at -inf (item 0, the padding)."""
    s = u @ V[lo:hi].T
    cut = mask_below - (offset + lo)
    if cut > 0:
        s[:, :cut] = float("-inf")
    return s


# ---------------------------------------------------------------------- full softmax
class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, V, offset, target, valid, exclude_padding, chunk, group):
        rank, _ = _world(group)
        u_all, sizes = gather_rows(u.detach(), group)
        t_all, _ = gather_rows(target, group)
        ok_all, _ = gather_rows(valid.to(torch.uint8), group)
        ok_all = ok_all.bool()
        V = V.detach()
        n, B = V.shape[0], u_all.shape[0]
        mask_below = 1 if exclude_padding else 0
        inside = (t_all >= offset) & (t_all < offset + n)
        # pass 1: running max and the target logit (owner only)
        m = torch.full((B,), float("-inf"), dtype=u_all.dtype, device=u_all.device)
        tgt = torch.zeros(B, dtype=u_all.dtype, device=u_all.device)
        for lo, hi in _chunks(n, chunk):
            s = _local_logits(u_all, V, lo, hi, offset, mask_below)
            m = torch.maximum(m, s.max(dim=1).values)
            here = inside & (t_all >= offset + lo) & (t_all < offset + hi)
            if here.any():
                tgt[here] = s[here].gather(1, (t_all[here] - offset - lo)[:, None])[:, 0]
        m = _all_reduce(m, "max", group)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        # pass 2: sum of exponentials against the global max
        z = torch.zeros(B, dtype=u_all.dtype, device=u_all.device)
        for lo, hi in _chunks(n, chunk):
            s = _local_logits(u_all, V, lo, hi, offset, mask_below)
            z += torch.exp(s - m_safe[:, None]).sum(dim=1)
        z = _all_reduce(z, "sum", group)
        tgt = _all_reduce(tgt, "sum", group)
        lse = m_safe + torch.log(z)
        ce = torch.where(ok_all, lse - tgt, torch.zeros_like(lse))
        start = sum(sizes[:rank])
        ctx.save_for_backward(u_all, V, t_all, ok_all, lse)
        ctx.meta = (offset, mask_below, chunk, group, sizes, start)
        return ce[start:start + u.shape[0]]

    @staticmethod
    def backward(ctx, grad_ce):
        u_all, V, t_all, ok_all, lse = ctx.saved_tensors
        offset, mask_below, chunk, group, sizes, start = ctx.meta
        g_all, _ = gather_rows(grad_ce.contiguous(), group)
        g_all = torch.where(ok_all, g_all, torch.zeros_like(g_all)).to(u_all.dtype)
        n = V.shape[0]
        grad_u = torch.zeros_like(u_all)
        grad_V = torch.zeros_like(V)
        rows = torch.arange(u_all.shape[0], device=u_all.device)
        for lo, hi in _chunks(n, chunk):
            s = _local_logits(u_all, V, lo, hi, offset, mask_below)
            gs = torch.exp(s - lse[:, None]) * g_all[:, None]
            here = ok_all & (t_all >= offset + lo) & (t_all < offset + hi)
            gs[rows[here], t_all[here] - offset - lo] -= g_all[here]
            grad_V[lo:hi] = gs.T @ u_all
            grad_u += gs @ V[lo:hi]
        grad_u = _all_reduce(grad_u, "sum", group)
        return grad_u[start:start + sizes[_world(group)[0]]], grad_V, None, None, None, None, None, None


def vocab_parallel_ce(u: torch.Tensor, V_local: torch.Tensor, offset: int, target: torch.Tensor,
                      weight: torch.Tensor | None = None, *, exclude_padding: bool = True,
                      chunk_size: int | None = None, group=None) -> torch.Tensor:
    """Per-row cross-entropy [b] of this process's users over ALL items, the catalog
    split over the processes (``V_local`` = items ``offset .. offset + n - 1``).

    Collective: every process calls it (and its backward) with its own users and
    item range; the ranges must tile ``0 .. |I|`` in rank order. Rows with
    ``weight <= 0`` (padding) get loss 0 and no gradient. ``exclude_padding`` leaves
    item 0 out of the softmax; ``chunk_size`` bounds the local logits to
    [sum b, chunk_size] in forward and backward (recomputed, never stored).
    """
    valid = torch.ones_like(target, dtype=torch.bool) if weight is None else weight > 0
    # the softmax is always computed in fp32 (under bf16/fp16 autocast too); autograd casts
    # the gradients back to the inputs' dtypes
    with torch.autocast(device_type=u.device.type, enabled=False):
        return _VocabParallelCE.apply(u.float(), V_local.float(), int(offset), target, valid,
                                      bool(exclude_padding), chunk_size, group)


# ---------------------------------------------------------------------- sampled softmax
class NegativeSampler:
    """Draws negative item ids (1..num_items) uniformly or by popularity, with the
    log of each id's expected count among ``k`` draws (the log-Q correction).

    ``counts`` [num_items + 1] (index = item id, row 0 ignored): popularity sampling
    with probability ``counts[i] ** alpha / sum``; None: uniform. The same ``seed``
    and step give the same draws on every process.
    """

    def __init__(self, num_items: int, counts: torch.Tensor | None = None, alpha: float = 1.0, seed: int = 0):
        self.num_items = int(num_items)
        self.generator = torch.Generator().manual_seed(int(seed))   # sample(generator=None): torch's global RNG
        if counts is None:
            self.probs = None
        else:
            c = torch.as_tensor(counts, dtype=torch.float64).clone()
            if c.shape != (self.num_items + 1,):
                raise ValueError(f"NegativeSampler: counts must have num_items + 1 = {self.num_items + 1} "
                                 f"entries, got {tuple(c.shape)}")
            c[0] = 0.0
            c = c.clamp(min=0.0) ** alpha
            if float(c.sum()) <= 0:
                raise ValueError("NegativeSampler: popularity counts are all zero")
            self.probs = c / c.sum()

    def prob(self, ids: torch.Tensor) -> torch.Tensor:
        """Sampling probability of each id (float64)."""
        if self.probs is None:
            return torch.full(ids.shape, 1.0 / self.num_items, dtype=torch.float64, device=ids.device)
        return self.probs.to(ids.device)[ids]

    def sample(self, k: int, generator: torch.Generator | None | str = "own") -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [k] int64, log expected count [k] = log(k q(id)))``, drawn with replacement
        from the sampler's own seeded generator (default) or ``generator`` (None: torch's
        global RNG, which a training checkpoint saves and restores)."""
        gen = self.generator if isinstance(generator, str) else generator
        if self.probs is None:
            ids = torch.randint(1, self.num_items + 1, (k,), generator=gen)
        else:
            ids = torch.multinomial(self.probs, k, replacement=True, generator=gen)
        return ids, torch.log(k * self.prob(ids))


def sampled_softmax_ce(u: torch.Tensor, V_pos: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None, *, inbatch: bool = True,
                       inbatch_log_q: torch.Tensor | None = None, gather: bool = False,
                       neg_ids: torch.Tensor | None = None, V_neg: torch.Tensor | None = None,
                       neg_log_q: torch.Tensor | None = None, mask_hits: bool = True,
                       group=None) -> torch.Tensor:
    """Per-row sampled-softmax cross-entropy [b] with the log-Q correction.

    Row i's candidates: its positive ``target[i]`` (vector ``V_pos[i]``, logit
    uncorrected) and the negatives

    * in-batch (``inbatch``): the other rows' targets of this micro-batch, or of every
      process's micro-batch with ``gather`` (an all-gather that keeps gradients: the
      gradient is that of the sum of all processes' losses); ``inbatch_log_q`` [b] is
      the log of each target's expected count among the in-batch candidates
      (``log(n_rows * p_data(item))``), subtracted from its logit (None: no correction);
    * sampled (``neg_ids`` [k], ``V_neg`` [k, N], ``neg_log_q`` [k] = ``log(k q(id))``,
      from :class:`NegativeSampler`), shared by all rows.

    With several sources, each candidate's log-Q is the log of its expected count over
    all of them (``n_rows * p_data(item) + k * q(item)``): then the sum over the
    negatives' ``exp(logit - log Q)`` estimates
    the full softmax's sum over all other items without bias, so the loss and its
    gradient converge to the full softmax's as the candidates grow.
    ``mask_hits`` (default) removes every candidate whose item is the row's own
    target (accidental hits: a sampled negative, or another row with the same
    target) from that row's softmax. Padding rows (``weight <= 0``) are neither
    positives nor negatives; their loss is 0.
    """
    valid = torch.ones_like(target, dtype=torch.bool) if weight is None else weight > 0
    pos = (u * V_pos).sum(-1)
    cols, ids, corr, ok = [], [], [], []
    if inbatch:
        lq = (inbatch_log_q if inbatch_log_q is not None
              else torch.zeros(target.shape, dtype=u.dtype, device=u.device))
        if gather and _world(group)[1] > 1:
            rank, _ = _world(group)
            V_c = _GatherRows.apply(V_pos, group)
            t_c, sizes = gather_rows(target, group)
            lq_c, _ = gather_rows(lq.to(u.dtype), group)
            ok_c, _ = gather_rows(valid.to(torch.uint8), group)
            ok_c = ok_c.bool()
            start = sum(sizes[:rank])
        else:
            V_c, t_c, lq_c, ok_c, start = V_pos, target, lq.to(u.dtype), valid, 0
        logits = u @ V_c.T
        own = torch.zeros(u.shape[0], V_c.shape[0], dtype=torch.bool, device=u.device)
        own[torch.arange(u.shape[0], device=u.device), start + torch.arange(u.shape[0], device=u.device)] = True
        cols.append(logits)
        ids.append(t_c)
        corr.append(lq_c)
        ok.append(ok_c[None, :] & ~own)
    if neg_ids is not None:
        if V_neg is None or neg_log_q is None:
            raise ValueError("sampled_softmax_ce: neg_ids need V_neg and neg_log_q")
        cols.append(u @ V_neg.T)
        ids.append(neg_ids.to(target.device))
        corr.append(neg_log_q.to(u.dtype))
        ok.append(torch.ones(u.shape[0], len(neg_ids), dtype=torch.bool, device=u.device))
    if not cols:
        raise ValueError("sampled_softmax_ce: no negatives (inbatch off and no sampled negatives)")
    logits = torch.cat(cols, dim=1) - torch.cat(corr)[None, :]
    keep = torch.cat(ok, dim=1)
    if mask_hits:
        keep = keep & (torch.cat(ids)[None, :] != target[:, None])
    logits = logits.masked_fill(~keep, float("-inf"))
    full = torch.cat([pos[:, None], logits], dim=1)
    ce = torch.logsumexp(full, dim=1) - pos
    return torch.where(valid, ce, torch.zeros_like(ce))


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def sharded_target_ranks(u: torch.Tensor, V_local: torch.Tensor, offset: int, target: torch.Tensor, *,
                         rank_padding: bool = False, history: torch.Tensor | None = None,
                         chunk_size: int | None = None, group=None) -> torch.Tensor:
    """0-based rank [b] of each of this process's targets among ALL items: the number of
    items scored strictly higher, summed over the processes' item ranges. Collective.
    Item 0 is left out unless ``rank_padding``; ``history`` [b, L] items are left out
    (except the target), as ``mmm4rec.metrics.target_ranks``."""
    from .metrics import _history_mask

    rank, _ = _world(group)
    u_all, sizes = gather_rows(u, group)
    t_all, _ = gather_rows(target, group)
    h_all = gather_rows(history, group)[0] if history is not None else None
    n = V_local.shape[0]
    mask_below = 0 if rank_padding else 1
    tgt = torch.zeros(u_all.shape[0], dtype=u_all.dtype, device=u_all.device)
    for lo, hi in _chunks(n, chunk_size):   # the owner reads the target's score from its own matmul
        here = (t_all >= offset + lo) & (t_all < offset + hi)
        if here.any():
            s = u_all[here] @ V_local[lo:hi].T
            tgt[here] = s.gather(1, (t_all[here] - offset - lo)[:, None])[:, 0]
    tgt = _all_reduce(tgt, "sum", group)
    ranks = torch.zeros(u_all.shape[0], dtype=torch.int64, device=u_all.device)
    for lo, hi in _chunks(n, chunk_size):
        s = _local_logits(u_all, V_local, lo, hi, offset, mask_below)
        if h_all is not None:
            s = s.masked_fill(_history_mask(h_all, t_all, offset + lo, offset + hi), float("-inf"))
        ranks += (s > tgt[:, None]).sum(1)
    ranks = _all_reduce(ranks, "sum", group)
    start = sum(sizes[:rank])
    return ranks[start:start + u.shape[0]]


@torch.no_grad()
def local_topk(u: torch.Tensor, V: torch.Tensor, offset: int, k: int, *, rank_padding: bool = False,
               history: torch.Tensor | None = None, chunk_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [b, k], item ids [b, k])``: the top-K of ``u`` among the items ``V`` holds
    (rows = global ids ``offset ..``), chunk by chunk, never [b, n]. Ties: the lower id
    first; item 0 is left out unless ``rank_padding``; ``history`` [b, L] items are left
    out (a user is never recommended what it has seen). Fewer than k items: the missing
    columns are score -inf, id -1."""
    B, n = u.shape[0], V.shape[0]
    mask_below = 0 if rank_padding else 1
    best_s = torch.full((B, 0), float("-inf"), dtype=u.dtype, device=u.device)
    best_i = torch.zeros((B, 0), dtype=torch.int64, device=u.device)
    for lo, hi in _chunks(n, chunk_size):
        s = _local_logits(u, V, lo, hi, offset, mask_below)
        if history is not None:
            seen = (history[:, :, None] == torch.arange(offset + lo, offset + hi, device=u.device)).any(1)
            s = s.masked_fill(seen, float("-inf"))
        ids = torch.arange(offset + lo, offset + hi, device=u.device).expand(B, -1)
        best_s, best_i = _top(torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1), k)
    if best_s.shape[1] < k:   # pad to k columns (a process with fewer than k items)
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, torch.full((B, pad), float("-inf"), dtype=best_s.dtype, device=best_s.device)], 1)
        best_i = torch.cat([best_i, torch.full((B, pad), -1, dtype=torch.int64, device=best_i.device)], 1)
    best_i = best_i.masked_fill(torch.isneginf(best_s), -1)   # a masked item is no recommendation
    return best_s, best_i


@torch.no_grad()
def sharded_topk(u: torch.Tensor, V_local: torch.Tensor, offset: int, k: int, *, rank_padding: bool = False,
                 history: torch.Tensor | None = None, chunk_size: int | None = None,
                 group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [b, k], item ids [b, k])``: this process's users' top-K over ALL items,
    each process's :func:`local_topk` of the gathered users merged (ties: the lower item
    id first). Collective."""
    rank, ws = _world(group)
    u_all, sizes = gather_rows(u, group)
    h_all = gather_rows(history, group)[0] if history is not None else None
    best_s, best_i = local_topk(u_all, V_local, offset, k, rank_padding=rank_padding, history=h_all,
                                chunk_size=chunk_size)
    if ws > 1:
        import torch.distributed as tdist

        parts_s = [torch.empty_like(best_s) for _ in range(ws)]
        parts_i = [torch.empty_like(best_i) for _ in range(ws)]
        tdist.all_gather(parts_s, best_s.contiguous(), group=group)
        tdist.all_gather(parts_i, best_i.contiguous(), group=group)
        best_s, best_i = _top(torch.cat(parts_s, 1), torch.cat(parts_i, 1), k)
    start = sum(sizes[:rank])
    return best_s[start:start + u.shape[0]], best_i[start:start + u.shape[0]]


def _top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns by score, then by lower id (empty slots carry id -1 and -inf)."""
    key_ids = torch.where(ids < 0, torch.full_like(ids, torch.iinfo(torch.int64).max), ids)
    order = torch.argsort(key_ids, dim=1, stable=True)
    s, i = scores.gather(1, order), ids.gather(1, order)
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), i.gather(1, order)

