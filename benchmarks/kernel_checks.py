"""Equivalence checks of each Triton kernel against its PyTorch twin (used by the tests
and by ``benchmarks/kernels.py --interpret-smoke``).

Every ``check_*`` function draws inputs from a seeded generator, runs the Triton
kernel under :func:`~mmm4rec.kernels._common.poison_outputs` (outputs start as NaN, so
an element a kernel forgets to write shows up), raises ``AssertionError`` if any output
is not finite, and returns ``{name: relative error}`` for the outputs and for every
gradient against the reference run in float64 on the same (up-cast) inputs, where

    relative error = max |kernel - reference| / max |reference|,

except for gradients that are sums over b*L positions (dA, dD, ddt_bias of the SSD),
judged against the summed magnitudes of their terms (:func:`sum_err`).

A 16-bit ``dtype`` rounds the inputs to it first, so the reference sees the same values.
Importing this module imports Triton: set ``TRITON_INTERPRET`` before, for CPU runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from mmm4rec.kernels import fourier_fused, ssd_combined
from mmm4rec.kernels._common import poison_outputs
from mmm4rec.kernels.fourier_fused import dft_matrices, fourier_filter_triton
from mmm4rec.kernels.fourier_ref import fourier_filter_ref
from mmm4rec.kernels.ssd_chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from mmm4rec.kernels.ssd_chunk_scan import chunk_scan_bwd, chunk_scan_fwd
from mmm4rec.kernels.ssd_chunk_state import chunk_state_bwd, chunk_state_fwd
from mmm4rec.kernels.ssd_combined import ssd_chunked_triton
from mmm4rec.kernels.ssd_ref import (
    _chunk,
    _expand_groups,
    ssd_chunk_cumsum_ref,
    ssd_chunk_scan_ref,
    ssd_chunk_state_ref,
    ssd_quadratic_ref,
    ssd_state_passing_ref,
)
from mmm4rec.kernels.ssd_state_passing import state_passing_bwd, state_passing_fwd

__all__ = [
    "SSDShape",
    "check_chunk_cumsum",
    "check_chunk_scan",
    "check_chunk_state",
    "check_dft_matrices",
    "check_fourier",
    "check_ssd",
    "check_state_passing",
    "compare_with_mamba",
    "fourier_inputs",
    "load_mamba_chunk_scan_combined",
    "mamba_cpu_shims",
    "mamba_equivalent",
    "rel_err",
    "ssd_inputs",
    "sum_err",
]

Errors = dict[str, float]


@dataclass(frozen=True)
class SSDShape:
    b: int
    L: int
    H: int
    P: int
    G: int
    S: int

    def __str__(self) -> str:
        return f"b={self.b} L={self.L} H={self.H} P={self.P} G={self.G} S={self.S}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff     # an all-zero reference: absolute error


def sum_err(out: torch.Tensor, terms: torch.Tensor) -> float:
    """Error of ``out`` [H] = terms.sum over all but the last dim, relative to the
    largest sum of |terms| (per last-dim entry): the natural scale of a summation."""
    terms = terms.detach().double().flatten(0, -2)
    diff = (out.detach().double() - terms.sum(0)).abs().max().item()
    scale = terms.abs().sum(0).max().item()
    return diff / scale if scale > 0 else diff


def _finite(**outs: torch.Tensor) -> None:
    bad = [k for k, v in outs.items() if not torch.isfinite(v).all()]
    if bad:
        raise AssertionError(f"non-finite (unwritten?) elements in {bad}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(g, *shape, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(device)


def _rand(g, *shape, device, lo=0.0, hi=1.0):
    return (torch.rand(*shape, generator=g) * (hi - lo) + lo).to(device)


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (a slice of a wider last dim)."""
    pad = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    pad[..., 1:t.shape[-1] + 1] = t
    return pad[..., 1:t.shape[-1] + 1]


