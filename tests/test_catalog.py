"""Catalog-scale math (``mmm4rec/catalog.py``) against the single-process reference.

Multi-process cases run real gloo process groups (1, 2 and 3 processes; item ranges
and batch sizes that do not divide evenly), each process holding only its item range.
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from mmm4rec import catalog, losses
from mmm4rec.metrics import RankingMetrics, target_ranks

N_ROWS, DIM = 26, 6          # items 0..25 (0 = padding): 3 ranks split 9 / 9 / 8
BATCHES = (5, 3, 4)          # users per rank (uneven)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, ws, port, fn, q, args):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=ws)
    try:
        buf = io.BytesIO()   # by value: the children exit before the parent reads
        torch.save(fn(rank, ws, *args), buf)
        q.put((rank, buf.getvalue()))
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails the test
        q.put((rank, "ERROR\n" + traceback.format_exc()))
    finally:
        tdist.destroy_process_group()


def run_group(ws: int, fn, *args) -> list:
    """``fn(rank, ws, *args)`` in ``ws`` gloo processes; their results in rank order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, ws, port, fn, q, args)) for r in range(ws)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=300) for _ in range(ws))
    for p in procs:
        p.join(timeout=60)
    for r, v in out.items():
        assert not isinstance(v, str), f"rank {r}:\n{v}"
    return [torch.load(io.BytesIO(out[r])) for r in range(ws)]


def _problem(seed: int = 0, integer: bool = False):
    g = torch.Generator().manual_seed(seed)
    B = sum(BATCHES)
    if integer:   # small integers: exact scores with many ties
        u = torch.randint(-2, 3, (B, DIM), generator=g).float()
        V = torch.randint(-2, 3, (N_ROWS, DIM), generator=g).float()
    else:
        u = torch.randn(B, DIM, generator=g, dtype=torch.float32) * 2
        V = torch.randn(N_ROWS, DIM, generator=g, dtype=torch.float32)
    target = torch.randint(1, N_ROWS, (B,), generator=g)
    target[4] = 25                      # the last item (last rank's last row)
    target[6] = 1                       # the first real item
    weight = torch.ones(B)
    weight[2] = 0.0                     # a padding row: target 0, weight 0
    target[2] = 0
    history = torch.randint(0, N_ROWS, (B, 4), generator=g)
    return u, V, target, weight, history


def _mine(rank: int, ws: int):
    sizes = BATCHES if ws == 3 else (sum(BATCHES[:2]), BATCHES[2]) if ws == 2 else (sum(BATCHES),)
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


# ---------------------------------------------------------------------- vocab-parallel softmax
VP_CASES = [(True, None), (True, 4), (False, 3)]   # (exclude_padding, chunk_size)


def _vp_worker(rank, ws):
    return [_vp_case(rank, ws, *case) for case in VP_CASES]


def _vp_case(rank, ws, exclude_padding, chunk):
    u, V, target, weight, _ = _problem()
    rows = _mine(rank, ws)
    lo, hi = catalog.even_ranges(N_ROWS, ws)[rank]
    u_l = u[rows].clone().requires_grad_(True)
    V_l = V[lo:hi].clone().requires_grad_(True)
    ce = catalog.vocab_parallel_ce(u_l, V_l, lo, target[rows], weight[rows], exclude_padding=exclude_padding,
                                   chunk_size=chunk)
    (ce * weight[rows]).sum().div(weight.sum()).backward()    # this rank's share of the global mean
    return ce.detach(), u_l.grad, V_l.grad, (lo, hi)


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_vocab_parallel_ce_equals_single_process_full_softmax(ws):
    runs = run_group(ws, _vp_worker) if ws > 1 else [_vp_worker(0, 1)]
    for i, case in enumerate(VP_CASES):
        _check_vp(ws, [r[i] for r in runs], *case)


