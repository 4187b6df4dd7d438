"""Foundation tests: the MMM4Rec model against its spec (all on CPU)."""
from __future__ import annotations

import pytest
import torch

from mmm4rec import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig
from mmm4rec.config import ConfigError, from_dict
from mmm4rec.kernels.ssd_ref import ssd_chunked_ref, ssd_quadratic_ref
from mmm4rec.losses import full_softmax_ce, inbatch_softmax_ce


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_cfg(**kw) -> MMM4RecConfig:
    base = dict(hidden_size=32, inner_size=32, d_state=16, n_groups=2, head_dim=16, expand=2,
                chunk_size=8, max_len=12, text_dim=24, image_dim=20, num_items=50,
                dropout_prob=0.0, embedding_drop_prob=0.0, time_dropout_prob=0.0)
    base.update(kw)
    return MMM4RecConfig(**base)


def random_batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_len
    lens = torch.randint(1, L + 1, (b,), generator=g)
    lens[0] = L
    items = torch.randint(1, cfg.num_items + 1, (b, L), generator=g)
    times = torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 1e5, 1) + 1.5e9
    pos = torch.arange(L)
    pad = pos[None] >= lens[:, None]
    items[pad] = 0
    times[pad] = 0
    return {"item_seq": items, "time_seq": times, "item_seq_len": lens,
            "target": torch.randint(1, cfg.num_items + 1, (b,), generator=g),
            "target_time": times.max(1).values + 100.0, "weight": torch.ones(b)}


