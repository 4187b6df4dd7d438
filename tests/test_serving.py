"""Serving (dist.serving, docs/serving.md) on the bundled Scientific sample (MiniLM text +
CLIP image features): a retrieval export's exact top-K is the trained model's full ranking,
its user tower is the model's (1e-5) and runs with torch alone, items added after the export
rank exactly as if they had been in the catalog from the start, the approximate index's
recall is reported, and the commands behave (including bad input: one line, exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards import collate, ensure_sample_shards, expand, iter_sequences, load_item_table
from dist.serving import Retrieval, add_items, export_retrieval, remove_items, update_items
from mmm4rec import MMM4Rec, MMM4RecConfig

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 20
K = 20
TOL = 1e-4   # absolute score tolerance (scores are O(10)); ranks may swap only inside it


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    url = ensure_sample_shards("scientific_mm", tmp_path_factory.mktemp("shards"), progress=False)
    table = load_item_table(url)
    seqs = list(iter_sequences(url))
    return url, table, seqs


def small_config(table, **kw) -> MMM4RecConfig:
    return MMM4RecConfig(hidden_size=64, inner_size=64, d_state=16, n_groups=2, head_dim=32, max_len=MAX_LEN,
                         text_dim=table.text_dim, image_dim=table.image_dim, num_items=table.num_items,
                         dropout_prob=0.1, embedding_drop_prob=0.1, time_dropout_prob=0.1, **kw)


def samples(seqs, split):
    return [s for q in seqs for s in expand(q["user"], q["items"], q["times"], split, MAX_LEN)]


@pytest.fixture(scope="module")
def trained(sample):
    """MMM4Rec trained for one epoch on the sample (no ID term: the transferable setting)."""
    _, table, seqs = sample
    torch.manual_seed(0)
    model = MMM4Rec(small_config(table))
    model.set_item_table(table)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train = samples(seqs, "train")
    order = np.random.default_rng(0).permutation(len(train))
    model.train()
    for s in range(0, len(order), 256):
        opt.zero_grad()
        model.calculate_loss(collate([train[i] for i in order[s:s + 256]], MAX_LEN)).backward()
        opt.step()
    return model.eval()


def histories(table, smp):
    return [{"items": [str(table.item_ids[i]) for i in s["history"]], "times": s["history_time"].tolist()}
            for s in smp]


def full_topk(model, smp, k=K, exclude_history=False):
    """(original ids, scores) of the model's own full ranking (SeqRecModel.full_sort_predict)."""
    batch = collate(smp, MAX_LEN)
    scores = model.full_sort_predict(batch)
    if exclude_history:
        scores.scatter_(1, batch["item_seq"], float("-inf"))
    s, i = scores.topk(k, dim=1)
    return i.numpy(), s.numpy()