def _check_vp(ws, out, exclude_padding, chunk):
    u, V, target, weight, _ = _problem()
    u_r, V_r = u.clone().requires_grad_(True), V.clone().requires_grad_(True)
    ref = losses.full_softmax_ce(u_r, V_r, target.clamp(min=1), weight, exclude_padding=exclude_padding)
    ref.backward()
    logits = u @ V.T
    if exclude_padding:
        logits[:, 0] = float("-inf")
    ref_rows = torch.nn.functional.cross_entropy(logits, target.clamp(min=1), reduction="none") * (weight > 0)
    ce = torch.cat([o[0] for o in out])
    grad_u = torch.cat([o[1] for o in out])
    grad_V = torch.cat([o[2] for o in out])
    assert [o[3] for o in out] == catalog.even_ranges(N_ROWS, ws)
    assert ce[2] == 0.0 and not grad_u[2].any()            # the padding row: no loss, no gradient
    assert torch.allclose(ce, ref_rows, rtol=1e-5, atol=0)
    total = (ce * weight).sum() / weight.sum()
    assert abs(float(total.detach()) - float(ref.detach())) <= 1e-5 * abs(float(ref.detach()))
    for got, want in ((grad_u, u_r.grad), (grad_V, V_r.grad)):
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-5, rel
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_vocab_parallel_ce_is_the_full_softmax_on_one_process_and_survives_huge_logits():
    u, V, target, weight, _ = _problem(3)
    u = u * 40                                     # logits in the hundreds: needs the max shift
    a = losses.full_softmax_ce(u, V, target.clamp(min=1), weight)
    ce = catalog.vocab_parallel_ce(u, V, 0, target, weight, chunk_size=5)
    b = (ce * weight).sum() / weight.sum()
    assert torch.isfinite(b) and abs(float(a - b)) <= 1e-5 * abs(float(a))


# ---------------------------------------------------------------------- sharded ranking
RANK_CASES = [(False, False), (True, False), (False, True)]   # (use_history, rank_padding)


def _rank_worker(rank, ws, k):
    return [_rank_case(rank, ws, k, *case) for case in RANK_CASES]


def _rank_case(rank, ws, k, use_history, rank_padding):
    u, V, target, weight, history = _problem(1, integer=True)
    rows = _mine(rank, ws)
    lo, hi = catalog.even_ranges(N_ROWS, ws)[rank]
    r = catalog.sharded_target_ranks(u[rows], V[lo:hi], lo, target[rows], rank_padding=rank_padding,
                                     history=history[rows] if use_history else None, chunk_size=4)
    s, i = catalog.sharded_topk(u[rows], V[lo:hi], lo, k, rank_padding=rank_padding, chunk_size=3,
                                history=history[rows] if use_history else None)
    return r, s, i


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_sharded_ranking_equals_single_process_full_ranking(ws):
    k = 10                                        # > a 3-way shard's 8 items: the merge must pad
    runs = run_group(ws, _rank_worker, k) if ws > 1 else [_rank_worker(0, 1, k)]
    for i, case in enumerate(RANK_CASES):
        _check_ranks(k, [r[i] for r in runs], *case)


def _check_ranks(k, out, use_history, rank_padding):
    u, V, target, weight, history = _problem(1, integer=True)
    target = target.clamp(min=1)
    scores = u @ V.T
    if not rank_padding:
        scores[:, 0] = float("-inf")
    ref_ranks = target_ranks(scores, target, history if use_history else None)
    assert (ref_ranks > 0).any() and len(set((u @ V.T)[0].tolist())) < N_ROWS   # ties exist
    ranks = torch.cat([o[0] for o in out])
    ranks[2] = ref_ranks[2]                       # (the padding row's target 0 is not rankable)
    assert torch.equal(ranks, ref_ranks)
    # the metrics through the same reduction
    a, b = RankingMetrics((1, 5, 10)), RankingMetrics((1, 5, 10))
    a.update(ref_ranks, weight)
    b.update(ranks, weight)
    assert a.compute() == b.compute()
    # top-K: by score, ties by the lower id; with the history, its items are never listed
    ids = torch.arange(N_ROWS).expand_as(scores)
    if use_history:
        seen = (history[:, :, None] == torch.arange(N_ROWS)).any(1)
        unmasked = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
        assert seen.gather(1, unmasked)[:, :].any()              # the mask changes some lists
        scores = scores.masked_fill(seen, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]   # ids ascending within ties
    top_s = scores.gather(1, order)
    assert torch.isfinite(top_s).all()
    assert torch.equal(torch.cat([o[2] for o in out]), ids.gather(1, order))
    assert torch.equal(torch.cat([o[1] for o in out]), top_s)