def ssd_inputs(shape: SSDShape, seed: int, device, dtype=torch.float32, strided=False):
    """(x, dt, A, B, C, D, dt_bias) with MMM4Rec-like ranges (dt_hat ~ 0.02 .. 2)."""
    g = _gen(seed)
    s = shape
    x = _randn(g, s.b, s.L, s.H, s.P, device=device)
    dt = _randn(g, s.b, s.L, s.H, device=device, shift=-1.0)
    A = -_rand(g, s.H, device=device, lo=0.5, hi=4.0)
    B = _randn(g, s.b, s.L, s.G, s.S, device=device, scale=s.S ** -0.5)
    C = _randn(g, s.b, s.L, s.G, s.S, device=device, scale=s.S ** -0.5)
    D = _randn(g, s.H, device=device)
    dt_bias = _rand(g, s.H, device=device, lo=-3.0, hi=0.5)
    x, B, C, dt = (t.to(dtype) for t in (x, B, C, dt))
    if strided:
        x, B, C = _strided(x), _strided(B), _strided(C)
        dt = dt.transpose(1, 2).contiguous().transpose(1, 2)        # [b, L, H] with stride_l == 1
    return x, dt, A, B, C, D, dt_bias


def _stage_inputs(shape: SSDShape, Q: int, seed: int, device):
    """fp32 stage inputs: x, B, C raw; dt_hat, dA_cs as stage 1 makes them (padded tail)."""
    x, dt, A, B, C, D, dt_bias = ssd_inputs(shape, seed, device)
    dt_hat, dA_cs = ssd_chunk_cumsum_ref(dt, A, dt_bias, Q)
    return x, B, C, D, dt_hat.contiguous(), dA_cs.contiguous()


# ------------------------------------------------------------------------------ stages
def _unchunk(t: torch.Tensor, L: int) -> torch.Tensor:
    """[b, H, c, Q] -> [b, L, H]."""
    b, H, c, Q = t.shape
    return t.detach().double().permute(0, 2, 3, 1).reshape(b, c * Q, H)[:, :L]


def check_chunk_cumsum(shape: SSDShape, Q: int, seed: int, device) -> Errors:
    _, dt, A, _, _, _, dt_bias = ssd_inputs(shape, seed, device)
    with poison_outputs():
        dt_hat, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, Q)
        g = _gen(seed + 1)
        g_dt_hat = _randn(g, *dt_hat.shape, device=device)
        g_dA_cs = _randn(g, *dA_cs.shape, device=device)
        ddt, dA, ddt_bias = chunk_cumsum_bwd(g_dA_cs, g_dt_hat, dt_hat, dt, A, dt_bias)
    _finite(dt_hat=dt_hat, dA_cs=dA_cs, ddt=ddt, dA=dA, ddt_bias=ddt_bias)
    ins = [_leaf64(t) for t in (dt, A, dt_bias)]
    r_dt_hat, r_dA_cs = ssd_chunk_cumsum_ref(*ins, Q)
    grads = torch.autograd.grad((r_dt_hat, r_dA_cs), ins, (g_dt_hat.double(), g_dA_cs.double()))
    # per-position terms of the two per-head sums: dA = sum ddA * dt_hat, ddt_bias = sum ddt
    ddA = g_dA_cs.double().flip(-1).cumsum(-1).flip(-1)
    dA_terms = (ddA * r_dt_hat.detach()).permute(0, 2, 3, 1)               # [b, c, Q, H]
    if rel_err(grads[1], dA_terms.sum((0, 1, 2))) > 1e-9:
        raise AssertionError("internal: dA terms do not add up to the reference dA")
    return {"dt_hat": rel_err(dt_hat, r_dt_hat), "dA_cumsum": rel_err(dA_cs, r_dA_cs),
            "ddt": rel_err(ddt, grads[0]), "dA": sum_err(dA, dA_terms),
            "ddt_bias": sum_err(ddt_bias, grads[0])}


