"""Single-process CPU training on the bundled real sample (Amazon Scientific, MISSRec
multi-modal subset with CLIP text and image features): a few epochs lower the loss and
put HR@10 clearly above a random ranking, for MMM4Rec and for SASRec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_shards import FeatureFile, collate, expand, import_dataset
from mmm4rec import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig
from mmm4rec.evaluate import evaluate
from mmm4rec.metrics import random_ranking_hr

MAX_LEN = 20


@pytest.fixture(scope="module")
def scientific(samples_dir):
    d = samples_dir / "scientific_mm"
    return import_dataset(
        "unisrec", d, name="Scientific", k_core=0,
        text_features=FeatureFile(str(d / "Scientific.feat1CLS"), format="raw", dim=512, encoder="clip-vit-b32-text"),
        image_features=FeatureFile(str(d / "Scientific.feat3CLS"), format="raw", dim=512, encoder="clip-vit-b32-image"))


def batches(data, split, batch_size, seed=None):
    samples = [s for seq in data.sequences for s in expand(seq.user, seq.items, seq.times, split, MAX_LEN)]
    order = np.random.default_rng(seed).permutation(len(samples)) if seed is not None else range(len(samples))
    samples = [samples[i] for i in order]
    return [collate(samples[i:i + batch_size], MAX_LEN) for i in range(0, len(samples), batch_size)]


def popularity_hr10(data) -> float:
    """Test HR@10 of ranking every user by the items' training-target counts."""
    train = [s for seq in data.sequences for s in expand(seq.user, seq.items, seq.times, "train", MAX_LEN)]
    test = [s for seq in data.sequences for s in expand(seq.user, seq.items, seq.times, "test", MAX_LEN)]
    counts = np.bincount([s["target"] for s in train], minlength=data.num_items + 1)
    counts[0] = -1
    top10 = set(np.argsort(-counts, kind="stable")[:10].tolist())
    return float(np.mean([s["target"] in top10 for s in test]))


def fit(model, data, epochs, lr, loss="full"):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    epoch_losses = []
    for epoch in range(epochs):
        model.train()
        losses = []
        for batch in batches(data, "train", 256, seed=epoch):
            opt.zero_grad()
            value = model.calculate_loss(batch, loss)
            value.backward()
            opt.step()
            losses.append(value.item())
        epoch_losses.append(float(np.mean(losses)))
    return epoch_losses


def test_sample_import_matches_provenance(scientific):
    assert scientific.num_items == 1585
    assert scientific.items.image_mask[1:].all() and scientific.items.text_mask[1:].all()
    assert scientific.items.text.shape == (1586, 512)


@pytest.mark.slow
def test_mmm4rec_learns_on_real_sample(scientific):
    torch.manual_seed(2020)
    cfg = MMM4RecConfig(hidden_size=64, inner_size=64, d_state=16, n_groups=2, head_dim=32, max_len=MAX_LEN,
                        text_dim=512, image_dim=512, num_items=scientific.num_items,
                        dropout_prob=0.1, embedding_drop_prob=0.1, time_dropout_prob=0.1)
    model = MMM4Rec(cfg)
    model.set_item_table(scientific.items)
    test = batches(scientific, "test", 512)
    before = evaluate(model, test)
    losses = fit(model, scientific, epochs=3, lr=1e-3)
    after = evaluate(model, test)
    rand = random_ranking_hr(10, scientific.num_items)
    print(f"MMM4Rec losses {losses}, test HR@10 {before['hr@10']:.4f} -> {after['hr@10']:.4f} (random {rand:.4f})")
    assert losses[-1] < losses[0]
    assert after["hr@10"] > 5 * rand
    assert after["ndcg@10"] > before["ndcg@10"]


@pytest.mark.slow
def test_sasrec_learns_on_real_sample(scientific):
    torch.manual_seed(2020)
    model = SASRec(SASRecConfig(num_items=scientific.num_items, max_len=MAX_LEN, dropout_prob=0.2,
                                attn_dropout_prob=0.2))
    test = batches(scientific, "test", 512)
    losses = fit(model, scientific, epochs=6, lr=2e-3)
    after = evaluate(model, test)
    rand = random_ranking_hr(10, scientific.num_items)
    pop = popularity_hr10(scientific)
    print(f"SASRec losses {losses}, test HR@10 {after['hr@10']:.4f} (random {rand:.4f}, popularity {pop:.4f})")
    assert losses[-1] < losses[0]
    # above the popularity ranking, not only above random: with PyTorch's N(0, 1) position
    # init SASRec sat on the popularity plateau (test HR@10 0.035 here) for ~12 epochs
    assert after["hr@10"] > 1.5 * pop