def with_features(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = model.num_items + 1
    c = model.config
    mask = torch.ones(n, 2)
    mask[0] = 0
    mask[5:10, 1] = 0  # some items have no image
    model.tables.load_features({"text": torch.randn(n, c.text_dim, generator=g),
                                "image": torch.randn(n, c.image_dim, generator=g), "modality_mask": mask})
    return model


def loud_time(model):
    """At the release init the time path is nearly silent (Tanhshrink of N(0, 0.02)
    weights is cubic-small); give its Linear(L, L) layers weight so its effect shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".time.lin" in name and name.endswith("weight"):
                p.normal_(0.0, 1.0)
    return model


# --- parameter counts (spec section 7) -------------------------------------------------
@pytest.mark.parametrize("layers,expected", [(1, 1_999_085), (2, 3_603_378)])
def test_parameter_count_matches_paper(layers, expected):
    model = MMM4Rec(MMM4RecConfig(num_layers=layers, num_items=10))
    assert n_trainable(model) == expected


def test_id_term_adds_two_tables():
    base = n_trainable(MMM4Rec(MMM4RecConfig(num_items=1000)))
    with_id = n_trainable(MMM4Rec(MMM4RecConfig(num_items=1000, use_id=True)))
    assert with_id - base == 2 * (1000 + 1) * 256


def test_frozen_features_are_not_trainable():
    model = MMM4Rec(tiny_cfg())
    assert not model.tables.tables["text"].weight.requires_grad
    assert not model.tables.tables["image"].weight.requires_grad


# --- the algebraic constraint: one TiSSD for both modalities ------------------------------
def test_tissd_is_shared_and_receives_gradients_from_both_branches():
    torch.manual_seed(0)
    model = with_features(MMM4Rec(tiny_cfg(num_layers=2)))
    calls = []
    for layer in model.dense.layers:
        layer.tissd.register_forward_hook(lambda m, i, o: calls.append(id(m)))
    # each layer owns exactly one TiSSD object, called twice (text, then vision)
    batch = random_batch(model.config)
    model.calculate_loss(batch).backward()
    for layer in model.dense.layers:
        assert calls.count(id(layer.tissd)) == 2
    tissd_params = {id(p) for p in model.dense.layers[0].tissd.parameters()}
    owners = [n for n, p in model.named_parameters() if id(p) in tissd_params]
    assert all(n.startswith("dense.layers.0.tissd.") for n in owners)

    def grad_of_tissd(new_text, new_image):
        m = with_features(MMM4Rec(tiny_cfg(num_layers=1)))
        m.load_state_dict(model0.state_dict(), strict=False)
        g = torch.Generator().manual_seed(99)
        for name, fresh in (("text", new_text), ("image", new_image)):
            if fresh:
                w = m.tables.tables[name].weight
                w.data = torch.randn(w.shape, generator=g)
        m.calculate_loss(batch).backward()
        return m.dense.layers[0].tissd.in_proj.weight.grad.clone()

    torch.manual_seed(1)
    model0 = with_features(MMM4Rec(tiny_cfg(num_layers=1)))
    g = grad_of_tissd(False, False)
    assert g.abs().sum() > 0
    # new image features alone change the TiSSD gradient (the vision branch reaches it),
    # and so do new text features alone (the text branch reaches it)
    assert not torch.allclose(g, grad_of_tissd(False, True))
    assert not torch.allclose(g, grad_of_tissd(True, False))


# --- quadratic vs chunked SSD ---------------------------------------------------------------
def _ssd_inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 4, (1,), generator=g))
    L = int(torch.randint(2, 70, (1,), generator=g))
    G = int(torch.randint(1, 3, (1,), generator=g))
    H = G * int(torch.randint(1, 3, (1,), generator=g))
    P = int(torch.randint(2, 9, (1,), generator=g))
    S = int(torch.randint(2, 9, (1,), generator=g))
    Q = int(torch.randint(2, 33, (1,), generator=g))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ts = [r(b, L, H, P), r(b, L, H), -torch.rand(H, generator=g, dtype=dtype) * 2 - 0.1,
          r(b, L, G, S), r(b, L, G, S), r(H), r(H)]
    return [t.requires_grad_() for t in ts], Q


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("seed", range(6))
def test_quadratic_and_chunked_ssd_agree(dtype, tol, seed):
    inputs, Q = _ssd_inputs(dtype, seed)
    L = inputs[0].shape[1]
    y1 = ssd_quadratic_ref(*inputs)
    y2 = ssd_chunked_ref(*inputs, chunk_size=Q)
    scale = y1.abs().max().clamp(min=1)
    assert ((y1 - y2).abs().max() / scale) < tol, f"L={L} Q={Q}"
    gy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, inputs, gy)
    g2 = torch.autograd.grad(y2, inputs, gy)
    for name, a, c in zip(["x", "dt", "A", "B", "C", "D", "dt_bias"], g1, g2):
        assert ((a - c).abs().max() / a.abs().max().clamp(min=1)) < tol * 10, name


def test_chunked_ssd_length_not_multiple_of_chunk_in_model():
    torch.manual_seed(0)
    m1 = with_features(MMM4Rec(tiny_cfg(max_len=13, chunk_size=4)))
    m2 = with_features(MMM4Rec(tiny_cfg(max_len=13, chunk_size=4, ssd_form="quadratic")))
    m2.load_state_dict(m1.state_dict())
    batch = random_batch(m1.config)
    assert torch.allclose(m1.user_vectors(batch), m2.user_vectors(batch), atol=1e-5)


# --- padding and the protocol flags -----------------------------------------------------------
def test_positions_after_last_item_do_not_change_user_vector():
    torch.manual_seed(0)
    model = loud_time(with_features(MMM4Rec(tiny_cfg(num_layers=2))).eval())
    batch = random_batch(model.config, b=6)
    u = model.user_vectors(batch)
    garbage = {k: v.clone() for k, v in batch.items()}
    L = model.config.max_len
    pad = torch.arange(L)[None] >= batch["item_seq_len"][:, None]
    garbage["item_seq"][pad] = torch.randint(1, 50, (int(pad.sum()),))
    garbage["time_seq"][pad] = torch.rand(int(pad.sum()), dtype=torch.float64) * 1e9
    garbage["target_time"] = batch["target_time"] * 3
    assert torch.allclose(u, model.user_vectors(garbage), atol=1e-6)


def test_time_leak_flag_reproduces_the_release_quirk():
    torch.manual_seed(0)
    model = loud_time(with_features(MMM4Rec(tiny_cfg(time_leak=True))).eval())
    batch = random_batch(model.config, b=6)
    moved = dict(batch, target_time=batch["target_time"] + 7e6)
    short = batch["item_seq_len"] < model.config.max_len
    diff = (model.user_vectors(batch) - model.user_vectors(moved)).abs().sum(1)
    assert (diff[short] > 1e-6).all()          # the target's time leaks into short histories
    assert (diff[~short] < 1e-6).all()


def test_padding_item_is_not_ranked_by_default():
    model = with_features(MMM4Rec(tiny_cfg())).eval()
    scores = model.full_sort_predict(random_batch(model.config))
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    leak = with_features(MMM4Rec(tiny_cfg(rank_padding=True))).eval()
    assert torch.isfinite(leak.full_sort_predict(random_batch(leak.config))).all()


def test_missing_image_contributes_nothing_to_item_vector():
    model = with_features(MMM4Rec(tiny_cfg(missing_modality="zero"))).eval()
    rows = model.tables(torch.tensor([6]))   # item 6 has no image
    e_t = torch.nn.functional.normalize(model.dense.adapt(rows, 0), dim=-1)
    v = model.item_vectors(torch.tensor([6]))
    assert torch.allclose(v, e_t / model.config.temperature, atol=1e-6)


@pytest.mark.parametrize("fusion", ["static", "dynamic_shared", "dynamic_instance"])
@pytest.mark.parametrize("use_id", [False, True])
def test_fusion_modes_and_id_term_train(fusion, use_id):
    torch.manual_seed(0)
    model = with_features(MMM4Rec(tiny_cfg(item_mm_fusion=fusion, use_id=use_id)))
    batch = random_batch(model.config)
    for loss in ("full", "inbatch"):
        value = model.calculate_loss(batch, loss)
        value.backward()
        assert torch.isfinite(value)
    if use_id:  # the ID term starts at zero and gets gradients
        assert model.tables.tables["id_text"].weight.grad.abs().sum() > 0


def test_bf16_autocast_forward_and_backward():
    """MMM4Rec under bf16 autocast (train.precision: bf16; CPU autocast here): the loss
    tracks fp32 and every gradient is finite. The Fourier filter's torch.fft path takes
    no bf16, so the dispatcher computes both ops in fp32 (tests/test_kernels_dispatch.py)."""
    torch.manual_seed(0)
    model = loud_time(with_features(MMM4Rec(tiny_cfg(max_len=20, chunk_size=8))))
    batch = random_batch(model.config, b=8)
    ref = model.calculate_loss(batch, "full")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.calculate_loss(batch, "full")
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert loss.item() != ref.item()                     # bf16 matmuls did run
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- losses ------------------------------------------------------------------------------------
def test_chunked_full_softmax_equals_dense():
    torch.manual_seed(0)
    u = torch.randn(5, 8, requires_grad=True)
    V = torch.randn(37, 8, requires_grad=True)
    t = torch.randint(1, 37, (5,))
    w = torch.tensor([1.0, 1, 0, 1, 1])
    a = full_softmax_ce(u, V, t, w)
    b = full_softmax_ce(u, V, t, w, chunk_size=6)
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a, (u, V))
    gb = torch.autograd.grad(b, (u, V))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def test_inbatch_ce_ignores_padding_rows():
    torch.manual_seed(0)
    u, V = torch.randn(4, 8), torch.randn(4, 8)
    w = torch.tensor([1.0, 1.0, 1.0, 0.0])
    expect = torch.nn.functional.cross_entropy(u[:3] @ V[:3].T, torch.arange(3))
    assert torch.allclose(inbatch_softmax_ce(u, V, w), expect, atol=1e-6)


# --- config validation -----------------------------------------------------------------------
@pytest.mark.parametrize("data,needle", [
    ({"hiden_size": 64}, "hiden_size: unknown key (did you mean 'hidden_size'"),
    ({"hidden_size": "big"}, "hidden_size: expected an integer"),
    ({"hidden_size": 100, "head_dim": 64}, "head_dim: hidden_size*expand = 200 is not divisible"),
    ({"n_groups": 3}, "n_groups"),
    ({"item_mm_fusion": "mean"}, "item_mm_fusion: must be one of"),
    ({"dropout_prob": 1.5}, "dropout_prob"),
])
def test_config_validation_names_the_field(data, needle):
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(MMM4RecConfig, data)
    assert needle in str(e.value)


def test_yaml_config_errors_name_the_file(tmp_path):
    from mmm4rec.config import load_yaml

    p = tmp_path / "m.yaml"
    p.write_text("hidden_size: 64\nexpand: 3\nhead_dim: 64\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(MMM4RecConfig, p)
    assert str(p) in str(e.value) and "bogus" in str(e.value)


# --- export ------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = with_features(MMM4Rec(tiny_cfg(use_id=True))).eval()
    model.save_pretrained(tmp_path / "exp")
    assert not any(k.startswith("tables") for k in model.transferable_state_dict())
    loaded = with_features(MMM4Rec.from_pretrained(tmp_path / "exp", use_id=False)).eval()
    batch = random_batch(model.config)
    ref = with_features(MMM4Rec(tiny_cfg(use_id=False))).eval()
    ref.dense.load_state_dict(model.dense.state_dict())
    assert torch.equal(loaded.full_sort_predict(batch), ref.full_sort_predict(batch))
    with pytest.raises(ConfigError, match="adapter.text.weight"):
        MMM4Rec.from_pretrained(tmp_path / "exp", text_dim=99)


def test_export_without_missing_modality_keeps_the_zero_it_was_trained_with(tmp_path):
    import json

    MMM4Rec(tiny_cfg()).save_pretrained(tmp_path / "exp")
    head = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert head["config"]["missing_modality"] == "bias"          # today's default, written out
    del head["config"]["missing_modality"]                       # as exports before the field had it
    (tmp_path / "exp" / "config.json").write_text(json.dumps(head))
    assert MMM4Rec.from_pretrained(tmp_path / "exp").config.missing_modality == "zero"


def test_sasrec_contract():
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=50, max_len=12, dropout_prob=0.0, attn_dropout_prob=0.0)
    model = SASRec(cfg).eval()
    batch = random_batch(tiny_cfg())
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, 51) and torch.isinf(scores[:, 0]).all()
    u = model.user_vectors(batch)
    garbage = dict(batch, item_seq=batch["item_seq"].clone())
    pad = torch.arange(12)[None] >= batch["item_seq_len"][:, None]
    garbage["item_seq"][pad] = 7
    assert torch.allclose(u, model.user_vectors(garbage), atol=1e-5)
    model.train()
    assert torch.isfinite(model.calculate_loss(batch))


@pytest.mark.parametrize("channels_last", [True, False])
def test_causal_conv_equals_torch_conv1d(channels_last):
    from mmm4rec.models.layers import CausalDepthwiseConv

    torch.manual_seed(0)
    m = CausalDepthwiseConv(12, 4, channels_last=channels_last)
    x = torch.randn(3, 17, 12, requires_grad=True)
    inp = x if channels_last else x.transpose(1, 2)
    ref = torch.nn.functional.silu(m.conv(x.transpose(1, 2))[..., :17])
    ref = ref.transpose(1, 2) if channels_last else ref
    assert torch.allclose(m(inp), ref, atol=1e-6)
    g1 = torch.autograd.grad(m(inp).sum(), m.conv.weight)[0]
    g2 = torch.autograd.grad(ref.sum(), m.conv.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_kernels_field_scopes_the_backend(monkeypatch):
    from mmm4rec.kernels import dispatch

    seen = []
    original = dispatch._ssd_reference
    monkeypatch.setattr(dispatch, "_ssd_reference", lambda *a: seen.append(dispatch.get_backend()) or original(*a))
    model = with_features(MMM4Rec(tiny_cfg(kernels="reference"))).eval()
    model.user_vectors(random_batch(model.config))
    assert seen and set(seen) == {"reference"}
    assert dispatch.get_backend() == "auto"      # restored after the forward


def test_models_implement_the_contract_and_the_batch_type():
    """SeqRecModel answers mmm4rec.contract.RecModel; a dict batch and a Batch give the
    same vectors; item_vectors of a range / in chunks = the rows of all item vectors."""
    from mmm4rec.contract import Batch, RecModel

    torch.manual_seed(0)
    for model in (with_features(MMM4Rec(tiny_cfg())).eval(),
                  SASRec(SASRecConfig(num_items=50, max_len=12, dropout_prob=0.0, attn_dropout_prob=0.0)).eval()):
        assert isinstance(model, RecModel)
        d = random_batch(tiny_cfg())
        b = Batch.of(d)
        assert set(b) == set(d) and b.user is None and torch.equal(b["target"], d["target"])
        assert torch.equal(model.user_vectors(b), model.user_vectors(d))
        # equal up to fp32 rounding: MMM4Rec's last layer multiplies b rows (one per user,
        # docs/model.md "The CPU training step"), and BLAS sums a 2-row product in another order
        torch.testing.assert_close(model.user_vectors(b.rows(slice(1, 3))), model.user_vectors(d)[1:3],
                                   rtol=1e-5, atol=1e-6)
        V = model.item_vectors()
        assert V.shape[0] == 51
        assert torch.allclose(model.item_vectors(torch.arange(10, 30)), V[10:30], atol=1e-6)
        assert torch.allclose(model.item_vectors(chunk_size=7), V, atol=1e-6)


def test_loss_is_reduced_by_the_normaliser_given():
    """One loss path: value = sum(weight * CE) / normaliser (default: this batch's weight
    sum), for both kinds; padding rows (weight 0) count in neither."""
    torch.manual_seed(0)
    model = with_features(MMM4Rec(tiny_cfg())).eval()
    batch = random_batch(model.config, b=6)
    batch["weight"] = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    for kind in ("full", "inbatch"):
        own = model.loss(batch, kind)
        assert float(own.weight) == 4.0
        assert torch.allclose(own.value, own.total / 4.0)
        assert torch.allclose(model.calculate_loss(batch, kind), own.value)
        glob = model.loss(batch, kind, normaliser=torch.tensor(10.0))
        assert torch.allclose(glob.value, own.total / 10.0) and torch.equal(glob.total, own.total)
    with pytest.raises(ValueError, match="loss must be one of"):
        model.loss(batch, "nope")


def test_export_format_detect_entry_point(tmp_path):
    """``python -m mmm4rec.export_format detect PATH`` (what slurm/common.sh calls)."""
    import subprocess
    import sys
    from pathlib import Path

    from mmm4rec.export_format import is_export, read_header

    MMM4Rec(tiny_cfg()).save_pretrained(tmp_path / "exp")
    assert is_export(tmp_path / "exp") and read_header(tmp_path / "exp")["model_type"] == "mmm4rec"
    root = Path(__file__).resolve().parents[1]

    def detect(p):
        return subprocess.run([sys.executable, "-m", "mmm4rec.export_format", "detect", str(p)], cwd=root,
                              capture_output=True, text=True, timeout=120)

    ok = detect(tmp_path / "exp")
    assert ok.returncode == 0 and ok.stdout.strip() == "mmm4rec", ok.stderr
    (tmp_path / "bad").mkdir()
    bad = detect(tmp_path / "bad")
    assert bad.returncode == 1 and bad.stderr.strip().endswith(
        "is not an export (missing config.json; an export is OUTPUT_DIR/export of a run, or the output of "
        "'mmm4rec export')"), bad.stderr
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "model.safetensors").write_text("")
    assert "has no model_type/config" in detect(tmp_path / "bad").stderr


def test_sasrec_input_carries_item_identity():
    """RecBole's init (positions N(0, 0.02) as the item rows): two sequences with different
    items at the same positions differ after the input LayerNorm. With PyTorch's N(0, 1)
    position default the positions drowned the items (relative difference ~0.03) and the
    transfer study's SASRec sat on the popularity plateau (docs/transfer.md)."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=1000, hidden_size=256, max_len=20))
    dense = model.dense
    rows = model.tables.all_rows()["id"]
    pos = dense.pos.weight[None]
    a, b = torch.randint(1, 1001, (2, 64, 20))
    ha, hb = dense.norm(rows[a] + pos), dense.norm(rows[b] + pos)
    rel = ((ha - hb).norm(dim=-1) / ha.norm(dim=-1)).mean().item()
    assert rel > 0.5, rel
    for layer in dense.encoder.layers:
        assert layer.self_attn.in_proj_weight.std().item() < 0.03


# --- time_init: live (issue 28) --------------------------------------------------------------
def _time_grads(init: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = with_features(MMM4Rec(tiny_cfg(time_init=init)))
    model.calculate_loss(random_batch(model.config, b=8), "full").backward()
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        if ".time.lin" in name:   # the time factor's Linear(L, L) layers, both blocks
            branch = name.split(".time.")[0]
            out[branch] = max(out.get(branch, 0.0), p.grad.abs().max().item())
    return out


def test_live_time_init_gives_the_time_factor_a_gradient():
    """At the release init the time factor's Linear layers get ~0 gradient (Tanhshrink of a
    near-zero input: slope x^2); under time_init: live, on the same batch, a gradient five
    orders above it, in the TiSSD and in the TiCoSSD (whose input is the Fourier filter's)."""
    release, live = _time_grads("release"), _time_grads("live")
    assert set(release) == set(live) == {"dense.layers.0.tissd", "dense.layers.0.ticossd"}
    assert max(release.values()) < 1e-7, release
    assert min(live.values()) > 1e-5, live


def test_live_time_init_makes_user_vectors_depend_on_timestamps():
    def moved(init):
        torch.manual_seed(0)
        model = with_features(MMM4Rec(tiny_cfg(time_init=init))).eval()
        batch = random_batch(model.config, b=8)
        other = random_batch(model.config, b=8, seed=1)   # other gaps (a rescaling would not show: LayerNorm)
        warped = type(batch)(**{**batch, "time_seq": batch["time_seq"] + other["time_seq"] * (batch["time_seq"] > 0)})
        return (model.user_vectors(batch) - model.user_vectors(warped)).abs().max().item()

    release, live = moved("release"), moved("live")
    assert release < 1e-5 and live > 1e-4 and live > 100 * release


def test_time_init_default_is_the_release_and_changes_no_parameter_count():
    assert MMM4RecConfig().time_init == "release"
    assert n_trainable(MMM4Rec(MMM4RecConfig(num_items=10, time_init="live"))) == 1_999_085
    torch.manual_seed(0)
    a = MMM4Rec(tiny_cfg())
    torch.manual_seed(0)
    b = MMM4Rec(tiny_cfg(time_init="release"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    from mmm4rec.config import from_dict
    with pytest.raises(ConfigError, match="time_init: must be one of"):
        from_dict(MMM4RecConfig, {"time_init": "alive"})