def check_chunk_state(shape: SSDShape, Q: int, seed: int, device, nsplit: int = 1) -> Errors:
    x, B, _, _, dt_hat, dA_cs = _stage_inputs(shape, Q, seed, device)
    nchunks = dt_hat.shape[2]
    g = _gen(seed + 1)
    dstates = _randn(g, shape.b, nchunks, shape.H, shape.P, shape.S, device=device)
    ddA_end = _randn(g, shape.b, shape.H, nchunks, device=device)
    with poison_outputs():
        states = chunk_state_fwd(x, B, dt_hat, dA_cs)
        dx, dB, ddt_hat, ddA_cs = chunk_state_bwd(x, B, dt_hat, dA_cs, dstates, nsplit=nsplit)
    _finite(states=states, dx=dx, dB=dB, ddt_hat=ddt_hat, ddA_cs=ddA_cs)
    # accumulate mode (what ssd_combined uses), with the chunk-end cotangent folded in
    base = [_randn(g, *t.shape, device=device) for t in (dx, dB, ddt_hat, ddA_cs)]
    acc = chunk_state_bwd(x, B, dt_hat, dA_cs, dstates, ddA_end, nsplit=nsplit,
                          out=tuple(t.clone() for t in base))
    ins = [_leaf64(t) for t in (x, B, dt_hat, dA_cs)]
    r_states = ssd_chunk_state_ref(_chunk(ins[0], Q), _chunk(_expand_groups(ins[1], shape.H), Q),
                                   ins[2], ins[3])
    gx, gB, gdt, gdA = torch.autograd.grad(r_states, ins, dstates.double())
    gdA_end = gdA.clone()
    gdA_end[..., -1] += ddA_end.double()
    return {"states": rel_err(states, r_states), "dx": rel_err(dx, gx),
            "dB": rel_err(dB.sum(0), gB), "ddt_hat": rel_err(ddt_hat, gdt),
            "ddA_cumsum": rel_err(ddA_cs, gdA),
            "acc_dx": rel_err(acc[0] - base[0], gx), "acc_dB": rel_err((acc[1] - base[1]).sum(0), gB),
            "acc_ddt_hat": rel_err(acc[2] - base[2], gdt),
            "acc_ddA_cumsum": rel_err(acc[3] - base[3], gdA_end)}