# ---------------------------------------------------------------------- sampled softmax
def test_sampled_softmax_masks_accidental_hits_everywhere():
    g = torch.Generator().manual_seed(5)
    u, V = torch.randn(4, DIM, generator=g), torch.randn(N_ROWS, DIM, generator=g)
    target = torch.tensor([3, 7, 3, 9])           # rows 0 and 2 share their positive
    neg = torch.tensor([7, 3, 11, 3])             # sampled negatives hit rows 0/2 (twice) and 1
    lq = torch.zeros(4)
    ce = catalog.sampled_softmax_ce(u, V[target], target, neg_ids=neg, V_neg=V[neg], neg_log_q=lq)
    for i in range(4):
        cands = [int(t) for j, t in enumerate(target) if j != i] + [int(x) for x in neg]
        cands = [c for c in cands if c != int(target[i])]
        logits = torch.stack([u[i] @ V[target[i]]] + [u[i] @ V[c] for c in cands])
        want = torch.logsumexp(logits, 0) - logits[0]
        assert torch.allclose(ce[i], want, rtol=1e-6), i
    # without masking, row 0 sees its own item as a negative (twice from the sampler, once in-batch)
    raw = catalog.sampled_softmax_ce(u, V[target], target, neg_ids=neg, V_neg=V[neg], neg_log_q=lq,
                                     mask_hits=False)
    assert raw[0] >= torch.log(torch.tensor(4.0)) and raw[0] > ce[0]   # 3 copies of the positive: >= log 4
    # padding rows are neither positives nor negatives
    w = torch.tensor([1.0, 1.0, 1.0, 0.0])
    cw = catalog.sampled_softmax_ce(u, V[target], target, w)
    assert cw[3] == 0
    only = catalog.sampled_softmax_ce(u[:3], V[target[:3]], target[:3])
    assert torch.allclose(cw[:3], only)


def _exact_and_sampler(power: float):
    g = torch.Generator().manual_seed(11)
    n = 40
    V = torch.randn(n + 1, DIM, generator=g)
    u = torch.randn(1, DIM, generator=g) * 1.5
    counts = torch.arange(n + 1, dtype=torch.float64) ** power + 3   # skewed popularity
    return u, V, torch.tensor([7]), catalog.NegativeSampler(n, counts, seed=3)


def test_sampled_softmax_log_q_partition_is_unbiased():
    """Known exact answer: with the log-Q correction and hits masked, exp(logsumexp of
    the candidates) estimates the full partition function without bias for any k."""
    u, V, target, sampler = _exact_and_sampler(1.5)
    logits = (u @ V.T)[0]
    exact = torch.exp(logits[1:]).sum().double()
    for k, corrected in ((4, True), (4, False)):
        est = []
        for _ in range(20000):
            ids, lq = sampler.sample(k)
            ce = catalog.sampled_softmax_ce(u, V[target], target, inbatch=False, neg_ids=ids, V_neg=V[ids],
                                            neg_log_q=lq if corrected else torch.zeros(k))
            est.append(torch.exp(ce[0] + logits[target[0]]).double())
        est = torch.stack(est)
        se = est.std() / len(est) ** 0.5
        if corrected:
            assert abs(est.mean() - exact) < 4 * se, (float(est.mean()), float(exact), float(se))
        else:   # the same draws without the correction are far off: the test can fail
            assert abs(est.mean() - exact) > 20 * se


def test_sampled_softmax_mixed_sources_partition_is_unbiased():
    """In-batch negatives (the other rows' targets, drawn from the data's popularity)
    plus uniform negatives: with each candidate's log-Q = log((n - 1) p(item) + k q(item))
    (what dist.model.DistRecModel passes), the partition estimate of row 0 stays unbiased;
    correcting each source on its own would count the negatives twice."""
    u, V, target, pop = _exact_and_sampler(1.0)
    uni = catalog.NegativeSampler(pop.num_items, seed=4)
    n, k = 6, 3
    logits = (u @ V.T)[0]
    exact = torch.exp(logits[1:]).sum().double()
    ests = {"mixed": [], "separate": []}
    for _ in range(20000):
        others = pop.sample(n - 1)[0]
        ids = uni.sample(k)[0]
        t = torch.cat([target, others])
        users = u.expand(n, -1)

        def lq(items):
            return torch.log((n - 1) * pop.prob(items) + k * uni.prob(items)).float()
        for name, (lq_t, lq_n) in {"mixed": (lq(t), lq(ids)),
                                   "separate": (torch.log((n - 1) * pop.prob(t)).float(),
                                                torch.log(k * uni.prob(ids)).float())}.items():
            ce = catalog.sampled_softmax_ce(users, V[t], t, inbatch_log_q=lq_t, neg_ids=ids, V_neg=V[ids],
                                            neg_log_q=lq_n)
            ests[name].append(torch.exp(ce[0] + logits[target[0]]).double())
    for name, est in ests.items():
        est = torch.stack(est)
        se = est.std() / len(est) ** 0.5
        if name == "mixed":
            assert abs(est.mean() - exact) < 4 * se, (float(est.mean()), float(exact), float(se))
        else:
            assert est.mean() - exact > 20 * se


