"""Where the per-position tensors of a batch live: every position ([b, L, ...], ``DENSE``)
or only the positions the loss can depend on, packed ([T, ...], :class:`Packed`).

Sequences are right-padded and the user vector reads position ``len - 1``; every block of
the sequence stream is causal or per position (projections, norms, FFN, the causal convs,
the SSD scan), and the time path, which mixes positions, is computed separately over the
whole window. So the positions after ``len - 1`` cannot change the user vector nor any
gradient, and the training step computes the per-position products and element-wise work
at the T = sum(len) positions up to it only (``MMM4RecDense.user_vectors``; equal values
and gradients: tests/test_model_fast_path.py::test_packed_tokens_equal_dense_path). The
causal convs and the scan, which need each sequence's positions side by side, run on the
[b, L, ...] grid (:meth:`Packed.grid`, zeros after each sequence) and hand back to the
packed rows (:meth:`Packed.flat`).
"""
from __future__ import annotations

import torch


class _Scatter(torch.autograd.Function):
    """[T, C] rows -> [b * L, C] with zeros elsewhere (backward: the rows' gradients)."""

    @staticmethod
    def forward(ctx, xp, tok, n):
        ctx.save_for_backward(tok)
        return xp.new_zeros(n, xp.shape[-1]).index_copy_(0, tok, xp)

    @staticmethod
    def backward(ctx, g):
        (tok,) = ctx.saved_tensors
        return g.index_select(0, tok), None, None


class _Gather(torch.autograd.Function):
    """[b * L, C] -> its rows ``tok`` [T, C] (backward: zeros elsewhere)."""

    @staticmethod
    def forward(ctx, xg, tok):
        ctx.save_for_backward(tok)
        ctx.n = xg.shape[0]
        return xg.index_select(0, tok)

    @staticmethod
    def backward(ctx, g):
        (tok,) = ctx.saved_tensors
        return g.new_zeros(ctx.n, g.shape[-1]).index_copy_(0, tok, g), None


def _batch_index(pos: torch.Tensor) -> torch.Tensor:
    ar = torch.arange(pos.shape[0], device=pos.device)
    return ar.view(-1, *([1] * (pos.dim() - 1)))


class Dense:
    """Every position: per-position tensors are [b, L, ...] (the identity layout)."""

    packed = False

    @staticmethod
    def grid(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x at positions ``pos`` ([b] or [b, R]) of each sequence: [b, C] / [b, R, C]."""
        return x[_batch_index(pos), pos]


DENSE = Dense()


class Packed:
    """Positions 0..n-1 of each sequence, n = clamp(len, 1, L), in sequence order: [T, ...].

    ``last`` [b] = n - 1, the read position (as ``(len - 1).clamp(min=0)`` for len <= L)."""

    packed = True

    def __init__(self, lengths: torch.Tensor, L: int):
        n = lengths.clamp(1, L)
        self.b, self.L = n.shape[0], L
        keep = torch.arange(L, device=n.device)[None, :] < n[:, None]
        self.tok = keep.reshape(-1).nonzero().squeeze(1)          # [T] indices into b * L
        self.start = torch.cumsum(n, 0) - n                        # [b] first row of each sequence
        self.last = n - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[b, L, ...] -> [T, ...] (plain indexing: any dtype, autograd as usual)."""
        return x.reshape(self.b * self.L, *x.shape[2:])[self.tok]

    def grid(self, xp: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [b, L, C], zeros at the positions not kept."""
        return _Scatter.apply(xp, self.tok, self.b * self.L).view(self.b, self.L, xp.shape[-1])

    def flat(self, xg: torch.Tensor) -> torch.Tensor:
        """[b, L, C] -> [T, C]."""
        return _Gather.apply(xg.reshape(self.b * self.L, xg.shape[-1]), self.tok)

    def at(self, xp: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows at positions ``pos`` ([b] or [b, R], each < n) of each sequence."""
        return xp[self.start.view(-1, *([1] * (pos.dim() - 1))) + pos]
