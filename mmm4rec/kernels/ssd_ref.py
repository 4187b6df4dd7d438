"""PyTorch reference of the SSD (state space duality) computation, two forms.

This is the twin every Triton SSD kernel is tested against (spec section 4 step 5).
Shapes (b batch, L length, H heads, P head dim, G groups, S state size, Q chunk):

    x       [b, L, H, P]   input of the scan (conv + SiLU output), NOT yet dt-scaled
    dt      [b, L, H]      step size BEFORE softplus (already time-scaled: dt * T^T)
    A       [H]            negative decay rate per head (A = -exp(A_log))
    B, C    [b, L, G, S]   input/output projections, shared by the H/G heads of a group
    D       [H]            skip weight, applied to the dt-scaled input (release)
    dt_bias [H]            added inside the softplus (release)
    returns y [b, L, H, P]

With dt_hat = softplus(dt + dt_bias) and u = dt_hat * x (the dt-scaled input):

    y_t = sum_{s<=t} (C_t . B_s) exp(sum_{k=s+1..t} A dt_hat_k) u_s  +  D u_t

``ssd_quadratic_ref`` builds the L x L matrix (the dual, attention-like form);
``ssd_chunked_ref`` is Mamba-2's chunked scan in four stages, linear in L, which is
what the Triton kernels implement stage by stage (see ``ssd_chunk_cumsum``,
``ssd_chunk_state``, ``ssd_state_passing``, ``ssd_chunk_scan``). Any length works:
the tail of the last chunk is padded with dt_hat = 0, which is causal-safe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ssd_quadratic_ref",
    "ssd_quadratic_folded",
    "ssd_chunked_ref",
    "ssd_chunked_folded",
    "ssd_rows_ref",
    "ssd_chunk_cumsum_ref",
    "ssd_chunk_state_ref",
    "ssd_state_passing_ref",
    "ssd_chunk_scan_ref",
]


def _expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[b, L, G, S] -> [b, L, H, S] (each group serves H/G consecutive heads); the input
    itself when G == H (no copy)."""
    g = t.shape[2]
    if nheads % g:
        raise ValueError(f"heads ({nheads}) must be a multiple of groups ({g})")
    if g == nheads:
        return t
    return t.repeat_interleave(nheads // g, dim=2)


def ssd_quadratic_ref(x, dt, A, B, C, D, dt_bias):
    """Dual (quadratic, O(L^2)) form. Shapes in the module docstring."""
    bsz, L, H, P = x.shape
    dt_hat = F.softplus(dt + dt_bias)                       # [b, L, H]
    u = x * dt_hat.unsqueeze(-1)                            # [b, L, H, P]
    Bh, Ch = _expand_groups(B, H), _expand_groups(C, H)     # [b, L, H, S]
    cum = torch.cumsum(dt_hat * A, dim=1)                   # [b, L, H]
    seg = cum.unsqueeze(2) - cum.unsqueeze(1)               # [b, t, s, H] = cum_t - cum_s
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, :, :, None], float("-inf")))
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay  # [b, t, s, H]
    y = torch.einsum("btsh,bshp->bthp", scores, u)
    return y + D[None, None, :, None] * u


def ssd_quadratic_folded(x, dt, A, B, C, D, dt_bias):
    """:func:`ssd_quadratic_ref` with the per-step factors folded into the [b, H, L, L]
    matrix: y_t = sum_s M_ts x_s, M_ts = (C_t . B_s) exp(cum_t - cum_s) dt_s + [t = s] D dt_t.
    Same values; the dt scaling and the skip term act on the L x L matrix instead of the
    [b, L, H, P] input (no u = dt * x, no D * u, fewer passes over the largest tensor),
    and the products run head-major. The CPU path for sequences within one chunk
    (tests/test_model_fast_path.py::test_folded_dual_form_equals_quadratic_ref)."""
    bsz, L, H, P = x.shape
    dt_hat = F.softplus(dt + dt_bias).transpose(1, 2)                  # [b, H, L]
    Bh, Ch = _expand_groups(B, H), _expand_groups(C, H)                # [b, L, H, S]
    cum = torch.cumsum(dt_hat * A[:, None], dim=-1)                    # [b, H, L]
    seg = cum.unsqueeze(-1) - cum.unsqueeze(-2)                        # [b, H, t, s] = cum_t - cum_s
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = torch.matmul(Ch.transpose(1, 2), Bh.permute(0, 2, 3, 1))  # [b, H, t, s] = C_t . B_s
    M = scores * decay * dt_hat.unsqueeze(-2) + torch.diag_embed(D[:, None] * dt_hat)
    return torch.matmul(M, x.transpose(1, 2)).transpose(1, 2)         # [b, L, H, P]


