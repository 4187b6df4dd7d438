"""MMM4Rec (spec ``mmm4rec-model.md`` sections 1-6).

b batch, L = max_len, N hidden, H heads, d_t / d_v text / image feature dims.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import fourier_filter, use_backend
from .base import SeqInput, SeqRecModel, TableSpec
from .configs import MMM4RecConfig
from .layers import ComplexLinear, Dropout, FeedForward, TimeBranch
from .packing import DENSE, Dense, Packed
from .tissd import TiCoSSD, TiSSD, init_weights

MODALITIES = ("text", "image")


def live_time_init(branch: TimeBranch, L: int) -> None:
    """``time_init: live`` (docs/model.md "Live time path"): the two Linear(L, L) of the
    time branch ~ N(0, 1/L) (variance-preserving over the length axis, instead of
    N(0, init_range^2)) and lin2's bias 1, so that Tanhshrink works near x = 1
    (Tanhshrink(1) = 0.24, slope tanh(1)^2 = 0.58) instead of near 0 (x^3/3, slope x^2)."""
    with torch.no_grad():
        for lin in (branch.lin1, branch.lin2):
            nn.init.normal_(lin.weight, 0.0, L ** -0.5)
            nn.init.zeros_(lin.bias)
        nn.init.ones_(branch.lin2.bias)


def live_filter_init(cl: ComplexLinear, F: int) -> None:
    """``time_init: live``: the Fourier filter's complex maps ~ N(0, 1/(2F)) per real part
    (variance-preserving: each output sums 2F products), zero bias, so that the cross
    block's time signal d_f = CL_c(CL_a(F_v) F_v + CL_b(F_t) F_t) is O(1) like its
    inputs instead of O(init_range^2)."""
    with torch.no_grad():
        for lin in (cl.real, cl.imag):
            nn.init.normal_(lin.weight, 0.0, (2 * F) ** -0.5)
            nn.init.zeros_(lin.bias)


class MMM4RecLayer(nn.Module):
    """TiSSDLayer (text, with FFN) + vision branch on the SAME TiSSD + filter + TiCoSSDLayer."""

    def __init__(self, cfg: MMM4RecConfig):
        super().__init__()
        self.cfg = cfg
        N, eps = cfg.hidden_size, cfg.norm_eps
        self.tissd = TiSSD(cfg)                       # shared by both branches
        self.drop = Dropout(cfg.dropout_prob)
        self.norm_t = nn.LayerNorm(N, eps=eps)
        self.ffn_t = FeedForward(N, cfg.inner_size, cfg.dropout_prob, eps) if cfg.is_ffn else None
        self.norm_v = nn.LayerNorm(N, eps=eps)
        # dual-channel Fourier adaptive filter
        self.cl_a = ComplexLinear(cfg.n_freq)
        self.cl_b = ComplexLinear(cfg.n_freq)
        self.cl_c = ComplexLinear(cfg.n_freq)
        self.ticossd = TiCoSSD(cfg)
        self.norm_c = nn.LayerNorm(N, eps=eps)
        self.ffn_c = FeedForward(N, cfg.inner_size, cfg.dropout_prob, eps)

    def forward(self, x_t, x_v, d_t, d_v, rows: torch.Tensor | None = None, lay: Dense | Packed = DENSE):
        """x_t, x_v [b, L, N] (``lay`` packed: [T, N]); d_t, d_v [b, H, L] (None when is_time is off).

        ``rows`` [b] given (the last layer: the user vector reads one position), the
        returned vision stream is that position's only, [b, N]: the vision branch's output
        is computed at the K = d_conv positions up to it (all the cross block's C reads),
        the cross block's gate, scan output, norms and FFN there alone (same values and
        gradients, tests/test_model_fast_path.py::test_last_position_path_equals_full_path)."""
        y_t, d_t2 = self.tissd(x_t, d_t, lay=lay)
        p_t = self.norm_t(self.drop(y_t, lay) + x_t)
        if self.ffn_t is not None:
            p_t = self.ffn_t(p_t, lay)
        win = valid = None
        x_v_res = x_v
        if rows is not None:
            win = rows[:, None] - (self.cfg.d_conv - 1) + torch.arange(self.cfg.d_conv, device=rows.device)
            valid = win >= 0
            win = win.clamp(min=0)
            x_v_res = lay.at(x_v, win)
        y_v, d_v2 = self.tissd(x_v, d_v, win, lay)
        at = lay if rows is None else None                 # at the read rows / window: [b, (K,) N]
        h_v = self.norm_v(self.drop(y_v, at) + x_v_res)
        d_f = None
        if self.cfg.is_time:
            d_f = fourier_filter(d_t2, d_v2, self.cl_a.params(), self.cl_b.params(), self.cl_c.params())
        y = self.ticossd(p_t, h_v, d_f, rows, valid, lay)
        if rows is not None:
            h_v, p_t_rows = h_v[:, -1], lay.at(p_t, rows)
        else:
            p_t_rows = p_t
        y = self.ffn_c(self.norm_c(self.drop(y, at) + h_v + p_t_rows), at)
        return p_t, y, d_t2, d_v2


class MMM4RecDense(nn.Module):
    """The transferable part: adapters, time norm, layers, shared fusion weight.

    forward(seq: SeqInput | None, items: rows | None) -> (u [b, N] | None, V [n, N] | None)
    rows: ``text`` [..., d_t], ``image`` [..., d_v], ``modality_mask`` [..., 2] (1 = present),
    optional ``id_text`` / ``id_image`` [..., N] (ID term) and ``fusion`` [..., 2].
    """

    def __init__(self, cfg: MMM4RecConfig):
        super().__init__()
        self.cfg = cfg
        N = cfg.hidden_size
        self.adapter = nn.ModuleDict({"text": nn.Linear(cfg.text_dim, N), "image": nn.Linear(cfg.image_dim, N)})
        self.emb_drop = Dropout(cfg.embedding_drop_prob)
        self.input_norm = nn.ModuleDict({m: nn.LayerNorm(N, eps=cfg.norm_eps) for m in MODALITIES})
        if cfg.is_time:
            self.time_drop = Dropout(cfg.time_dropout_prob)
            self.time_norm = nn.LayerNorm(cfg.max_len, eps=cfg.norm_eps)   # over the length axis
        self.layers = nn.ModuleList([MMM4RecLayer(cfg) for _ in range(cfg.num_layers)])
        if cfg.item_mm_fusion == "dynamic_shared":
            self.fusion = nn.Parameter(torch.zeros(2))
        self.apply(lambda m: init_weights(m, cfg.init_range))
        if cfg.is_time and cfg.time_init == "live":
            for m in self.modules():
                if isinstance(m, TimeBranch):
                    live_time_init(m, cfg.max_len)
                elif isinstance(m, ComplexLinear):
                    live_filter_init(m, cfg.n_freq)

    # --- items -------------------------------------------------------------------
    def adapt(self, rows: dict[str, torch.Tensor], m: int) -> torch.Tensor:
        """a_m(i) = mask * (W_m f_m(i) + b_m) [+ E_m(i)]: [..., N]. Missing modality -> 0
        (``missing_modality: zero``) or the adapter of a zero feature, b_m (``bias``, the release's)."""
        name = MODALITIES[m]
        mask = rows["modality_mask"][..., m:m + 1]
        if self.cfg.missing_modality == "bias":
            a = self.adapter[name](rows[name] * mask)
        else:
            a = self.adapter[name](rows[name]) * mask
        id_name = f"id_{name}"
        if self.cfg.use_id:
            a = a + rows[id_name]
        return a

    def item_vectors(self, rows: dict[str, torch.Tensor], adapted=None) -> torch.Tensor:
        """V_i = (w_t e_t(i) + w_v e_v(i)) / tau, with e_m = a_m / ||a_m||: [n, N].
        ``adapted``: (a_t, a_v) of these rows when already computed."""
        a_t, a_v = adapted if adapted is not None else (self.adapt(rows, 0), self.adapt(rows, 1))
        e_t = F.normalize(a_t, dim=-1)
        e_v = F.normalize(a_v, dim=-1)
        mode = self.cfg.item_mm_fusion
        if mode == "static":
            v = e_t + e_v
        else:
            logits = self.fusion if mode == "dynamic_shared" else rows["fusion"]
            w = torch.softmax(logits, dim=-1)
            v = w[..., 0:1] * e_t + w[..., 1:2] * e_v
        return v / self.cfg.temperature

    # --- users -------------------------------------------------------------------
    def time_signal(self, seq: SeqInput) -> torch.Tensor:
        """d_1 = 0, d_l = ts_l - ts_{l-1}: [b, L] float32.

        ``time_padding: zero`` (ours): 0 at every padding slot, so the user vector does not
        depend on the padding. ``window`` (the release's): differences over the whole padded
        window, so the first padding slot carries -ts_n (padding timestamps are 0).
        With ``time_leak`` (the release's quirk) the target's timestamp sits in the slot
        after a short history and deltas run over the raw, unmasked sequence.
        """
        t = seq.time_seq.to(torch.float64)
        L = t.shape[1]
        pos = torch.arange(L, device=t.device)
        lens = seq.item_seq_len
        leak = self.cfg.time_leak and seq.target_time is not None
        if leak:
            slot = (pos[None, :] == lens[:, None]) & (lens[:, None] < L)
            t = torch.where(slot, seq.target_time.to(torch.float64)[:, None], t)
        d = torch.diff(t, dim=1, prepend=t[:, :1])
        if not leak and self.cfg.time_padding == "zero":
            d = d * (pos[None, :] < lens[:, None])
        return d.to(torch.float32)

    def user_vectors(self, seq: SeqInput, adapted=None, last_only: bool = True) -> torch.Tensor:
        """u [b, N]. ``adapted``: (a_t, a_v) [|I| + 1, N] of the whole catalog when already
        computed (the sequence's rows are gathered from them by id), else from ``seq.rows``.
        ``last_only``: the last layer computes what the read position needs only (False:
        every position, then the read one is taken; the reference the fast path is tested
        against). In CPU training (grad enabled, ``training``) with ``last_only`` the
        sequence stream is computed at the positions up to the read one only
        (:mod:`.packing`; not on GPUs, where its index sync is not yet measured)."""
        cfg = self.cfg
        L = seq.item_seq.shape[1]
        lay: Dense | Packed = DENSE
        if last_only and self.training and torch.is_grad_enabled() and seq.item_seq.device.type == "cpu":
            lay = Packed(seq.item_seq_len, L)
        if adapted is not None:
            ids = lay.pack(seq.item_seq) if lay.packed else seq.item_seq
            adapted = [a[ids] for a in adapted]
        else:
            seq_rows = {k: lay.pack(v) for k, v in seq.rows.items()} if lay.packed else seq.rows
            adapted = [self.adapt(seq_rows, i) for i in range(len(MODALITIES))]
        x = [self.input_norm[m](self.emb_drop(a, lay)) for m, a in zip(MODALITIES, adapted)]
        d = [None, None]
        if cfg.is_time:
            delta = self.time_signal(seq)
            # each branch its own dropout mask, one LayerNorm over L, repeated per head
            d = [self.time_norm(self.time_drop(delta)).unsqueeze(1).expand(-1, cfg.n_heads, -1).contiguous()
                 for _ in MODALITIES]
        x_t, x_v = x
        last = (seq.item_seq_len - 1).clamp(min=0)
        for i, layer in enumerate(self.layers):
            rows = last if last_only and i == len(self.layers) - 1 else None
            x_t, x_v, d[0], d[1] = layer(x_t, x_v, d[0], d[1], rows, lay)
        return x_v if last_only else x_v[torch.arange(x_v.shape[0], device=x_v.device), last]

    def forward(self, seq: SeqInput | None = None, items: dict[str, torch.Tensor] | None = None,
                seq_rows_from_items: bool = False):
        """(u, V). ``seq_rows_from_items``: ``items`` holds rows 0..|I| of the whole catalog
        in id order, so the sequence's adapter outputs are gathered from the catalog's
        (``seq.rows`` is not read): the adapters run once per step, not twice."""
        adapted_items = None
        if seq is not None and items is not None and seq_rows_from_items:
            adapted_items = (self.adapt(items, 0), self.adapt(items, 1))
        with use_backend(None if self.cfg.kernels == "auto" else self.cfg.kernels):
            u = self.user_vectors(seq, adapted_items) if seq is not None else None
        v = self.item_vectors(items, adapted_items) if items is not None else None
        return u, v


class MMM4Rec(SeqRecModel):
    """MMM4Rec: ``tables`` (frozen features, masks, ID term) + ``dense`` (transferable)."""

    model_type = "mmm4rec"
    gathers_sequence_rows = True      # dense(..., seq_rows_from_items=True), see SeqRecModel.forward
    config_cls = MMM4RecConfig
    dense_cls = MMM4RecDense

    @classmethod
    def table_specs_for(cls, c: MMM4RecConfig) -> list[TableSpec]:
        n = c.num_items + 1
        specs = [TableSpec("text", n, c.text_dim, "feature"),
                 TableSpec("image", n, c.image_dim, "feature"),
                 TableSpec("modality_mask", n, 2, "feature")]
        if c.use_id:   # E_t, E_v: zero-initialised, per domain, never transferred
            specs += [TableSpec("id_text", n, c.hidden_size, "trainable"),
                      TableSpec("id_image", n, c.hidden_size, "trainable")]
        if c.item_mm_fusion == "dynamic_instance":
            specs.append(TableSpec("fusion", n, 2, "trainable"))
        return specs