def assert_same_ranking(ids_a, scores_a, ids_b, scores_b, tol=TOL):
    """Same ids in the same order, except swaps between items whose scores tie within ``tol``
    (inside the list, or at its end with an item just past it)."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    assert scores_a.shape == scores_b.shape == ids_a.shape == ids_b.shape
    np.testing.assert_allclose(scores_a, scores_b, atol=tol, rtol=0)
    differ = ids_a != ids_b
    for u, j in zip(*np.nonzero(differ)):
        for ids_x, sc_x, ids_y, sc_y in ((ids_a, scores_a, ids_b, scores_b), (ids_b, scores_b, ids_a, scores_a)):
            where = np.nonzero(ids_y[u] == ids_x[u][j])[0]
            if len(where):   # the same item elsewhere in the other list: with the same score
                assert abs(sc_x[u][j] - sc_y[u][where[0]]) <= tol, f"user {u} rank {j}: {ids_x[u][j]} not a tie"
            else:            # not in the other list: it ties with that list's last item
                assert abs(sc_x[u][j] - sc_y[u][-1]) <= tol, f"user {u} rank {j}: {ids_x[u][j]} missing"
    return int(differ.sum())


def as_arrays(recs, table_ids=None):
    ids = np.array([[i for i, _ in r] for r in recs], dtype=object)
    scores = np.array([[s for _, s in r] for r in recs], dtype=np.float64)
    return ids, scores


@pytest.fixture(scope="module")
def exported(trained, sample, tmp_path_factory):
    _, table, _ = sample
    out = export_retrieval(trained, table, tmp_path_factory.mktemp("ret") / "full", progress=False)
    return out


def test_export_layout_and_manifest(exported, sample, trained):
    _, table, _ = sample
    m = json.loads((exported / "manifest.json").read_text())
    assert m["format"] == "mmm4rec-retrieval" and m["model"]["model_type"] == "mmm4rec"
    assert m["catalog"]["active_items"] == table.num_items and m["catalog"]["rows"] == table.num_items + 1
    assert m["catalog"]["text_encoder"] == table.text_encoder
    for lib in ("torch", "faiss", "mmm4rec", "safetensors"):
        assert m["versions"][lib]
    from safetensors.numpy import load_file

    v = load_file(str(exported / "item_vectors.safetensors"))
    assert v["fp32"].dtype == np.float32 and v["fp16"].dtype == np.float16
    ref = trained.item_vectors().detach().numpy()
    np.testing.assert_allclose(v["fp32"][1:], ref[1:], atol=1e-6, rtol=0)   # same rows, same order here
    np.testing.assert_allclose(v["fp16"].astype(np.float32), v["fp32"], atol=2e-3, rtol=1e-3)
    assert not v["fp32"][0].any()


def test_exact_index_topk_equals_full_ranking(exported, trained, sample):
    _, table, seqs = sample
    test = samples(seqs, "test")[:600]
    ret = Retrieval.load(exported)
    ids, scores = as_arrays(ret.recommend(histories(table, test), k=K))
    ref_i, ref_s = full_topk(trained, test)
    swaps = assert_same_ranking(ids, scores, np.asarray(table.item_ids)[ref_i], ref_s)
    V = trained.item_vectors().detach().numpy()
    row = {str(x): r for r, x in enumerate(table.item_ids)}
    same = sum(np.array_equal(V[row[a]], V[b]) for a, b in zip(ids.ravel(), ref_i.ravel()) if row[a] != b)
    print(f"exact top-{K} of {len(test)} users: {swaps} positions swapped within score ties, {same} of them "
          "between items with identical vectors (items with the same features)")
    # with history exclusion: the model's full ranking with the history masked
    ids, scores = as_arrays(ret.recommend(histories(table, test), k=K, exclude_history=True))
    ref_i, ref_s = full_topk(trained, test, exclude_history=True)
    assert_same_ranking(ids, scores, np.asarray(table.item_ids)[ref_i], ref_s)
    for h, r in zip(histories(table, test), ids):
        assert not set(h["items"]) & set(r)


def test_user_tower_equals_training_model(exported, trained, sample):
    _, table, seqs = sample
    smp = samples(seqs, "test")[:300] + samples(seqs, "train")[:300]   # lengths 1..>max_len
    assert min(len(s["history"]) for s in smp) == 1 and max(len(s["history"]) for s in smp) == MAX_LEN
    ret = Retrieval.load(exported)
    u = ret.user_vectors(histories(table, smp))
    ref = trained.user_vectors(collate(smp, MAX_LEN)).detach().numpy()
    assert np.abs(u - ref).max() <= 1e-5
    # longer than max_len: the last max_len items count, as in training
    seq = max(seqs, key=lambda q: len(q["items"]))
    assert len(seq["items"]) > MAX_LEN + 1
    long = {"items": [str(table.item_ids[i]) for i in seq["items"][:-1]], "times": seq["times"][:-1].tolist()}
    last = list(expand(seq["user"], seq["items"], seq["times"], "test", MAX_LEN))
    ref = trained.user_vectors(collate(last, MAX_LEN)).detach().numpy()
    assert np.abs(ret.user_vectors([long]) - ref).max() <= 1e-5


def test_tower_is_self_contained(exported, trained, sample, tmp_path):
    """The programs load with torch alone, and serving never imports DeepSpeed or torchrec."""
    _, table, seqs = sample
    smp = samples(seqs, "test")[:8]
    batch = collate(smp, MAX_LEN)
    rows = [trained.tables.tables[n](batch["item_seq"]).detach() for n in ("text", "image", "modality_mask")]
    torch.save({"rows": rows, "batch": {k: batch[k] for k in ("item_seq", "time_seq", "item_seq_len")},
                "u": trained.user_vectors(batch).detach()}, tmp_path / "io.pt")
    code = f"""
import sys, torch
io = torch.load({str(tmp_path / 'io.pt')!r})
tower = torch.export.load({str(exported / 'user_tower.pt2')!r}).module()
b = io["batch"]
u = tower(*io["rows"], b["item_seq"], b["time_seq"], b["item_seq_len"])
assert (u - io["u"]).abs().max() <= 1e-5, (u - io["u"]).abs().max()
assert not any(m.split('.')[0] in ('mmm4rec', 'deepspeed', 'torchrec') for m in sys.modules), 'project imported'
from dist.serving import Retrieval
r = Retrieval.load({str(exported)!r})
print(r.recommend([{{"items": {histories(table, smp[:1])[0]["items"]!r}}}], k=3))
bad = [m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'torchrec', 'fbgemm_gpu')
       or (m.startswith('dist.') and not m.startswith('dist.serving'))]   # no module of the training stack
