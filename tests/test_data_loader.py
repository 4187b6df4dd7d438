"""SequenceLoader: exactly-once delivery across ranks and workers, determinism, resume,
uneven splits, and batches identical to the reference ``samples.expand``/``collate``.

Runs on the bundled ``data/samples/office`` (no ../shared, no text encoder needed).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_shards import (
    SequenceLoader,
    ShardsConfig,
    build_shards,
    import_dataset,
    iter_sequences,
)
from data_shards.samples import (
    SPLITS,
    collate,
    collate_index,
    expand,
    num_samples,
    num_samples_array,
    sample_index,
    target_positions,
)

REPO = Path(__file__).resolve().parents[1]
OFFICE = REPO / "data" / "samples" / "office"
KW = dict(batch_size=50, max_len=8, shuffle_buffer=300)


@pytest.fixture(scope="module")
def office_url(tmp_path_factory) -> str:
    """Office sample (1,499 users) in 16 shards of 97 users: uneven over 2 ranks x 2 workers."""
    url = str(tmp_path_factory.mktemp("office") / "shards")
    build_shards(import_dataset("lcrec", OFFICE), url, shard_size=97, progress=False)
    return url


def sample_keys(batch) -> list[tuple[int, float]]:
    """(user, target time) of the real rows: unique per sample (times are positions here)."""
    w = batch["weight"] > 0
    return list(zip(batch["user"][w].tolist(), batch["target_time"][w].tolist()))


def epoch_keys(loader) -> list[tuple[int, float]]:
    return [k for b in loader for k in sample_keys(b)]


def reference_keys(url: str, split: str) -> collections.Counter:
    return collections.Counter((s["user"], float(s["times"][t])) for s in iter_sequences(url)
                               for t in target_positions(len(s["items"]), split))


# ----------------------------------------------------------------------------- vectorised twins

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=0, max_size=12), max_len=st.integers(1, 12),
       split=st.sampled_from(["train", "valid", "test"]), pad=st.integers(0, 5))
def test_sample_index_and_collate_index_match_reference(lengths, max_len, split, pad):
    rng = np.random.default_rng(len(lengths))
    seqs = [(u, rng.integers(1, 100, n), np.sort(rng.random(n)) * 1e9) for u, n in enumerate(lengths)]
    assert num_samples_array(np.array(lengths, dtype=np.int64), split).tolist() == [num_samples(n, split)
                                                                                    for n in lengths]
    ref = [s for u, it, tm in seqs for s in expand(u, it, tm, split, max_len)]
    seq, target = sample_index(np.array(lengths, dtype=np.int64), split)
    assert [(int(a), int(b)) for a, b in zip(seq, target)] == [
        (u, t) for u, it, tm in seqs for t in target_positions(len(it), split)]
    if not ref:
        return
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([it for _, it, _ in seqs]).astype(np.int64)
    times = np.concatenate([tm for _, _, tm in seqs])
    got = collate_index(items, times, offsets, np.arange(len(lengths)), seq, target, max_len,
                        pad_to=len(ref) + pad)
    want = collate(ref, max_len, pad_to=len(ref) + pad)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- contract

def test_batches_follow_the_batch_contract(office_url):
    loader = SequenceLoader(office_url, "train", batch_size=64, max_len=20, num_workers=0, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(loader)
    b = batches[0]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in b.items()} == {
        "user": (torch.int64, (64,)), "item_seq": (torch.int64, (64, 20)), "time_seq": (torch.float64, (64, 20)),
        "item_seq_len": (torch.int64, (64,)), "target": (torch.int64, (64,)),
        "target_time": (torch.float64, (64,)), "weight": (torch.float32, (64,))}
    n_items = loader.num_items
    for b in batches:
        real = b["weight"] > 0
        assert ((b["target"] >= 1) & (b["target"] <= n_items)).all()
        assert ((b["item_seq_len"] >= 1) & (b["item_seq_len"] <= 20)).all()
        pos = torch.arange(20)[None, :]
        inside = pos < b["item_seq_len"][:, None]
        assert (b["item_seq"][real][inside[real]] >= 1).all() and (b["item_seq"][~inside] == 0).all()
        assert (b["time_seq"][~inside] == 0).all()


def test_unshuffled_single_worker_equals_reference_expansion(office_url):
    loader = SequenceLoader(office_url, "train", batch_size=64, max_len=20, num_workers=0, shuffle=False)
    ref = [s for rec in iter_sequences(office_url)
           for s in expand(rec["user"], rec["items"], rec["times"], "train", 20)]
    want = [collate(ref[i:i + 64], 20, pad_to=64) for i in range(0, len(ref), 64)]
    got = list(loader)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- distribution

@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_two_ranks_two_workers_deliver_every_sample_exactly_once(office_url, split):
    loaders = [SequenceLoader(office_url, split, rank=r, world_size=2, num_workers=2, shuffle=True, **KW)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    got = collections.Counter()
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            got.update(sample_keys(b))
    want = reference_keys(office_url, split)
    assert got == want
    if split != "train":  # one sample per user, each user on exactly one rank
        assert len({u for u, _ in got}) == sum(got.values()) == loaders[0].manifest["splits"][split]["users"]


def test_order_is_a_function_of_seed_and_epoch(office_url):
    def run(seed, epoch):
        loader = SequenceLoader(office_url, "train", rank=1, world_size=2, num_workers=2, seed=seed, **KW)
        loader.set_epoch(epoch)
        return epoch_keys(loader)

    a, again, other_epoch, other_seed = run(7, 0), run(7, 0), run(7, 1), run(8, 0)
    assert a == again
    assert a != other_epoch and a != other_seed
    assert len(a) == len(other_epoch)  # a rank's share of the epoch does not depend on the epoch


@pytest.mark.parametrize("world_size,num_workers,drop_last", [(3, 2, False), (5, 1, False), (3, 2, True)])
def test_uneven_ranks_yield_the_same_number_of_batches(office_url, world_size, num_workers, drop_last):
    loaders = [SequenceLoader(office_url, "valid", batch_size=64, max_len=8, rank=r, world_size=world_size,
                              num_workers=num_workers, drop_last=drop_last) for r in range(world_size)]
    counts = {len(loader) for loader in loaders}
    assert len(counts) == 1
    seen = collections.Counter()
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b["weight"].shape == (64,) for b in batches)
        for b in batches:
            seen.update(sample_keys(b))
    assert max(seen.values()) == 1
    if not drop_last:
        assert sum(seen.values()) == loaders[0].num_samples


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stop_after,workers", [(1, 2), (37, 2), (63, 2), (38, 3)])
def test_resume_mid_epoch_gives_exactly_the_remaining_samples(office_url, stop_after, workers):
    def make():
        loader = SequenceLoader(office_url, "train", rank=0, world_size=2, num_workers=workers, seed=3, **KW)
        loader.set_epoch(4)
        return loader

    full = epoch_keys(make())
    first_run = make()
    seen = []
    for i, b in enumerate(first_run):
        seen += sample_keys(b)
        if i + 1 == stop_after:
            break
    state = first_run.state_dict()
    assert sum(state["batches"]) == stop_after

    resumed = make()
    resumed.load_state_dict(state)
    rest = epoch_keys(resumed)
    assert len(seen) + len(rest) == len(full)
    assert collections.Counter(seen + rest) == collections.Counter(full)
    # and in the uninterrupted run's order, across workers too
    assert seen + rest == full
    # the resumed loader counts on from the saved position and ends the epoch complete
    assert resumed.state_dict()["batches"] == make()._slot_batches_target.tolist()


def test_resume_state_at_epoch_end_yields_nothing_then_next_epoch_runs(office_url):
    loader = SequenceLoader(office_url, "valid", num_workers=0, **KW)
    list(loader)
    state = loader.state_dict()
    fresh = SequenceLoader(office_url, "valid", num_workers=0, **KW)
    fresh.load_state_dict(state)
    assert list(fresh) == []
    fresh.set_epoch(1)
    assert len(list(fresh)) == len(fresh)


def test_resume_rejects_state_from_other_settings(office_url):
    state = SequenceLoader(office_url, "train", num_workers=2, **KW).state_dict()
    other = SequenceLoader(office_url, "train", num_workers=1, **KW)
    with pytest.raises(ValueError, match="different shards or loader settings"):
        other.load_state_dict(state)


def test_config_drives_the_loader(office_url):
    from mmm4rec.config import from_dict

    cfg = from_dict(ShardsConfig, {"url": office_url, "batch_size": 32, "eval_batch_size": 128, "max_len": 5,
                                   "num_workers": 0, "seed": 1})
    train, test = SequenceLoader(cfg, "train"), SequenceLoader(cfg, "test")
    assert (train.batch_size, train.shuffle, test.batch_size, test.shuffle) == (32, True, 128, False)
    assert next(iter(train))["item_seq"].shape == (32, 5)
    # a keyword overrides the config's field of the same name; an unknown one is refused
    small = SequenceLoader(cfg, "test", batch_size=16, shuffle=True)
    assert (small.batch_size, small.shuffle, small.max_len, small.seed) == (16, True, 5, 1)
    with pytest.raises(TypeError, match="batch_sise"):
        SequenceLoader(cfg, "train", batch_sise=16)


# ----------------------------------------------------------------------------- resume on another world size

def _global_batches(loaders):
    """Global batch per step: the ranks' batches concatenated in rank order (lockstep)."""
    for parts in zip(*loaders):
        yield {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("old,new,workers,stop_after", [
    ((2, 50), (1, 100), 2, 7),     # 2 processes -> 1, same global batch of 100
    ((1, 100), (2, 50), 2, 7),     # 1 -> 2
    ((2, 50), (4, 25), 0, 5),      # 2 -> 4: each new rank takes half of an old rank's batch
    ((4, 25), (2, 50), 3, 4),      # 4 -> 2
])
def test_resume_on_another_world_size_continues_the_global_batches(office_url, old, new, workers, stop_after):
    kw = dict(KW, batch_size=None)

    def ranks(world, batch):
        out = [SequenceLoader(office_url, "train", rank=r, world_size=world, num_workers=workers, seed=3,
                              **{**kw, "batch_size": batch}) for r in range(world)]
        for loader in out:
            loader.set_epoch(2)
        return out

    reference = list(_global_batches(ranks(*old)))
    first = ranks(*old)
    seen = []
    for i, batch in enumerate(_global_batches(first)):
        seen += sample_keys(batch)
        if i + 1 == stop_after:
            break
    state = first[-1].state_dict()        # any rank's state: they step in lockstep
    assert (state["world_size"], state["batch_size"], state["rank"]) == (*old, old[0] - 1)

    resumed = ranks(*new)
    for loader in resumed:
        loader.load_state_dict(state)
        assert len(loader) == len(reference)
    rest = list(_global_batches(resumed))
    # the rest of the epoch is the uninterrupted run's global batches, row for row
    assert len(rest) == len(reference) - stop_after
    for got, want in zip(rest, reference[stop_after:]):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    # every training sample of the epoch exactly once
    keys = seen + [k for b in rest for k in sample_keys(b)]
    assert collections.Counter(keys) == reference_keys(office_url, "train")
    # a checkpoint taken mid-way names the old layout, and resumes again (here: back on the old one)
    resumed2 = ranks(*new)
    for loader in resumed2:
        loader.load_state_dict(state)
    it = iter(_global_batches(resumed2))
    next(it)
    mid = resumed2[0].state_dict()
    assert (mid["world_size"], mid["batch_size"], sum(mid["batches"])) == (*old, stop_after + 1)
    back = ranks(*old)
    for loader in back:                   # every rank from the one state (here rank 0's)
        loader.load_state_dict(mid)
    assert all(torch.equal(a["user"], b["user"])
               for a, b in zip(_global_batches(back), reference[stop_after + 1:]))
    # the next epoch runs in the new layout
    for loader in resumed:
        loader.set_epoch(3)
        assert (loader.world_size, loader.batch_size) == new
    nxt = [k for b in _global_batches(resumed) for k in sample_keys(b)]
    assert collections.Counter(nxt) == reference_keys(office_url, "train")


def test_resume_on_another_world_size_needs_the_same_global_batch(office_url):
    state = SequenceLoader(office_url, "train", rank=1, world_size=2, num_workers=0, **KW).state_dict()
    other = SequenceLoader(office_url, "train", rank=0, world_size=1, num_workers=0, **KW)  # 1 x 50 != 2 x 50
    with pytest.raises(ValueError, match="global batch must stay the same.*batch size 100 per rank"):
        other.load_state_dict(state)
    three = SequenceLoader(office_url, "train", rank=0, world_size=3, num_workers=0, **{**KW, "batch_size": 33})
    with pytest.raises(ValueError, match="not a whole number"):
        three.load_state_dict(state)


# ----------------------------------------------------------------------------- train_targets: all

def all_reference_keys(url: str, split: str, monitor: float) -> collections.Counter:
    from data_shards.samples import monitor_mask
    seqs = list(iter_sequences(url))
    mon = monitor_mask(np.array([s["user"] for s in seqs]), monitor)
    return collections.Counter((s["user"], float(s["times"][t])) for s, m in zip(seqs, mon)
                               for t in target_positions(len(s["items"]), split, "all", bool(m)))


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=0, max_size=12), monitor=st.lists(st.booleans(), min_size=12,
                                                                                        max_size=12),
       split=st.sampled_from(["train", "valid", "test"]))