def test_sampled_softmax_expected_gradient_matches_full_softmax():
    """The gradient of the corrected sampled loss (w.r.t. the user vector and the item
    vectors), averaged over many draws, equals the full-softmax gradient within the
    sampling error (k = 256 candidates: the self-normalisation bias is O(1/k), far below)."""
    u, V, target, sampler = _exact_and_sampler(1.0)
    u_f, V_f = u.clone().requires_grad_(True), V.clone().requires_grad_(True)
    losses.full_softmax_ce(u_f, V_f, target).backward()
    exact = torch.cat([u_f.grad.flatten(), V_f.grad.flatten()])
    grads = {True: [], False: []}
    k, reps = 1024, 200
    for _ in range(reps):
        ids, lq = sampler.sample(k)
        for corrected in (True, False):
            u_s, V_s = u.clone().requires_grad_(True), V.clone().requires_grad_(True)
            catalog.sampled_softmax_ce(u_s, V_s[target], target, inbatch=False, neg_ids=ids, V_neg=V_s[ids],
                                       neg_log_q=lq if corrected else torch.zeros(k)).sum().backward()
            grads[corrected].append(torch.cat([u_s.grad.flatten(), V_s.grad.flatten()]))
    for corrected, gs in grads.items():
        g = torch.stack(gs)
        err = (g.mean(0) - exact).abs()
        se = g.std(0) / reps ** 0.5
        if corrected:
            assert bool((err <= 5 * se + 1e-3).all()), float((err / se).max())
        else:
            assert float(err.max()) > 0.1               # popularity sampling without log-Q is biased


def _gather_worker(rank, ws):
    u, V, target, weight, _ = _problem(2)
    target = target.clamp(min=1)
    rows = _mine(rank, ws)
    u_l = u[rows].clone().requires_grad_(True)
    V_l = V.clone().requires_grad_(True)
    lq = torch.linspace(-1.0, 1.0, len(target))[rows]
    ce = catalog.sampled_softmax_ce(u_l, V_l[target[rows]], target[rows], weight[rows], inbatch_log_q=lq,
                                    gather=True)
    (ce * weight[rows]).sum().div(weight.sum()).backward()
    return ce.detach(), u_l.grad, V_l.grad


def test_sampled_softmax_gathered_inbatch_negatives_equal_one_process():
    u, V, target, weight, _ = _problem(2)
    target = target.clamp(min=1)
    u_r, V_r = u.clone().requires_grad_(True), V.clone().requires_grad_(True)
    lq = torch.linspace(-1.0, 1.0, len(target))
    ce = catalog.sampled_softmax_ce(u_r, V_r[target], target, weight, inbatch_log_q=lq)
    ((ce * weight).sum() / weight.sum()).backward()
    out = run_group(2, _gather_worker)
    assert torch.allclose(torch.cat([o[0] for o in out]), ce.detach(), rtol=1e-5)
    assert torch.allclose(torch.cat([o[1] for o in out]), u_r.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(out[0][2] + out[1][2], V_r.grad, rtol=1e-5, atol=1e-7)   # summed over ranks


def test_negative_sampler_draws_by_popularity_and_checks_counts():
    counts = torch.tensor([5.0, 1.0, 0.0, 3.0])
    s = catalog.NegativeSampler(3, counts, seed=0)
    ids, lq = s.sample(4000)
    assert set(ids.tolist()) <= {1, 3}
    assert abs(float((ids == 3).float().mean()) - 0.75) < 0.03
    assert torch.allclose(lq[ids == 3], torch.log(torch.tensor(4000 * 0.75, dtype=torch.float64)))
    u = catalog.NegativeSampler(3, seed=0)
    ids, lq = u.sample(10)
    assert ids.min() >= 1 and ids.max() <= 3 and torch.allclose(lq, torch.log(torch.tensor(10 / 3)).double())
    with pytest.raises(ValueError, match="num_items \\+ 1"):
        catalog.NegativeSampler(5, counts)