def check_state_passing(shape: SSDShape, Q: int, seed: int, device) -> Errors:
    nchunks = -(-shape.L // Q)
    g = _gen(seed)
    states = _randn(g, shape.b, nchunks, shape.H, shape.P, shape.S, device=device)
    dA_cs = torch.cumsum(-_rand(g, shape.b, shape.H, nchunks, Q, device=device, hi=0.2), dim=-1)
    dprev = _randn(g, *states.shape, device=device)
    with poison_outputs():
        prev = state_passing_fwd(states, dA_cs)
        dstates, ddA_end = state_passing_bwd(dprev, prev, dA_cs)
    _finite(prev=prev, dstates=dstates, ddA_end=ddA_end)
    ins = [_leaf64(states), _leaf64(dA_cs)]
    r_prev = ssd_state_passing_ref(*ins)
    if r_prev.requires_grad:
        g_states, g_dA = torch.autograd.grad(r_prev, ins, dprev.double())
    else:   # one chunk: nothing is carried, prev_states == 0 whatever the inputs
        g_states, g_dA = torch.zeros_like(ins[0]), torch.zeros_like(ins[1])
    return {"prev_states": rel_err(prev, r_prev), "dstates": rel_err(dstates, g_states),
            "ddA_chunk_end": rel_err(ddA_end, g_dA[..., -1])}


def check_chunk_scan(shape: SSDShape, Q: int, seed: int, device, nsplit: int = 1,
                     with_prev: bool = True) -> Errors:
    """``with_prev=False``: the kernels' no-carried-state path, against prev_states = 0."""
    x, B, C, D, dt_hat, dA_cs = _stage_inputs(shape, Q, seed, device)
    nchunks = dt_hat.shape[2]
    g = _gen(seed + 1)
    prev = _randn(g, shape.b, nchunks, shape.H, shape.P, shape.S, device=device)
    if not with_prev:
        prev.zero_()
    dy = _randn(g, shape.b, shape.L, shape.H, shape.P, device=device)
    with poison_outputs():
        y = chunk_scan_fwd(x, B, C, dt_hat, dA_cs, prev if with_prev else None, D)
        dx, dB, dC, ddt_hat, ddA_cs, dprev, dD = chunk_scan_bwd(
            dy, x, B, C, dt_hat, dA_cs, prev if with_prev else None, D, nsplit=nsplit)
    if not with_prev:
        assert dprev is None
        dprev = torch.zeros_like(prev)      # not compared: prev_states is not an input here
    _finite(y=y, dx=dx, dB=dB, dC=dC, ddt_hat=ddt_hat, ddA_cs=ddA_cs, dprev=dprev, dD=dD)
    ins = [_leaf64(t) for t in (x, B, C, dt_hat, dA_cs, prev, D)]
    H = shape.H
    r_y = ssd_chunk_scan_ref(_chunk(ins[0], Q), _chunk(_expand_groups(ins[1], H), Q),
                             _chunk(_expand_groups(ins[2], H), Q), ins[3], ins[4], ins[5], ins[6])
    r_y = r_y.reshape(shape.b, nchunks * Q, H, shape.P)[:, :shape.L]
    grads = torch.autograd.grad(r_y, ins, dy.double())
    outs = (dx, dB.sum(0), dC.sum(0), ddt_hat, ddA_cs, dprev, dD)
    names = ("dx", "dB", "dC", "ddt_hat", "ddA_cumsum", "dprev_states")[:6 if with_prev else 5]
    errs = {"y": rel_err(y, r_y)}
    errs.update({n: rel_err(o, r) for n, o, r in zip(names, outs, grads)})
    dD_terms = (dy.double() * x.double() * _unchunk(dt_hat, shape.L)[..., None]).sum(-1)
    if rel_err(grads[6], dD_terms.sum((0, 1))) > 1e-9:
        raise AssertionError("internal: dD terms do not add up to the reference dD")
    errs["dD"] = sum_err(dD, dD_terms)
    return errs


# ------------------------------------------------------------------------------ combined
_SSD_GRADS = ("dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias")


def _ssd_reference64(ins, dy):
    """The quadratic form in float64 on the up-cast inputs: ``({y, dx, ...}, terms)``, where
    ``terms`` holds, for the gradients that are sums over the b*L positions (dA, dD,
    ddt_bias), their per-position terms [b, L, H]: A and dt_bias enter as expanded leaves."""
    x, dt, A, B, C, D, dt_bias = (_leaf64(t) for t in ins)
    A_pos, bias_pos = (t.detach().expand_as(dt).clone().requires_grad_(True) for t in (A, dt_bias))
    r_y = ssd_quadratic_ref(x, dt, A_pos, B, C, D, bias_pos)
    dy64 = dy.double()
    r_dx, r_ddt, r_dA_pos, r_dB, r_dC, r_dD, r_dbias_pos = torch.autograd.grad(
        r_y, (x, dt, A_pos, B, C, D, bias_pos), dy64)
    with torch.no_grad():
        r_dD_pos = (dy64 * x * torch.nn.functional.softplus(dt + dt_bias)[..., None]).sum(-1)
    if rel_err(r_dD, r_dD_pos.sum((0, 1))) > 1e-9:
        raise AssertionError("internal: dD terms do not add up to the reference dD")
    ref = {"y": r_y, "dx": r_dx, "ddt": r_ddt, "dA": r_dA_pos.sum((0, 1)), "dB": r_dB,
           "dC": r_dC, "dD": r_dD, "ddt_bias": r_dbias_pos.sum((0, 1))}
    return ref, {"dA": r_dA_pos, "dD": r_dD_pos, "ddt_bias": r_dbias_pos}


def check_ssd(shape: SSDShape, chunk_size: int, seed: int, device, dtype=torch.float32,
              strided=False, nsplit=None) -> Errors:
    """ssd_chunked_triton vs the quadratic (dual) form in float64: y and all 7 gradients.

    ``nsplit`` forces the backward's head split (default: the device heuristic)."""
    ins = list(ssd_inputs(shape, seed, device, dtype, strided))
    leaves = [t.detach().requires_grad_(True) for t in ins]     # detach keeps the strides
    dy = _randn(_gen(seed + 1), shape.b, shape.L, shape.H, shape.P, device=device).to(dtype)
    with poison_outputs(), _patched(ssd_combined, "_pick_nsplit", nsplit):
        y = ssd_chunked_triton(*leaves, chunk_size=chunk_size)
        grads = torch.autograd.grad(y, leaves, dy)
    names = _SSD_GRADS
    _finite(y=y, **dict(zip(names, grads)))
    ref, terms = _ssd_reference64(ins, dy)
    errs = {"y": rel_err(y, ref["y"])}
    errs.update({n: rel_err(grads[i], ref[n]) for i, n in enumerate(names) if n not in terms})
    # dA, dD, ddt_bias are sums over b*L positions: judged against sum |terms| (the scale of
    # a sum's rounding error); a plain relative error is ill-conditioned under cancellation
    # (the fp32 PyTorch reference itself then misses by 1e-3).
    errs.update({n: sum_err(grads[names.index(n)], t) for n, t in terms.items()})
    for n, o, t in zip(names, grads, ins):
        if o.dtype != t.dtype or o.shape != t.shape:
            raise AssertionError(f"{n}: {o.dtype}{tuple(o.shape)} != input {t.dtype}{tuple(t.shape)}")
    return errs


# ------------------------------------------------------------------------------ fourier
def check_dft_matrices(L: int, device) -> Errors:
    """The cached DFT matrices against torch.fft (incl. irfft's bin 0 / Nyquist handling)."""
    g = _gen(L)
    M = dft_matrices(L, device).double()
    F = L // 2 + 1
    x = _randn(g, 4, L, device=device).double()
    X = torch.complex(_randn(g, 4, F, device=device).double(), _randn(g, 4, F, device=device).double())
    f = torch.fft.rfft(x, norm="ortho")
    r = torch.fft.irfft(X, n=L, norm="ortho")
    return {"rfft_real": rel_err(x @ M[0].T, f.real),
            "rfft_imag": rel_err(x @ M[1].T, f.imag),     # all zero for L <= 2: absolute
            "irfft": rel_err(X.real @ M[2] + X.imag @ M[3], r)}


def fourier_inputs(b: int, H: int, L: int, seed: int, device, dtype=torch.float32, strided=False):
    g = _gen(seed)
    F = L // 2 + 1
    d_t = _randn(g, b, H, L, device=device).to(dtype)
    d_v = _randn(g, b, H, L, device=device).to(dtype)
    if strided:
        d_t = d_t.transpose(0, 1).contiguous().transpose(0, 1)     # [b, H, L], stride_b < stride_h
        d_v = _strided(d_v)
    cls = []
    for _ in range(3):   # nn.Linear-like init
        bound = F ** -0.5
        cls.append(tuple(_rand(g, *shp, device=device, lo=-bound, hi=bound)
                         for shp in ((F, F), (F,), (F, F), (F,))))
    return d_t, d_v, cls


@contextlib.contextmanager
def _patched(module, heuristic: str, value) -> Iterator[None]:
    """Force a launch heuristic of ``module`` to return ``value`` (None: leave it)."""
    if value is None:
        yield
        return
    with mock.patch.object(module, heuristic, lambda *a: value):
        yield


def check_fourier(b: int, H: int, L: int, seed: int, device, dtype=torch.float32, strided=False,
                  wgrad_split=None) -> Errors:
    d_t, d_v, cls = fourier_inputs(b, H, L, seed, device, dtype, strided)
    flat = [d_t, d_v, *(t for cl in cls for t in cl)]
    leaves = [t.detach().requires_grad_(True) for t in flat]
    g_out = _randn(_gen(seed + 1), b, H, L, device=device).to(dtype)
    with poison_outputs(), _patched(fourier_fused, "_pick_wgrad_split", wgrad_split):
        y = fourier_filter_triton(leaves[0], leaves[1], leaves[2:6], leaves[6:10], leaves[10:14])
        grads = torch.autograd.grad(y, leaves, g_out)
    names = ["dd_t", "dd_v"] + [f"d{w}_{c}" for c in "abc" for w in ("W_r", "b_r", "W_i", "b_i")]
    _finite(y=y, **dict(zip(names, grads)))
    ref = [_leaf64(t) for t in flat]
    r_y = fourier_filter_ref(ref[0], ref[1], ref[2:6], ref[6:10], ref[10:14])
    r_grads = torch.autograd.grad(r_y, ref, g_out.double())
    errs = {"y": rel_err(y, r_y)}
    errs.update({n: rel_err(o, r) for n, o, r in zip(names, grads, r_grads)})
    return errs


# ------------------------------------------------------------------------------ mamba_ssm
MAMBA_MISSING = ("mamba_ssm is not installed (CPU: scripts/setup.sh --dev installs its Triton "
                 "sources; GPU: pip install -e .[gpu])")


def load_mamba_chunk_scan_combined():
    """``(mamba_chunk_scan_combined, version)`` from mamba_ssm, or ``(None, reason)``.

    A GPU install imports as usual. A CPU install (``MAMBA_SKIP_CUDA_BUILD=TRUE``, as
    ``scripts/setup.sh --dev`` does it) has mamba's Triton sources but not its CUDA
    extensions, which the package ``__init__`` imports; then the Triton module is
    imported from the package folder without running that ``__init__``. Under
    ``TRITON_INTERPRET=1`` every autotuned mamba kernel is pinned to its first config,
    since the autotuner times configs on a GPU (any config computes the same numbers).
    Calls on CPU tensors need :func:`mamba_cpu_shims` around forward and backward.
    """
    import importlib
    import importlib.util
    import os
    import sys

    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):   # ValueError: a module without __spec__ in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, MAMBA_MISSING
    try:
        import mamba_ssm
    except ImportError:            # no CUDA extensions: load the Triton sources alone
        # the package without its __init__, but with its real spec: a later find_spec (another
        # test, another call) sees a proper module, whatever the order tests run in
        sys.modules.pop("mamba_ssm", None)
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["mamba_ssm"] = pkg
        mamba_ssm = pkg
    try:
        combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as e:  # noqa: BLE001 - a broken or incompatible install
        return None, f"mamba_ssm.ops.triton.ssd_combined failed to import: {type(e).__name__}: {e}"
    version = getattr(mamba_ssm, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            version = dist_version("mamba_ssm")
        except PackageNotFoundError:
            version = "unknown"
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        from triton.runtime.autotuner import Autotuner

        for name in ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
                     "ssd_combined"):
            mod = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                    obj.configs = obj.configs[:1]
    return combined.mamba_chunk_scan_combined, version


