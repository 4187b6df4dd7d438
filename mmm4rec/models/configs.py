"""Typed model configs. Field names reuse the authors' config names where they exist."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError

FusionMode = Literal["static", "dynamic_shared", "dynamic_instance"]


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{name}: must be in [0, 1), got {p}")


@dataclass
class MMM4RecConfig:
    """MMM4Rec hyper-parameters (spec ``docs`` section 7 defaults: the paper's sizes)."""

    # widths
    hidden_size: int = 256          # N
    inner_size: int = 256           # F, FFN inner width
    num_layers: int = 1
    d_state: int = 64               # S
    n_groups: int = 8               # G (groups of B and C)
    d_conv: int = 4                 # K, depth-wise causal conv width
    expand: int = 2                 # E = expand * N
    head_dim: int = 64              # P, so H = E / P
    chunk_size: int = 64            # Q of the chunked SSD scan
    max_len: int = 20               # L, baked into Linear(L, L), LayerNorm(L), L/2+1 bins
    # regularisation
    dropout_prob: float = 0.4
    embedding_drop_prob: float = 0.4
    time_dropout_prob: float = 0.4
    norm_eps: float = 1e-12
    # scoring
    temperature: float = 0.8
    item_mm_fusion: FusionMode = "static"
    # switches
    is_time: bool = True            # time-aware SSD (False: plain SSD, no time path)
    is_ffn: bool = True             # FFN after the text TiSSD
    use_id: bool = False            # per-domain item ID term (never transferred)
    # item features
    text_dim: int = 768
    image_dim: int = 768
    num_items: int = 0              # |I| (ids 1..|I|, 0 = padding)
    # protocol flags (defaults fix the release's leaks; True reproduces them)
    time_leak: bool = False         # feed the target's timestamp into the time path
    rank_padding: bool = False      # rank the padding item 0 at evaluation
    # release numerics (docs/model.md "Release-compatible options": each default chosen there by measurement)
    time_padding: Literal["zero", "window"] = "zero"   # deltas at padding: "zero" (ours) | "window"
                                    # (release: differences over the whole padded window)
    missing_modality: Literal["zero", "bias"] = "bias"  # item without a modality: "bias" (the release's,
                                    # a zero feature through the adapter; chosen by measurement,
                                    # docs/model.md) | "zero" (adapter output zeroed)
    padding_class: bool = False     # keep item 0 as a (never positive) class of the training softmax
    # implementation
    ssd_form: Literal["chunked", "quadratic"] = "chunked"   # "quadratic": always the O(L^2) dual form
    kernels: Literal["auto", "triton", "reference"] = "auto"  # see mmm4rec.kernels.dispatch
    rmsnorm_eps: float = 1e-12      # gated RMSNorm epsilon: the release passes norm_eps (1e-12)
    init_range: float = 0.02
    time_init: Literal["release", "live"] = "release"   # time branch init (docs/model.md "Live time path"):
                                    # "release" (inert: its factor T ~ 1e-8, ~0 gradient) | "live"
                                    # (lin1/lin2 ~ N(0, 1/L), lin2 bias 1: T = O(0.1) and it learns)

    @property
    def d_inner(self) -> int:
        return self.hidden_size * self.expand

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def n_freq(self) -> int:
        return self.max_len // 2 + 1

    def validate(self) -> None:
        for name in ("hidden_size", "inner_size", "num_layers", "d_state", "n_groups", "d_conv",
                     "expand", "head_dim", "chunk_size", "text_dim", "image_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")
        if self.num_items < 0:
            raise ConfigError(f"num_items: must be >= 0, got {self.num_items}")
        if self.d_inner % self.head_dim:
            raise ConfigError(
                f"head_dim: hidden_size*expand = {self.d_inner} is not divisible by head_dim = {self.head_dim}")
        if self.n_heads % self.n_groups:
            raise ConfigError(
                f"n_groups: the number of heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")
        for name in ("dropout_prob", "embedding_drop_prob", "time_dropout_prob"):
            _check_prob(name, getattr(self, name))
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("norm_eps", "rmsnorm_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass
class SASRecConfig:
    """SASRec (Kang & McAuley 2018), ID-based causal Transformer baseline."""

    hidden_size: int = 64
    inner_size: int = 256
    num_layers: int = 2
    n_heads: int = 2
    max_len: int = 20
    dropout_prob: float = 0.5
    attn_dropout_prob: float = 0.5
    norm_eps: float = 1e-12
    num_items: int = 0
    rank_padding: bool = False
    init_range: float = 0.02

    def validate(self) -> None:
        for name in ("hidden_size", "inner_size", "num_layers", "n_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"n_heads: hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        for name in ("dropout_prob", "attn_dropout_prob"):
            _check_prob(name, getattr(self, name))