def ssd_rows_ref(x, dt, A, B, C_rows, D, dt_bias, rows):
    """The SSD output at chosen positions only: ``rows`` [b] or [b, R] (int64, positions),
    ``C_rows`` = C at those positions ([b, G, S] or [b, R, G, S]) -> [b, H, P] or [b, R, H, P].

    Rows of :func:`ssd_quadratic_ref` (hence of the chunked scan) in O(L) each:
    y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s + D dt_t x_t. The model's last
    layer needs nothing else: the loss reads one position (tests/test_model_fast_path.py::
    test_ssd_rows_equal_quadratic_rows, test_last_position_path_equals_full_path)."""
    one = rows.dim() == 1
    if one:
        rows, C_rows = rows[:, None], C_rows[:, None]
    bsz, L, H, P = x.shape
    ar = torch.arange(bsz, device=x.device)[:, None]
    dt_hat = F.softplus(dt + dt_bias)                               # [b, L, H]
    cum = torch.cumsum(dt_hat * A, dim=1)                           # [b, L, H]
    seg = cum[ar, rows].unsqueeze(2) - cum.unsqueeze(1)             # [b, R, s, H] = cum_t - cum_s
    causal = torch.arange(L, device=x.device)[None, None, :] <= rows[..., None]   # [b, R, s]
    decay = torch.exp(seg.masked_fill(~causal[..., None], float("-inf")))
    cb = torch.einsum("brgn,bsgn->brsg", C_rows, B)                # [b, R, s, G]
    if cb.shape[-1] != H:
        cb = cb.repeat_interleave(H // cb.shape[-1], dim=-1)        # [b, R, s, H]
    y = torch.einsum("brsh,bshp->brhp", cb * decay * dt_hat.unsqueeze(1), x)
    y = y + (D * dt_hat[ar, rows]).unsqueeze(-1) * x[ar, rows]
    return y[:, 0] if one else y


def ssd_chunk_cumsum_ref(dt, A, dt_bias, chunk_size):
    """Stage 1. dt [b, L, H] -> dt_hat [b, H, c, Q] and dA_cumsum [b, H, c, Q].

    c = ceil(L / Q); the padded tail has dt_hat = 0 (so it neither decays nor adds).
    """
    bsz, L, H = dt.shape
    nchunks = -(-L // chunk_size)
    dt_hat = F.softplus(dt + dt_bias)
    dt_hat = F.pad(dt_hat, (0, 0, 0, nchunks * chunk_size - L))
    dt_hat = dt_hat.reshape(bsz, nchunks, chunk_size, H).permute(0, 3, 1, 2)
    return dt_hat, torch.cumsum(dt_hat * A[None, :, None, None], dim=-1)


def _chunk(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[b, L, ...] -> [b, c, Q, ...] with zero padding of the tail."""
    L = t.shape[1]
    nchunks = -(-L // chunk_size)
    pad = [0, 0] * (t.dim() - 2) + [0, nchunks * chunk_size - L]
    t = F.pad(t, pad)
    return t.reshape(t.shape[0], nchunks, chunk_size, *t.shape[2:])


def ssd_chunk_state_ref(x, B, dt_hat, dA_cumsum):
    """Stage 2. The state each chunk would hand on if it started from zero.

    x [b, c, Q, H, P], B [b, c, Q, H, S], dt_hat / dA_cumsum [b, H, c, Q]
    -> states [b, c, H, P, S]
    """
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)          # [b, H, c, Q]
    w = (decay_to_end * dt_hat).permute(0, 2, 3, 1)                    # [b, c, Q, H]
    return torch.einsum("bcqhn,bcqh,bcqhp->bchpn", B, w, x)


def ssd_state_passing_ref(states, dA_cumsum):
    """Stage 3. Recurrence over chunks (linear in the number of chunks).

    states [b, c, H, P, S], dA_cumsum [b, H, c, Q]
    -> prev_states [b, c, H, P, S]: the state entering each chunk.
    """
    chunk_decay = torch.exp(dA_cumsum[..., -1])                        # [b, H, c]
    running = torch.zeros_like(states[:, 0])
    out = []
    for c in range(states.shape[1]):
        out.append(running)
        running = running * chunk_decay[:, :, c, None, None] + states[:, c]
    return torch.stack(out, dim=1)


def ssd_chunk_scan_ref(x, B, C, dt_hat, dA_cumsum, prev_states, D):
    """Stage 4. Output = intra-chunk (quadratic within Q) + carried-in state + skip.

    x [b, c, Q, H, P], B/C [b, c, Q, H, S], dt_hat/dA_cumsum [b, H, c, Q],
    prev_states [b, c, H, P, S], D [H] -> y [b, c, Q, H, P]
    """
    Q = x.shape[2]
    u = x * dt_hat.permute(0, 2, 3, 1).unsqueeze(-1)                  # [b, c, Q, H, P]
    seg = dA_cumsum.unsqueeze(-1) - dA_cumsum.unsqueeze(-2)            # [b, H, c, t, s]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bcthn,bcshn->bhcts", C, B) * decay
    y = torch.einsum("bhcts,bcshp->bcthp", scores, u)
    y_off = torch.einsum("bcthn,bchpn->bcthp", C, prev_states)
    y_off = y_off * torch.exp(dA_cumsum).permute(0, 2, 3, 1).unsqueeze(-1)
    return y + y_off + D[None, None, None, :, None] * u


def ssd_chunked_ref(x, dt, A, B, C, D, dt_bias, chunk_size: int = 64):
    """Chunked scan (linear in L); equals ``ssd_quadratic_ref``. Shapes in module doc."""
    bsz, L, H, P = x.shape
    chunk_size = min(chunk_size, L)   # a chunk longer than the sequence only adds padding
    dt_hat, dA_cumsum = ssd_chunk_cumsum_ref(dt, A, dt_bias, chunk_size)
    xc = _chunk(x, chunk_size)
    Bc = _chunk(_expand_groups(B, H), chunk_size)
    Cc = _chunk(_expand_groups(C, H), chunk_size)
    states = ssd_chunk_state_ref(xc, Bc, dt_hat, dA_cumsum)
    prev = ssd_state_passing_ref(states, dA_cumsum)
    y = ssd_chunk_scan_ref(xc, Bc, Cc, dt_hat, dA_cumsum, prev, D)
    return y.reshape(bsz, -1, H, P)[:, :L]


def ssd_chunked_folded(x, dt, A, B, C, D, dt_bias, chunk_size: int = 64):
    """:func:`ssd_chunked_ref` computed head-major, with the step sizes and the skip term
    folded into each chunk's Q x Q matrix as in :func:`ssd_quadratic_folded` (the four
    stages in one function; same values). The CPU path for sequences longer than one
    chunk (tests/test_model_fast_path.py::test_folded_chunked_scan_equals_references)."""
    bsz, L, H, P = x.shape
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    dt_hat = F.softplus(dt + dt_bias)                                  # [b, L, H]
    Bh, Ch = _expand_groups(B, H), _expand_groups(C, H)                # [b, L, H, S]
    if pad:   # dt_hat = 0 in the tail: it neither decays nor adds
        dt_hat = F.pad(dt_hat, (0, 0, 0, pad))
        x, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bh, Ch))
    S = Bh.shape[-1]
    dth = dt_hat.reshape(bsz, nc, Q, H).permute(0, 3, 1, 2)            # [b, H, c, Q]
    xh = x.reshape(bsz, nc, Q, H, P).permute(0, 3, 1, 2, 4)            # [b, H, c, Q, P]
    Bc = Bh.reshape(bsz, nc, Q, H, S).permute(0, 3, 1, 2, 4)           # [b, H, c, Q, S]
    Cc = Ch.reshape(bsz, nc, Q, H, S).permute(0, 3, 1, 2, 4)
    cum = torch.cumsum(dth * A[:, None, None], dim=-1)                 # [b, H, c, Q]
    # within each chunk: M_ts = (C_t . B_s) exp(cum_t - cum_s) dt_s + [t = s] D dt_t
    seg = cum.unsqueeze(-1) - cum.unsqueeze(-2)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    M = torch.matmul(Cc, Bc.transpose(-1, -2)) * decay * dth.unsqueeze(-2) + torch.diag_embed(D[:, None, None] * dth)
    y = torch.matmul(M, xh)                                            # [b, H, c, Q, P]
    # the state each chunk hands on from zero: sum_s exp(cum_end - cum_s) dt_s x_s B_s^T
    w = torch.exp(cum[..., -1:] - cum) * dth                           # [b, H, c, Q]
    states = torch.matmul((xh * w.unsqueeze(-1)).transpose(-1, -2), Bc)   # [b, H, c, P, S]
    chunk_decay = torch.exp(cum[..., -1])                              # [b, H, c]
    running = torch.zeros_like(states[:, :, 0])
    prev = []
    for k in range(nc):
        prev.append(running)
        running = running * chunk_decay[:, :, k, None, None] + states[:, :, k]
    prev_states = torch.stack(prev, dim=2)                             # [b, H, c, P, S]: entering each chunk
    y = y + torch.matmul(Cc, prev_states.transpose(-1, -2)) * torch.exp(cum).unsqueeze(-1)
    return y.permute(0, 2, 3, 1, 4).reshape(bsz, nc * Q, H, P)[:, :L]