def test_sample_index_all_matches_target_positions(lengths, monitor, split):
    n = np.array(lengths, dtype=np.int64)
    m = np.array(monitor[:len(lengths)], dtype=bool)
    assert num_samples_array(n, split, "all", m).tolist() == [num_samples(k, split, "all", bool(b))
                                                              for k, b in zip(lengths, m)]
    seq, target = sample_index(n, split, "all", m)
    assert [(int(a), int(b)) for a, b in zip(seq, target)] == [
        (u, t) for u, (k, b) in enumerate(zip(lengths, m)) for t in target_positions(k, split, "all", bool(b))]


def test_samples_per_user_in_both_modes():
    """loo: n-3 train + 1 valid + 1 test per user; all: n-1 train for a trained user, 0 + 1 + 1 for a
    monitor user; no user is in both train and valid/test under all."""
    for n in range(1, 12):
        assert [num_samples(n, s) for s in SPLITS] == [max(n - 3, 0), int(n >= 3), int(n >= 2)]
        assert [num_samples(n, s, "all", False) for s in SPLITS] == [n - 1, 0, 0]
        assert [num_samples(n, s, "all", True) for s in SPLITS] == [0, int(n >= 3), int(n >= 2)]
        assert list(target_positions(n, "train", "all")) == list(range(1, n))