assert not bad, bad
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


@pytest.mark.parametrize("variant", ["content", "id_term"])
def test_items_added_after_export_rank_as_if_built_in(trained, sample, tmp_path, variant):
    """Hold out 10% of the catalog, export, add them back with `items add` (text through the
    offline MiniLM encoder, CLIP image features): every ranking equals the full catalog's.
    The id_term variant has a (random) ID term and per-item fusion: the held-out items'
    rows are zero in the model too, which is what an item unseen in training has."""
    _, table, seqs = sample
    model = trained
    held = np.sort(np.random.default_rng(1).choice(np.arange(1, table.num_items + 1), table.num_items // 10,
                                                   replace=False))
    if variant == "id_term":
        torch.manual_seed(3)
        model = MMM4Rec(small_config(table, use_id=True, item_mm_fusion="dynamic_instance"))
        model.load_transferable(trained.transferable_state_dict())
        model.set_item_table(table)
        with torch.no_grad():
            for n in ("id_text", "id_image", "fusion"):
                w = model.tables.tables[n].weight
                w.normal_(0, 0.05)
                w[0] = 0
                w[torch.from_numpy(held)] = 0     # never trained: zero, as items add makes them
        model.eval()
    keep = np.setdiff1d(np.arange(1, table.num_items + 1), held)
    full = Retrieval.load(export_retrieval(model, table, tmp_path / "full", progress=False))
    part_dir = export_retrieval(model, table, tmp_path / "part", rows=keep, progress=False)
    part = Retrieval.load(part_dir)
    assert part.num_active == len(keep)
    records = [{"item_id": str(table.item_ids[i]), "text": str(table.item_text[i]),
                "image_features": table.image[i].tolist()} for i in held]
    assert add_items(part, records) == len(held)
    part.save()
    part = Retrieval.load(part_dir)
    assert part.num_active == table.num_items
    m = json.loads((part_dir / "manifest.json").read_text())
    assert m["catalog"]["edits"][-1]["op"] == "add" and m["catalog"]["version"] == 1
    # the added items' vectors are the model's own
    ref = model.item_vectors(torch.from_numpy(held)).detach().numpy()
    rows = [part.active_row_of[str(table.item_ids[i])] for i in held]
    np.testing.assert_allclose(part.vectors[rows], ref, atol=1e-6, rtol=0)
    # users whose history or target is a held-out item, and others
    test = samples(seqs, "test")
    held_set = set(held.tolist())
    touched = [s for s in test if s["target"] in held_set or held_set & set(s["history"].tolist())]
    smp = touched[:300] + [s for s in test if s not in touched][:100]
    assert len(touched) >= 100
    h = histories(table, smp)
    ids_p, sc_p = as_arrays(part.recommend(h, k=K))
    ids_f, sc_f = as_arrays(full.recommend(h, k=K))
    assert_same_ranking(ids_p, sc_p, ids_f, sc_f)
    ref_i, ref_s = full_topk(model, smp)
    assert_same_ranking(ids_p, sc_p, np.asarray(table.item_ids)[ref_i], ref_s)
    # held-out items do get recommended (the content scores them)
    held_ids = {str(table.item_ids[i]) for i in held}
    assert any(held_ids & set(r) for r in ids_p)


