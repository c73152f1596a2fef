"""PrototypePairSampler (SPEC §1.5): pair composition, sharding, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoclr.data import PrototypePairSampler


def _ranks(n, b, w, seed=0, epoch=0, ids=None, drop_last=True):
    out = []
    for r in range(w):
        s = PrototypePairSampler(n, b, num_replicas=w, rank=r, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        s.set_prototypes(ids)
        out.append(list(s))
    return out


def _pair_kinds(batches, ids):
    """(same, cross) pair counts; same = both ids equal and >= 0."""
    same = cross = 0
    for b in batches:
        a = np.asarray(b)
        p0, p1 = ids[a[0::2]], ids[a[1::2]]
        s = int(((p0 == p1) & (p0 >= 0)).sum())
        same += s
        cross += len(p0) - s
    return same, cross


@pytest.mark.parametrize("w", [1, 2, 3])
def test_random_mode_covers_each_index_once_across_ranks(w):
    n, b = 203, 8
    per_rank = _ranks(n, b, w)
    lens = {len(x) for x in per_rank}
    assert lens == {n // (b * w)}, "every rank must get the same number of batches"
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert all(len(batch) == b for batches in per_rank for batch in batches)
    assert len(flat) == len(set(flat)) == (n // (b * w)) * b * w  # each index at most once, drop_last remainder only
    assert set(flat) <= set(range(n))


def test_drop_last_false_pads_and_covers_all():
    n, b, w = 50, 8, 2
    per_rank = _ranks(n, b, w, drop_last=False)
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    assert set(flat) == set(range(n)) and len(flat) == 64


def test_deterministic_per_seed_and_epoch():
    ids = torch.from_numpy(np.random.default_rng(1).integers(-1, 10, 300))
    a = _ranks(300, 16, 2, seed=3, epoch=5, ids=ids)
    assert a == _ranks(300, 16, 2, seed=3, epoch=5, ids=ids)
    assert a != _ranks(300, 16, 2, seed=4, epoch=5, ids=ids)
    assert a != _ranks(300, 16, 2, seed=3, epoch=6, ids=ids)
    r = _ranks(300, 16, 2, seed=3, epoch=5)
    assert r == _ranks(300, 16, 2, seed=3, epoch=5) and r != _ranks(300, 16, 2, seed=3, epoch=6)


@pytest.mark.parametrize("k, unknown", [(5, 0.0), (40, 0.2), (300, 0.0)])
def test_same_prototype_share_is_half(k, unknown):
    n, b, w = 2000, 32, 2
    rng = np.random.default_rng(0)
    ids = rng.integers(0, k, n)
    ids[rng.random(n) < unknown] = -1
    per_rank = _ranks(n, b, w, ids=torch.from_numpy(ids))
    for batches in per_rank:
        for batch in batches:
            same, cross = _pair_kinds([batch], ids)
            assert same == (b // 2) // 2, f"each batch holds exactly B/4 same pairs, got {same}"
    same, cross = _pair_kinds([x for bs in per_rank for x in bs], ids)
    assert abs(same / (same + cross) - 0.5) < 0.02
    flat = [i for bs in per_rank for x in bs for i in x]
    assert len(flat) == len(set(flat)), "with clusters this large every image appears at most once"


def test_unknown_ids_only_in_cross_pairs_and_pairs_distinct():
    # A third of the images are unknown (-1), the rest fall in 4 prototypes: cross pairs collide often and must
    # be re-paired, and an unknown image must never fill a same-prototype slot (the count would drop below B/4).
    n = 400
    ids = np.where(np.arange(n) % 3 == 0, -1, np.arange(n) % 4)
    s = PrototypePairSampler(n, 20, num_replicas=1, rank=0)
    s.set_prototypes(torch.from_numpy(ids))
    seen_unknown = 0
    for batch in s:
        a = np.asarray(batch)
        assert (a[0::2] != a[1::2]).all(), "a pair is two distinct images"
        same, _ = _pair_kinds([batch], ids)
        assert same == 5
        seen_unknown += int((ids[a] == -1).sum())
    assert seen_unknown > 0.25 * n
    assert s.stats["same_share"] == pytest.approx(0.5, abs=1e-9)


def test_odd_pairs_per_batch_alternate():
    n, b = 600, 6  # 3 pairs per batch: 1 or 2 same pairs, alternating
    ids = np.random.default_rng(0).integers(0, 4, n)
    (batches,) = _ranks(n, b, 1, ids=torch.from_numpy(ids))
    counts = [_pair_kinds([x], ids)[0] for x in batches]
    assert set(counts) == {1, 2}
    assert abs(np.mean(counts) / 3 - 0.5) < 0.02


def test_small_clusters_top_up_keeps_share():
    # Clusters of 2 images: only n/2 same pairs exist, but half of n/2 pairs is n/4, so no top-up is needed; with
    # clusters of 1 or 2 and many singletons, the sampler re-draws from the 2-clusters.
    n = 400
    ids = np.arange(n)  # singletons...
    ids[:40] = np.repeat(np.arange(20), 2)  # ...and 20 pairs
    s = PrototypePairSampler(n, 20, num_replicas=1, rank=0)
    s.set_prototypes(torch.from_numpy(ids))
    batches = list(s)
    same, cross = _pair_kinds(batches, ids)
    assert same / (same + cross) == pytest.approx(0.5, abs=0.02)


def test_no_cluster_of_two_falls_back_to_cross_pairs(caplog):
    n = 64
    s = PrototypePairSampler(n, 16, num_replicas=1, rank=0)
    s.set_prototypes(torch.arange(n))  # every image its own prototype
    batches = list(s)
    assert len(batches) == 4 and all(len(x) == 16 for x in batches)
    assert "fewer same-prototype pairs" in caplog.text


def test_single_prototype_cross_pairs_impossible_still_full_batches():
    n = 64
    s = PrototypePairSampler(n, 16, num_replicas=1, rank=0)
    s.set_prototypes(torch.zeros(n, dtype=torch.int64))
    batches = list(s)
    assert len(batches) == 4 and all(len(x) == 16 for x in batches)


def test_state_dict_resume_mid_epoch():
    s = PrototypePairSampler(256, 16, num_replicas=1, rank=0, seed=7)
    s.set_epoch(3)
    full = list(s)
    it = iter(s)
    for _ in range(5):
        next(it)
    state = s.state_dict()
    assert state == {"epoch": 3, "seed": 7, "position": 5}
    t = PrototypePairSampler(256, 16, num_replicas=1, rank=0, seed=0)
    t.load_state_dict(state)
    assert list(t) == full[5:]
    assert list(t) == full  # the resume applies once; the next pass is the whole epoch


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_images=100, batch_size=7), "batch_size"),
        (dict(num_images=100, batch_size=8, num_replicas=2, rank=2), "rank"),
        (dict(num_images=10, batch_size=8, num_replicas=2, rank=0), "num_images"),
        (dict(num_images=100, batch_size=8, num_replicas=0, rank=0), "num_replicas"),
    ],
)
def test_bad_arguments(kw, match):
    kw.setdefault("num_replicas", 1)
    kw.setdefault("rank", 0)
    with pytest.raises(ValueError, match=match):
        PrototypePairSampler(**kw)


def test_bad_prototypes():
    s = PrototypePairSampler(100, 8, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match=r"shape \(num_images,\)"):
        s.set_prototypes(torch.zeros(99, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        s.set_prototypes(torch.zeros(100))
    with pytest.raises(ValueError, match=">= -1"):
        s.set_prototypes(torch.full((100,), -2))


def test_large_dataset_plan():
    """200k images, 4 ranks: every rank's batches are its slice of the same global plan, indices in range.
    (Its speed is measured in bench/pipeline.py, `sampler_plan_ms_imagenet`, not asserted here.)"""
    n = 200_000
    ids = torch.randint(-1, 3000, (n,))
    ranks = []
    for rank in range(4):
        s = PrototypePairSampler(n, 256, num_replicas=4, rank=rank)
        s.set_prototypes(ids)
        ranks.append(np.array(list(s)))
    assert all(r.shape == (n // 1024, 256) for r in ranks)
    glob = s.global_batches()
    assert np.array_equal(np.concatenate(ranks, axis=1), glob.reshape(n // 1024, 1024))
    assert glob.min() >= 0 and glob.max() < n