def test_monitor_mask_is_a_deterministic_fraction_of_users():
    from data_shards.samples import monitor_mask
    users = np.arange(200_000)
    m = monitor_mask(users, 0.05)
    assert abs(m.mean() - 0.05) < 0.003
    assert (monitor_mask(users[::-1], 0.05) == m[::-1]).all()        # a function of the user alone
    assert (monitor_mask(users, 0.10) | ~m).all()                      # nested: more is a superset
    assert not monitor_mask(users, 0.0).any()


def test_train_targets_all_counts_and_no_monitor_user_is_trained(office_url):
    kw = dict(KW, num_workers=0, shuffle=False)
    per_user = {s["user"]: len(s["items"]) for s in iter_sequences(office_url)}
    got = {split: collections.Counter(k for k in epoch_keys(SequenceLoader(
        office_url, split, train_targets="all", monitor_users=0.1, **kw))) for split in SPLITS}
    train_users = collections.Counter(u for u, _ in got["train"].elements())
    eval_users = {u for split in ("valid", "test") for u, _ in got[split]}
    assert eval_users and train_users
    assert not eval_users & set(train_users)                          # monitor users are never trained on
    assert all(c == per_user[u] - 1 for u, c in train_users.items())  # every prefix of a trained user
    assert set(train_users) | eval_users == {u for u, n in per_user.items() if n >= 2}
    assert 0.05 < len({u for u, _ in got["test"]}) / len(per_user) < 0.15
    for split in SPLITS:
        assert got[split] == all_reference_keys(office_url, split, 0.1)
    # loo (the default) is unchanged: the manifest's counts
    loo = SequenceLoader(office_url, "train", **kw)
    assert loo.num_samples == loo.manifest["splits"]["train"]["samples"]
    # without monitor users: every prefix of every user, and valid/test are refused
    everything = SequenceLoader(office_url, "train", train_targets="all", **kw)
    assert everything.num_samples == sum(n - 1 for n in per_user.values())
    assert collections.Counter(epoch_keys(everything)) == all_reference_keys(office_url, "train", 0.0)
    from mmm4rec.config import ConfigError
    for split in ("valid", "test"):
        with pytest.raises(ConfigError, match="monitor_users"):
            SequenceLoader(office_url, split, train_targets="all", **kw)