def test_remove_and_update(exported, trained, sample, tmp_path):
    _, table, seqs = sample
    ret = Retrieval.load(exported)
    smp = samples(seqs, "test")[:50]
    h = histories(table, smp)
    top = ret.recommend(h, k=5)
    gone = sorted({r[0][0] for r in top})
    assert remove_items(ret, gone) == len(gone)
    after = ret.recommend(h, k=5, index="exact")
    for kind in ("exact", "approx"):
        for r in ret.recommend(h, k=5, index=kind):
            assert not set(gone) & {i for i, _ in r}
    # a removed item may still be in a history
    assert ret.recommend([{"items": [gone[0]]}], k=3)
    # the exact ranking without the removed items = the model's ranking with them masked
    ref_i, ref_s = full_topk(trained, smp, k=5 + len(gone))
    names = np.asarray(table.item_ids)[ref_i]
    ref_ids = np.array([[n for n in r if n not in gone][:5] for r in names], dtype=object)
    ref_sc = np.array([[s for n, s in zip(r, sc) if n not in gone][:5] for r, sc in zip(names, ref_s)])
    assert_same_ranking(*as_arrays(after), ref_ids, ref_sc)
    # update: new content -> new vector; the old one is never returned
    item = next(str(i) for i in table.item_ids[1:] if str(i) not in gone)
    row_before = ret.active_row_of[item]
    new = {"item_id": item, "text_features": table.text[8].tolist(), "image_features": table.image[8].tolist()}
    assert update_items(ret, [new]) == 1
    row = ret.active_row_of[item]
    assert row != row_before and not ret.active[row_before]
    np.testing.assert_allclose(ret.vectors[row], trained.item_vectors(torch.tensor([8])).detach().numpy()[0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="already in the catalog"):
        add_items(ret, [new])
    with pytest.raises(ValueError, match="not in the catalog"):
        remove_items(ret, ["no-such-item"])
    with pytest.raises(ValueError, match="'image_features' has 3 values"):
        add_items(ret, [{"item_id": "new-1", "text": "a lens", "image_features": [1, 2, 3]}])
    with pytest.raises(ValueError, match="no content"):
        add_items(ret, [{"item_id": "new-2"}])


def test_approximate_index_recall(exported, sample):
    """Recall@10 of the IVF index against the exact one: reported, with a floor."""
    _, table, seqs = sample
    ret = Retrieval.load(exported)
    h = histories(table, samples(seqs, "test"))
    u = ret.user_vectors(h)
    exact, exact_s = ret.search_vectors(u, 10, "exact")
    m = ret.manifest["index"]["approx"]
    out = {}
    for nprobe in (1, m["nprobe"], m["nlist"]):
        approx, approx_s = ret.search_vectors(u, 10, "approx", nprobe=nprobe)
        out[nprobe] = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
    print(f"IVF nlist {m['nlist']}: recall@10 vs exact by nprobe {out} ({len(h)} users)")
    assert_same_ranking(approx, approx_s, exact, exact_s)   # scanning every cell is exact (up to ties)
    assert out[m["nprobe"]] >= 0.8          # the default setting: floor, not a target
    assert out[1] <= out[m["nprobe"]]


def run_cli(*args, env=None, input=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dist", *args], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=600, input=input)


def test_cli_export_add_recommend(trained, sample, tmp_path):
    url, table, seqs = sample
    export = tmp_path / "export"
    trained.save_pretrained(export)
    held = [3, 40, 500, 1200, 1500]
    r = run_cli("retrieval", "export", str(export), "--data", url, "--out", str(tmp_path / "ret"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1,585 items" in r.stdout
    ret = Retrieval.load(tmp_path / "ret")
    remove_items(ret, [str(table.item_ids[i]) for i in held])   # start without them
    ret.save()
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"item_id": str(table.item_ids[i]), "text": str(table.item_text[i]),
                                         "image_features": table.image[i].tolist()}) + "\n" for i in held))
    # a fresh text cache: the texts really go through the offline MiniLM encoder here
    r = run_cli("items", "add", str(tmp_path / "ret"), str(items), env={"MMM4REC_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "added 5 items" in r.stdout and "1,585 items" in r.stdout
    ret = Retrieval.load(tmp_path / "ret")
    rows = [ret.active_row_of[str(table.item_ids[i])] for i in held]
    ref = trained.item_vectors(torch.tensor(held)).detach().numpy()
    np.testing.assert_allclose(ret.vectors[rows], ref, atol=1e-4, rtol=0)   # re-encoded text: float noise only
    smp = samples(seqs, "test")[:40]
    hist = tmp_path / "hist.jsonl"
    hist.write_text("".join(json.dumps({"id": k, **h}) + "\n" for k, h in enumerate(histories(table, smp))))
    r = run_cli("recommend", str(tmp_path / "ret"), str(hist), "-k", "10", "--exclude-history",
                "--output", str(tmp_path / "recs.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(ln) for ln in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert [ln["id"] for ln in lines] == list(range(40))
    api = ret.recommend(histories(table, smp), k=10, exclude_history=True)
    ids_c = np.array([ln["items"] for ln in lines], dtype=object)
    assert_same_ranking(ids_c, np.array([ln["scores"] for ln in lines]), *as_arrays(api))
    # bad input: one clear line naming the file, line and field; exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"items": [str(table.item_ids[1])]}) + "\n" +
                   json.dumps({"items": [str(table.item_ids[1]), "NOPE"], "times": [1, 2]}) + "\n")
    r = run_cli("recommend", str(tmp_path / "ret"), str(bad))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "items[1] = 'NOPE'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    bad.write_text('{"item_id": "x", "text": "a"}\n{"item_id": \n')
    r = run_cli("items", "add", str(tmp_path / "ret"), str(bad))
    assert r.returncode == 2 and f"{bad}:2: not valid JSON" in r.stderr
    r = run_cli("recommend", str(tmp_path / "nothing"), str(hist))
    assert r.returncode == 2 and "not a retrieval export" in r.stderr


@pytest.mark.parametrize("cmd", [["retrieval", "export"], ["items", "add"], ["items", "remove"], ["recommend"]])
def test_help(cmd):
    from dist.main import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