@contextlib.contextmanager
def mamba_cpu_shims() -> Iterator[None]:
    """What mamba_ssm's host code asks of CUDA, answered for CPU tensors (interpreter runs).

    It enters ``torch.cuda.device(t.device.index)``, which is None for a CPU tensor (torch
    2.13 raises on None), and reads the SM count to size the backward's split grids (an
    H100's 132 here). Neither touches the numbers; CUDA tensors pass through unchanged.
    """
    real_device, real_props = torch.cuda.device, torch.cuda.get_device_properties

    def device(idx):
        return contextlib.nullcontext() if idx is None else real_device(idx)

    def props(d=None):
        if d is not None and torch.device(d).type == "cpu":
            from types import SimpleNamespace
            return SimpleNamespace(multi_processor_count=132, name="cpu (interpreter)")
        return real_props(d)

    with mock.patch.object(torch.cuda, "device", device), \
            mock.patch.object(torch.cuda, "get_device_properties", props):
        yield


def mamba_equivalent(mamba_fn, x, dt, A, B, C, D, dt_bias, chunk_size):
    """Our SSD function computed through ``mamba_chunk_scan_combined``.

    mamba's ``D`` multiplies x, ours the dt-scaled input dt_hat * x; both scan dt_hat * x
    with dt_hat = softplus(dt + dt_bias). So: mamba without D, plus D * dt_hat * x (in
    PyTorch, so gradients reach D, dt and dt_bias through it too).
    """
    y = mamba_fn(x, dt, A, B, C, chunk_size, D=None, dt_bias=dt_bias, dt_softplus=True)
    dt_hat = torch.nn.functional.softplus(dt.float() + dt_bias.float())
    return y + (D.float()[:, None] * dt_hat[..., None] * x.float()).to(y.dtype)