@pytest.mark.parametrize("split,monitor", [("train", 0.0), ("train", 0.1), ("valid", 0.1)])
def test_train_targets_all_two_ranks_two_workers_exactly_once(office_url, split, monitor):
    loaders = [SequenceLoader(office_url, split, rank=r, world_size=2, num_workers=2, shuffle=True,
                              train_targets="all", monitor_users=monitor, **KW) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    got = collections.Counter()
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            got.update(sample_keys(b))
    assert got == all_reference_keys(office_url, split, monitor)


def test_train_targets_all_resumes_mid_epoch_and_refuses_a_loo_state(office_url):
    def make(**kw):
        loader = SequenceLoader(office_url, "train", rank=1, world_size=2, num_workers=2, seed=3,
                                train_targets="all", monitor_users=0.1, **KW, **kw)
        loader.set_epoch(2)
        return loader

    full = epoch_keys(make())
    first = make()
    seen = []
    for i, b in enumerate(first):
        seen += sample_keys(b)
        if i + 1 == 21:
            break
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert seen + epoch_keys(resumed) == full
    loo = SequenceLoader(office_url, "train", rank=1, world_size=2, num_workers=2, seed=3, **KW)
    with pytest.raises(ValueError, match="different shards or loader settings"):
        loo.load_state_dict(first.state_dict())
