"""Issue 28, items 1-2: what an export carries into fine-tuning.

* A ``use_id: true`` pretraining model's export holds no ID rows (they are per domain):
  a ``use_id: true`` fine-tuning model loaded from it starts them at their init, zeros.
* Whole extra layers are dropped at load (mmm4rec/export_format.py): a 2-layer export
  loads into a 1-layer model with layer 0 equal to the export's layer 0; every other
  mismatch (a partial extra layer, a missing layer) stays an error.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from test_model import random_batch, tiny_cfg, with_features

from mmm4rec import MMM4Rec
from mmm4rec.config import ConfigError
from mmm4rec.export_format import extra_layers, load_compatible


def _trained(cfg, steps: int = 2) -> MMM4Rec:
    torch.manual_seed(0)
    model = with_features(MMM4Rec(cfg))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in range(steps):
        opt.zero_grad()
        model.calculate_loss(random_batch(cfg, b=8, seed=s), "full").backward()
        opt.step()
    return model


def _keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return list(fh.keys())


def test_use_id_export_holds_no_id_rows_and_fine_tuning_starts_them_at_zero(tmp_path):
    model = _trained(tiny_cfg(use_id=True, item_mm_fusion="dynamic_instance"))
    id_rows = model.tables.tables["id_text"].weight
    assert id_rows.abs().sum() > 0                               # trained during pretraining
    model.save_pretrained(tmp_path / "exp")
    keys = _keys(tmp_path / "exp")
    assert keys and not [k for k in keys if "id_" in k or k.startswith("tables") or k == "fusion"]
    # a use_id fine-tuning model on another domain (other item count) loads it; its ID rows start at zero
    ft = MMM4Rec.from_pretrained(tmp_path / "exp", num_items=30)
    assert ft.config.use_id
    for name in ("id_text", "id_image", "fusion"):
        assert torch.equal(ft.tables.tables[name].weight, torch.zeros(31, ft.tables.tables[name].weight.shape[1]))
    assert all(torch.equal(v, model.dense.state_dict()[k]) for k, v in ft.dense.state_dict().items())
    # the train.init_from path (dist/build.py) reads the same, with nothing skipped
    head, state = load_compatible(tmp_path / "exp", "mmm4rec", ft.dense.state_dict())
    assert head["skipped"] == [] and set(state) == set(ft.dense.state_dict())


def test_two_layer_export_loads_layer_0_into_a_one_layer_model(tmp_path, caplog):
    two = _trained(tiny_cfg(num_layers=2))
    two.save_pretrained(tmp_path / "exp")
    one = MMM4Rec(tiny_cfg(num_layers=1))
    with caplog.at_level(logging.WARNING, logger="mmm4rec.export_format"):
        head, state = load_compatible(tmp_path / "exp", "mmm4rec", one.dense.state_dict(), "train.init_from")
    assert head["skipped"] and all(k.startswith("layers.1.") for k in head["skipped"])
    assert len(head["skipped"]) == sum(k.startswith("layers.0.") for k in one.dense.state_dict())
    assert "dropped layer(s) [1]" in caplog.text
    one.dense.load_state_dict(state)                               # strict: every tensor of the model
    ref = two.dense.state_dict()
    for k, v in one.dense.state_dict().items():
        assert torch.equal(v, ref[k]), k                           # layer 0 (and the rest) = the export's
    # the same rule through from_pretrained
    loaded = MMM4Rec.from_pretrained(tmp_path / "exp", num_layers=1)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.dense.state_dict().items())
    # and through dist's train.init_from loader (its notes name the layer count)
    from dist.build import load_init_from
    from dist.model import build_dense
    dense, _ = build_dense("mmm4rec", tiny_cfg(num_layers=1))
    state, notes = load_init_from(str(tmp_path / "exp"), "mmm4rec", dense)
    assert "num_layers: export 2, this run 1" in notes and not any(k.startswith("layers.1.") for k in state)


def test_only_whole_extra_layers_are_dropped(tmp_path):
    two = _trained(tiny_cfg(num_layers=2), steps=0)
    own1 = MMM4Rec(tiny_cfg(num_layers=1)).dense.state_dict()
    shapes = {k: tuple(v.shape) for k, v in two.dense.state_dict().items()}
    assert extra_layers(own1, shapes) == sorted(k for k in shapes if k.startswith("layers.1."))
    partial = dict(shapes)
    partial.pop(next(k for k in shapes if k.startswith("layers.1.")))
    assert extra_layers(own1, partial) == []                      # not a whole layer: reported, not dropped
    # an export with fewer layers than the model is still an error (layer 1 missing)
    MMM4Rec(tiny_cfg(num_layers=1)).save_pretrained(tmp_path / "one")
    with pytest.raises(ConfigError, match=r"layers\.1\..*missing in the export"):
        load_compatible(tmp_path / "one", "mmm4rec", two.dense.state_dict())
    # any other unexpected tensor is still refused
    from safetensors.torch import save_file
    MMM4Rec(tiny_cfg(num_layers=2)).save_pretrained(tmp_path / "odd")
    from safetensors.torch import load_file
    st = load_file(str(tmp_path / "odd" / "model.safetensors"))
    save_file({**st, "extra.weight": torch.zeros(2)}, str(tmp_path / "odd" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"extra\.weight: not in the model"):
        load_compatible(tmp_path / "odd", "mmm4rec", own1)