def compare_with_mamba(mamba_fn, shape: SSDShape, chunk_size: int, seed: int, device,
                       dtype=torch.float32, impl=None) -> Errors:
    """``impl`` (default: ssd_chunked_triton) vs mamba_chunk_scan_combined on the same
    inputs: y and all 7 gradients, as relative errors (sum-type ones via their magnitude)."""
    impl = impl or (lambda *a: ssd_chunked_triton(*a, chunk_size=chunk_size))
    ins = ssd_inputs(shape, seed, device, dtype)
    ours = [t.detach().clone().requires_grad_(True) for t in ins]
    theirs = [t.detach().clone().requires_grad_(True) for t in ins]
    dy = _randn(_gen(seed + 1), shape.b, shape.L, shape.H, shape.P, device=device).to(dtype)
    with poison_outputs():
        y = impl(*ours)
        g = torch.autograd.grad(y, ours, dy)
    shims = mamba_cpu_shims() if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with shims:
        y_m = mamba_equivalent(mamba_fn, *theirs, chunk_size=chunk_size)
        g_m = torch.autograd.grad(y_m, theirs, dy)
    names = _SSD_GRADS
    _finite(y=y, **dict(zip(names, g)))
    _finite(y_mamba=y_m, **{f"{n}_mamba": t for n, t in zip(names, g_m)})
    _, terms = _ssd_reference64(ins, dy)
    errs = {"y": rel_err(y, y_m)}
    for n, a, b in zip(names, g, g_m):
        if n in terms:        # a sum over b*L positions: |ours - mamba| / sum |terms|
            scale = terms[n].detach().abs().flatten(0, -2).sum(0).max().item()
            diff = (a.double() - b.double()).abs().max().item()
            errs[n] = diff / scale if scale > 0 else diff      # e.g. dA at L = 1: all terms 0
        else:
            errs[n] = rel_err(a, b)
    return errs
