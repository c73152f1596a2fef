"""protoclr.cluster: index-aligned features, PCA whitening, k-means (vs scikit-learn, distributed), Prototypes."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protoclr import cluster

# ------------------------------------------------------------------------------------------------ data


def _blobs(n_per: int, centers: int, dim: int, spread: float = 0.05, seed: int = 0):
    """Gaussian blobs with unit-norm centres far apart relative to `spread`: (x (N, dim) float32, labels (N,))."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, dim, generator=g)
    mu = 4 * mu / mu.norm(dim=1, keepdim=True)
    labels = torch.arange(centers).repeat_interleave(n_per)
    x = mu[labels] + spread * torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return x[perm], labels[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the two labelings are equal up to a renaming of the clusters (a bijection)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _digits() -> torch.Tensor:
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32)  # (1797, 64) pixel vectors


class _IndexedImages(Dataset):
    """Images that are a fixed random function of the dataset index; yields (image, label, index)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 4, 4, generator=g)

    def __len__(self):
        return self.images.size(0)

    def __getitem__(self, i):
        return self.images[i], i % 3, i


def _encoder(seed: int = 0, out: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    # BatchNorm makes eval mode matter: in train mode the output would depend on the batch composition.
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out))


def _expected_features(ds: _IndexedImages, enc: nn.Module) -> torch.Tensor:
    enc.eval()
    with torch.no_grad():
        out = enc(ds.images)
    enc.train()
    return out


# -------------------------------------------------------------------------------------------- features


def test_extract_features_index_aligned_with_shuffled_sampler():
    ds = _IndexedImages(53)
    enc = _encoder()
    loader = DataLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(3))
    order = torch.cat([b[2] for b in loader])
    assert not torch.equal(order, torch.arange(len(ds))), "the sampler must actually shuffle for this test"
    feats = cluster.extract_features(enc, loader, len(ds), "cpu", progress=False)
    expected = _expected_features(ds, enc)
    print("max abs err", (feats - expected).abs().max().item())
    assert feats.dtype == torch.float32 and feats.shape == (53, 5)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    assert enc.training, "extract_features must restore the encoder's train mode"
    # Writing rows in loader order (the reference code's bug) would not match.
    assert not torch.allclose(expected[order], expected)


def test_extract_features_averages_duplicates_and_accepts_dicts():
    ds = _IndexedImages(10)
    enc = _encoder()
    idx = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # 0 and 1 twice: a padded sampler
    batches = [{"images": ds.images[i], "index": torch.tensor(i)} for i in idx]
    feats = cluster.extract_features(enc, batches, 10, progress=False)
    torch.testing.assert_close(feats, _expected_features(ds, enc), rtol=1e-5, atol=1e-6)


def test_extract_features_errors():
    ds = _IndexedImages(10)
    enc = _encoder()
    with pytest.raises(ValueError, match="never produced"):
        cluster.extract_features(enc, [(ds.images[:8], None, torch.arange(8))], 10, progress=False)
    with pytest.raises(ValueError, match="index must lie"):
        cluster.extract_features(enc, [(ds.images[:2], None, torch.tensor([0, 10]))], 10, progress=False)
    with pytest.raises(ValueError, match="index must be int64"):
        cluster.extract_features(enc, [(ds.images[:2], None, torch.tensor([0.0, 1.0]))], 10, progress=False)
    with pytest.raises(ValueError, match="encoder"):
        cluster.extract_features(nn.Identity(), [(ds.images[:2], None, torch.tensor([0, 1]))], 10, progress=False)
    with pytest.raises(ValueError, match="num_images"):
        cluster.extract_features(enc, [], 0, progress=False)
    assert enc.training


# ------------------------------------------------------------------------------------------------- PCA


def test_pca_whiten_whitens_and_normalises():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    x += 5.0  # a mean to remove
    mean, w = cluster._pca_fit(x, 8, -0.5, torch.float64)
    y = (x - mean) @ w
    cov = y.T @ y / (x.size(0) - 1)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-8)
    out = cluster.pca_whiten(x, dim=8)
    assert out.shape == (2000, 8) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.nn.functional.normalize(y, dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2000, dtype=torch.float64))
    # power 0: plain PCA, so the leading component carries the most variance.
    mean0, w0 = cluster._pca_fit(x, 8, 0.0, torch.float64)
    var = ((x - mean0) @ w0).var(0)
    assert torch.all(var[:-1] >= var[1:])


def test_pca_whiten_dims_larger_than_data():
    x = torch.randn(5, 10)  # rank <= 4 after centring
    out = cluster.pca_whiten(x, dim=256)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    # Zero-variance directions come out as zero columns instead of amplified noise.
    assert out[:, 4:].abs().max() < 1e-3
    # A constant feature column is dropped the same way.
    x2 = torch.cat([torch.randn(50, 3), torch.ones(50, 1)], 1)
    out2 = cluster.pca_whiten(x2, dim=4)
    assert torch.isfinite(out2).all() and out2[:, 3].abs().max() < 1e-3


def test_pca_whiten_errors():
    with pytest.raises(ValueError, match="dim"):
        cluster.pca_whiten(torch.randn(10, 4), dim=0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        cluster.pca_whiten(torch.randn(10))
    with pytest.raises(ValueError, match="at least 2 rows"):
        cluster.pca_whiten(torch.randn(1, 4))
    with pytest.raises(ValueError, match="power"):
        cluster.pca_whiten(torch.randn(10, 4), power=float("nan"))


# --------------------------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_recovers_separable_blobs(dtype):
    x, labels = _blobs(n_per=60, centers=6, dim=8)
    c, a, inertia = cluster.kmeans(x.to(dtype), 6, iters=20, seed=0)
    assert a.dtype == torch.int64 and a.shape == labels.shape and c.shape == (6, 8) and c.dtype == dtype
    assert _same_partition(a, labels)
    # Inertia is Σ|x - c_a|² of the returned centroids and assignments. It comes from float64 statistics
    # (Σ|x|² - 2 c·S + n|c|²); these rows are far from the origin (Σ|x|² ≈ 800 x inertia), so float32 partial
    # sums leave ~1e-6 relative error.
    direct = (x.double() - c.double()[a]).pow(2).sum().item()
    assert inertia == pytest.approx(direct, rel=1e-5 if dtype == torch.float32 else 1e-10)
    # Centroids are the means of their rows (the last M-step converged).
    for j in range(6):
        torch.testing.assert_close(c[j].double(), x[a == j].double().mean(0), rtol=0, atol=1e-5)


def test_kmeans_matches_sklearn_lloyd_from_the_same_init():
    x = _digits().double()
    from sklearn.cluster import KMeans

    c0 = x[torch.randperm(x.size(0), generator=torch.Generator().manual_seed(1))[:10]]
    c, a, inertia = cluster.kmeans(x, 10, iters=20, init=c0)
    km = KMeans(10, init=c0.numpy(), n_init=1, max_iter=20, tol=0, algorithm="lloyd").fit(x.numpy())
    print("inertia ours", inertia, "sklearn", km.inertia_)
    assert inertia == pytest.approx(km.inertia_, rel=1e-9)
    assert np.array_equal(a.numpy(), km.labels_)
    np.testing.assert_allclose(c.numpy(), km.cluster_centers_, rtol=0, atol=1e-9)


@pytest.mark.parametrize("whiten", [False, True], ids=["pixels", "whitened"])
def test_kmeans_inertia_within_2pct_of_sklearn(whiten):
    x = _digits()
    from sklearn.cluster import KMeans

    if whiten:
        x = cluster.pca_whiten(x, dim=32)
    seeds = range(8)  # single runs differ by a few % with the init: compare means over seeds
    ours = np.mean([cluster.kmeans(x, 10, iters=20, seed=s)[2] for s in seeds])
    ref = np.mean(
        [KMeans(10, n_init=1, random_state=s, max_iter=20, algorithm="lloyd").fit(x.numpy()).inertia_ for s in seeds]
    )
    print("mean inertia ours", ours, "sklearn", ref, "ratio", ours / ref)
    assert abs(ours / ref - 1) <= 0.02


def test_kmeans_deterministic_for_a_seed():
    x, _ = _blobs(n_per=40, centers=10, dim=6, spread=1.0)
    for init in ("k-means++", "random"):
        c1, a1, i1 = cluster.kmeans(x, 8, iters=5, seed=7, init=init)
        torch.manual_seed(123)  # the global RNG must not matter
        c2, a2, i2 = cluster.kmeans(x, 8, iters=5, seed=7, init=init)
        assert torch.equal(c1, c2) and torch.equal(a1, a2) and i1 == i2
        c3, _, _ = cluster.kmeans(x, 8, iters=0, seed=8, init=init)
        c4, _, _ = cluster.kmeans(x, 8, iters=0, seed=7, init=init)
        assert not torch.equal(c3, c4)


def test_kmeans_builds_no_autograd_graph():
    # Features straight from a model may require grad; the E-step must neither track nor return a graph.
    x, _ = _blobs(n_per=20, centers=4, dim=5, spread=1.0)
    for init in ("k-means++", "random", x[:4].clone()):
        c, _, _ = cluster.kmeans(x.clone().requires_grad_(), 4, iters=2, seed=0, init=init)
        assert not c.requires_grad and c.grad_fn is None


def test_kmeans_init_rows_come_from_the_data():
    x, _ = _blobs(n_per=20, centers=4, dim=5, spread=1.0)
    for init in ("k-means++", "random"):
        c, _, _ = cluster.kmeans(x, 6, iters=0, seed=0, init=init)
        d = torch.cdist(c.double(), x.double()).min(1).values
        assert d.max() < 1e-6 and torch.unique(c, dim=0).size(0) == 6


def test_split_empty_splits_the_largest_cluster():
    c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0], [7.0, 8.0, 9.0], [0.0, 0.0, 0.0]])
    counts = [10, 40, 0, 40, 0]
    done = cluster._split_empty(c, counts)
    # Empty 2 splits the largest (1 and 3 tie: lowest id), then empty 4 splits the now-largest 3.
    assert done == [(2, 1), (4, 3)]
    assert counts == [10, 20, 20, 20, 20]
    eps = cluster._SPLIT_EPS
    s = torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(c[2], torch.tensor([4.0, 5.0, 6.0]) * (1 + eps * s))
    torch.testing.assert_close(c[1], torch.tensor([4.0, 5.0, 6.0]) * (1 - eps * s))
    torch.testing.assert_close(c[4], torch.tensor([7.0, 8.0, 9.0]) * (1 + eps * s))
    assert cluster._split_empty(c, [3, 1, 2, 1, 1]) == []


def test_kmeans_reseeds_empty_clusters():
    x, labels = _blobs(n_per=50, centers=3, dim=4)
    # Centroid 1 duplicates centroid 0 (ties go to 0) and centroid 2 is far from every row:
    # both are empty after the first E-step and must be re-seeded from the largest cluster.
    c0 = x[labels == 0][0]
    init = torch.stack([c0, c0, torch.full((4,), 100.0)])
    c, a, inertia = cluster.kmeans(x, 3, iters=20, init=init)
    stats = cluster.cluster_stats(a, 3)
    print(stats, inertia)
    assert stats["empty"] == 0
    assert _same_partition(a, labels)
    # Without re-seeding the run would keep one cluster holding all 150 rows.
    assert inertia < 0.1 * (x - x.mean(0)).pow(2).sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_m_step_statistics(dtype):
    # Both M-step summations (CPU index_add_ partials; the sorted segment_reduce used on CUDA) agree with a
    # float64 reference, including empty clusters, and chunking (rows > the chunk size) is exercised.
    g = torch.Generator().manual_seed(0)
    n, d, k = 70_000, 300, 9  # 70k x 300 > one chunk of 2**24 elements
    x = torch.randn(n, d, generator=g).to(dtype)
    idx = torch.randint(0, k - 2, (n,), generator=g)  # clusters k-2 and k-1 empty
    sumsq = x.double().pow(2).sum()
    ref = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, x.double())
    for sorted_sums in (False, True):
        buf = cluster._m_stats(x, idx, k, sumsq, on=False, sorted_sums=sorted_sums)
        torch.testing.assert_close(
            buf[: k * d].view(k, d), ref, rtol=1e-12, atol=1e-9 if dtype == torch.float64 else 2e-3
        )
        assert torch.equal(buf[k * d : -1], torch.bincount(idx, minlength=k).double())
        assert buf[-1] == sumsq


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_step_is_assign_plus_the_m_step_sums(dtype):
    """The fused CPU op: assign's idx and score (ties included, over several row and prototype tiles) and float64
    sums and counts of the rows per cluster, for any thread count."""
    g = torch.Generator().manual_seed(0)
    m, k, d = 1100, 700, 37  # 5 row blocks of 256, 2 prototype blocks of 512
    x = ((torch.randn(m, d, generator=g) * 2).round() / 2).to(dtype)  # coarse values: many exact ties
    c = ((torch.randn(k, d, generator=g) * 2).round() / 2).to(dtype)
    c[600] = c[3]  # a duplicate in the second prototype block: never chosen (lowest k on ties)
    bias = -0.5 * c.pow(2).sum(1)
    ref_idx, ref_score = torch.ops.protoclr.assign(x, c, bias)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            idx, score, sums, counts = torch.ops.protoclr.kmeans_step(x, c, bias)
            assert torch.equal(idx, ref_idx) and torch.equal(score, ref_score)
            exact = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx, x.double())
            torch.testing.assert_close(sums, exact, rtol=1e-12, atol=1e-12)
            assert torch.equal(counts, torch.bincount(idx, minlength=k))
    finally:
        torch.set_num_threads(threads)
    assert not (ref_idx == 600).any() and torch.equal(ref_idx, cluster.kmeans(x, k, iters=0, init=c)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_fused_cpu_step_equals_assign_then_m_step(dtype):
    """backend cpu (E- and M-step in one pass) and backend reference (ops.assign, then _m_stats) run the same
    Lloyd iterations, empty-cluster splits included; non-finite rows take the unfused path."""
    x, _ = _blobs(n_per=80, centers=5, dim=6, spread=0.5)
    x = x.to(dtype)
    init = torch.cat([x[:3], torch.full((2, 6), 50.0, dtype=dtype)])  # two centroids empty after the first E-step
    c1, a1, i1 = cluster.kmeans(x, 5, iters=8, init=init, backend="cpu")
    c2, a2, i2 = cluster.kmeans(x, 5, iters=8, init=init, backend="reference")
    assert torch.equal(a1, a2) and cluster.cluster_stats(a1, 5)["empty"] == 0
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert i1 == pytest.approx(i2, rel=1e-12 if dtype == torch.float64 else 1e-6)
    x[7, 2] = float("nan")
    c1, a1, i1 = cluster.kmeans(x, 5, iters=2, init=init, backend="cpu")
    c2, a2, i2 = cluster.kmeans(x, 5, iters=2, init=init, backend="reference")
    assert torch.equal(a1, a2) and torch.equal(c1.isnan(), c2.isnan()) and math.isnan(i1) == math.isnan(i2)


def test_kmeans_progress_bar_counts_iterations(monkeypatch):
    """The bar advances once per Lloyd iteration and every frame that shows an iteration's inertia counts it."""
    tqdm_auto = pytest.importorskip("tqdm.auto")
    frames = []

    class Recorder(tqdm_auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "mininterval": 0})

        def display(self, *args, **kwargs):
            frames.append((self.n, self.total, self.postfix))
            return super().display(*args, **kwargs)

    monkeypatch.setattr(tqdm_auto, "tqdm", Recorder)
    x, _ = _blobs(n_per=20, centers=3, dim=4)
    cluster.kmeans(x, 3, iters=5, progress=True)
    print(frames)
    assert frames and all(total == 5 for _, total, _ in frames)
    counts = [n for n, _, _ in frames]
    assert counts == sorted(counts) and set(range(1, 6)) <= set(counts) and counts[-1] == 5
    assert all(n >= 1 for n, _, postfix in frames if postfix), "an inertia was shown before its iteration counted"


def test_kmeans_k_equals_n_and_errors():
    x = torch.randn(7, 3)
    c, a, inertia = cluster.kmeans(x, 7, iters=3)
    assert sorted(a.tolist()) == list(range(7)) and inertia == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="k must be at most"):
        cluster.kmeans(x, 8)
    with pytest.raises(ValueError, match="k must be an int"):
        cluster.kmeans(x, 0)
    with pytest.raises(ValueError, match="iters"):
        cluster.kmeans(x, 2, iters=-1)
    with pytest.raises(ValueError, match="init"):
        cluster.kmeans(x, 2, init="kmeans||")
    with pytest.raises(ValueError, match="init"):
        cluster.kmeans(x, 2, init=torch.randn(3, 3))
    with pytest.raises(ValueError, match="x must be"):
        cluster.kmeans(x.long(), 2)
    with pytest.raises(ValueError, match="distributed=True"):
        cluster.kmeans(x, 2, distributed=True)


def test_kmeans_uses_ops_assign(monkeypatch):
    from protoclr import ops

    calls = []
    real = ops.assign

    def spy(x, prototypes, bias=None, *, backend="auto"):
        calls.append((x.shape, prototypes.shape, bias is not None, backend))
        return real(x, prototypes, bias, backend=backend)

    monkeypatch.setattr(ops, "assign", spy)
    x, _ = _blobs(n_per=10, centers=3, dim=4)
    cluster.kmeans(x, 3, iters=4, backend="reference")
    assert len(calls) == 5 and all(c == ((30, 4), (3, 4), True, "reference") for c in calls)


# ------------------------------------------------------------------------------------------ Prototypes


def test_prototypes_state_roundtrip(tmp_path):
    p = cluster.Prototypes(6)
    assert p.ids.tolist() == [-1] * 6 and p.centroids is None and p.epoch == -1 and p.k == 0
    p.update(torch.tensor([0, 1, 1, 2, 0, 2]), torch.randn(3, 4), epoch=5, inertia=1.5)
    assert p.stats == {"k": 3, "size_min": 2, "size_max": 2, "size_mean": 2.0, "empty": 0}
    torch.save(p.state_dict(), tmp_path / "p.pt")
    q = cluster.Prototypes(6)
    q.load_state_dict(torch.load(tmp_path / "p.pt"))
    assert torch.equal(q.ids, p.ids) and torch.equal(q.centroids, p.centroids)
    assert q.epoch == 5 and q.inertia == 1.5 and q.stats == p.stats
    # The untouched state round-trips too.
    r = cluster.Prototypes(6)
    r.load_state_dict(cluster.Prototypes(6).state_dict())
    assert r.epoch == -1 and r.centroids is None


def test_prototypes_errors():
    p = cluster.Prototypes(6)
    with pytest.raises(ValueError, match="num_images"):
        cluster.Prototypes(8).load_state_dict(p.state_dict())
    with pytest.raises(ValueError, match="keys"):
        p.load_state_dict({"ids": p.ids})
    with pytest.raises(ValueError, match="ids must lie"):
        p.update(torch.tensor([0, 1, 1, 3, 0, 2]), torch.randn(3, 4), epoch=0)
    with pytest.raises(ValueError, match="ids must be int64"):
        p.update(torch.zeros(6, dtype=torch.int32), torch.randn(3, 4), epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        p.update(torch.zeros(6, dtype=torch.int64), torch.randn(3, 4), epoch=1.0)
    with pytest.raises(ValueError, match="num_images"):
        cluster.Prototypes(0)


def test_cluster_dataset_end_to_end(caplog):
    # Images whose features form 4 blobs: the prototypes must be those blobs, written by dataset index.
    x, labels = _blobs(n_per=30, centers=4, dim=48)

    class DS(Dataset):
        def __len__(self):
            return x.size(0)

        def __getitem__(self, i):
            return x[i].view(3, 4, 4), int(labels[i]), i

    loader = DataLoader(DS(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="protoclr.cluster"):
        protos = cluster.cluster_dataset(
            nn.Flatten(), loader, x.size(0), k=4, pca_dim=8, iters=10, seed=0, device="cpu", epoch=3, progress=False
        )
    assert protos.epoch == 3 and protos.k == 4 and protos.centroids.shape == (4, 8)
    assert _same_partition(protos.ids, labels)
    assert "epoch 3 prototypes" in caplog.text and "empty" in caplog.text


def test_cluster_dataset_amp_runs_the_encoder_in_bf16_on_cpu():
    # amp=True must reach the encoder (the trainer's bf16 E-step on a CPU); the default stays fp32 off CUDA.
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            y = nn.functional.linear(x.flatten(1), torch.eye(48))  # an autocast-eligible op
            seen.append(y.dtype)
            return y

    x, _ = _blobs(n_per=8, centers=2, dim=48)
    batches = [(x.view(-1, 3, 4, 4), torch.arange(x.size(0)))]
    for amp, dtype in ((True, torch.bfloat16), (None, torch.float32)):
        seen.clear()
        cluster.cluster_dataset(Probe(), batches, x.size(0), k=2, pca_dim=4, device="cpu", amp=amp, progress=False)
        assert seen == [dtype]


# ------------------------------------------------------------------------------------------ feature bank


def _views_of(feats: torch.Tensor, index: torch.Tensor, offset: float = 1.5) -> torch.Tensor:
    """(2·B, D) view-major rows whose view mean is exactly feats[index] (integer-valued feats: exact in float)."""
    f = feats[index]
    return torch.cat([f + offset, f - offset])


def test_feature_bank_view_mean_duplicates_and_absent():
    feats = torch.arange(30, dtype=torch.float32).view(10, 3) - 7  # row i: a function of i only
    bank = cluster.FeatureBank(10, 3)
    bank.reset(4)
    # Loader order, not index order; index 6 twice in one batch (a corrupt file's substitute); 2, 5 and 8 never met.
    for index in (torch.tensor([3, 9, 0]), torch.tensor([6, 1, 6]), torch.tensor([7, 4])):
        bank.add(index, _views_of(feats, index))
    got, present = bank.gather()
    assert bank.epoch is None and present.tolist() == [i not in (2, 5, 8) for i in range(10)]
    assert torch.equal(got[present], feats[present]) and bank.counts[6] == 2
    with pytest.raises(ValueError, match="must be"):
        bank.add(torch.tensor([0, 1]), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="dtype"):
        cluster.FeatureBank(10, 3, dtype=torch.int64)


def test_feature_bank_checkpoint_round_trip_is_exact():
    """A bank saved mid-epoch and loaded into a fresh one gathers bitwise what the uninterrupted bank gathers."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(8, 5, generator=g) for _ in range(4)]
    index = torch.randperm(20, generator=g)[:16].view(4, 4)
    index[3, 0] = index[0, 1]  # an image met again after the checkpoint
    straight, first = cluster.FeatureBank(20, 5), cluster.FeatureBank(20, 5)
    straight.reset(2)
    first.reset(2)
    for b in range(4):
        straight.add(index[b], h[b])
    for b in range(2):
        first.add(index[b], h[b])
    state = first.state_dict()
    assert state["epoch"] == 2 and state["feats"].shape == (8, 5)
    resumed = cluster.FeatureBank(20, 5)
    resumed.load_state_dict(state)
    for b in range(2, 4):
        resumed.add(index[b], h[b])
    (fa, pa), (fb, pb) = straight.gather(), resumed.gather()
    assert torch.equal(fa, fb) and torch.equal(pa, pb)
    with pytest.raises(ValueError, match="dataset changed size"):
        cluster.FeatureBank(6, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="feats must be"):
        cluster.FeatureBank(20, 4).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_bank_absent_images_get_no_prototype(dtype, caplog):
    """Images the epoch never met (drop_last's rest, a skipped corrupt file) are left out of PCA and k-means and
    get id -1; the others are clustered as the pass would cluster the same features."""
    x, labels = _blobs(n_per=30, centers=4, dim=12)
    absent = torch.tensor([5, 17, 64, 119])
    bank = cluster.FeatureBank(x.size(0), 12, dtype=dtype)
    bank.reset(0)
    order = torch.randperm(x.size(0), generator=torch.Generator().manual_seed(1))
    order = order[~torch.isin(order, absent)]
    for index in order.split(16):
        bank.add(index, torch.cat([x[index], x[index]]))
    with caplog.at_level("INFO", logger="protoclr.cluster"):
        protos = cluster.cluster_bank(bank, k=4, pca_dim=8, iters=10, seed=0, epoch=1, progress=False)
    present = ~torch.isin(torch.arange(x.size(0)), absent)
    assert protos.epoch == 1 and (protos.ids == -1).nonzero().flatten().tolist() == absent.tolist()
    assert _same_partition(protos.ids[present], labels[present])
    assert "4 images absent from the bank" in caplog.text
    if dtype == torch.float32:  # the same rows through the pass's chain give the same clustering
        white = cluster.pca_whiten(x[present], dim=8)
        c, a, _ = cluster.kmeans(white, 4, iters=10, seed=0)
        assert torch.equal(protos.ids[present], a) and torch.equal(protos.centroids, c)


# ---------------------------------------------------------------------------------------- distributed


def _dist_problem():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(403, 6, generator=g)  # overlapping data: assignments depend on every centroid digit
    return x


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x = _dist_problem()
        res = {}
        for init in ("k-means++", "random"):
            res[f"full-{init}"] = cluster.kmeans(x, 7, iters=6, seed=3, init=init)
        cut = 211  # uneven shards
        shard = x[:cut] if rank == 0 else x[cut:]
        res["sharded"] = cluster.kmeans(shard, 7, iters=6, seed=3, sharded=True)
        res["local"] = cluster.kmeans(x[:50], 3, iters=2, seed=0, distributed=False)
        ds = _IndexedImages(37)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=1)  # pads 37 -> 38
        loader = DataLoader(ds, batch_size=5, sampler=sampler)
        res["feats"] = cluster.extract_features(_encoder(), loader, len(ds), "cpu", progress=False)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_two_process_gloo_equals_one_process(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x = _dist_problem()
    for init in ("k-means++", "random"):
        c, a, inertia = cluster.kmeans(x, 7, iters=6, seed=3, init=init)
        for r in range(world):
            cd, ad, idist = got[r][f"full-{init}"]
            print(init, "rank", r, "max centroid diff", (cd - c).abs().max().item(), "inertia", idist, inertia)
            assert torch.equal(ad, a)
            torch.testing.assert_close(cd, c, rtol=0, atol=1e-6)
            assert idist == pytest.approx(inertia, rel=1e-6)
        assert torch.equal(got[0][f"full-{init}"][0], got[1][f"full-{init}"][0]), "ranks must agree bitwise"
    # Pre-sharded rows (211 + 192): same clustering, each rank returns its own rows' assignments.
    c, a, inertia = cluster.kmeans(x, 7, iters=6, seed=3)
    assert torch.equal(torch.cat([got[0]["sharded"][1], got[1]["sharded"][1]]), a)
    torch.testing.assert_close(got[1]["sharded"][0], c, rtol=0, atol=1e-6)
    assert got[0]["sharded"][2] == pytest.approx(inertia, rel=1e-6)
    # distributed=False ignores the process group.
    cl, al, il = cluster.kmeans(x[:50], 3, iters=2, seed=0)
    assert torch.equal(got[0]["local"][1], al) and torch.equal(got[1]["local"][0], cl)
    # Features: a shuffled, padded DistributedSampler still gives rows in dataset-index order on every rank.
    ds = _IndexedImages(37)
    expected = _expected_features(ds, _encoder())
    for r in range(world):
        torch.testing.assert_close(got[r]["feats"], expected, rtol=1e-5, atol=1e-6)


def _bank_problem():
    """203 images whose features are 4 blobs (rounded to 1/64: view means stay exact) and a shuffling, sharded
    pair sampler: 2 ranks x 24 images per batch, 8 batches an epoch, 11 images left over by drop_last."""
    from protoclr.data import PrototypePairSampler

    x, labels = _blobs(n_per=51, centers=4, dim=6, spread=0.3)
    x, labels = (x[:203] * 64).round() / 64, labels[:203]
    ids = torch.arange(203) % 5  # stale prototype ids: the plan pairs images across the whole dataset

    def sampler(rank):
        s = PrototypePairSampler(203, 24, num_replicas=2, rank=rank, seed=3)
        s.set_epoch(2)
        s.set_prototypes(ids)
        return s

    return x, labels, sampler


def _bank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, _, sampler = _bank_problem()
        batches = [torch.tensor(b) for b in sampler(rank)]
        bank = cluster.FeatureBank(x.size(0), x.size(1))
        bank.reset(2)
        for b in batches[:3]:
            bank.add(b, _views_of(x, b, offset=0.25))
        # A mid-epoch checkpoint (a collective) and a resumed bank on each rank: rank 0 holds the saved rows.
        resumed = cluster.FeatureBank(x.size(0), x.size(1))
        resumed.load_state_dict(bank.state_dict())
        for b in batches[3:]:
            bank.add(b, _views_of(x, b, offset=0.25))
            resumed.add(b, _views_of(x, b, offset=0.25))
        res = {"seen": torch.cat(batches), "resumed": resumed.gather()}
        res["feats"], res["present"] = (t.clone() for t in bank.gather())
        bank.reset(2)
        for b in batches:
            bank.add(b, _views_of(x, b, offset=0.25))
        res["ids"] = cluster.cluster_bank(bank, k=4, pca_dim=4, iters=8, seed=5, epoch=3, progress=False).ids
        torch.save(res, os.path.join(out_dir, f"bank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_feature_bank_two_ranks_index_aligned(tmp_path):
    """Under a shuffled pair sampler sharded over 2 gloo ranks, the gathered bank holds image i's view mean in row
    i on every rank, the images no rank met are absent, a bank resumed from a mid-epoch state gathers the same
    bits, and the distributed E-step equals one process clustering the same rows."""
    world = 2
    mp.spawn(_bank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"bank{r}.pt") for r in range(world)]
    x, labels, sampler = _bank_problem()
    seen = torch.cat([got[0]["seen"], got[1]["seen"]])
    assert seen.unique().numel() == seen.numel() == 192  # disjoint shards, each image at most once
    present = torch.zeros(x.size(0), dtype=torch.bool)
    present[seen] = True
    assert not torch.equal(got[0]["seen"].sort().values, torch.arange(96))  # shuffled, not a block of indices
    for r in range(world):
        assert torch.equal(got[r]["present"], present)
        assert torch.equal(got[r]["feats"][present], x[present]), "row i must hold image i's features"
        assert not got[r]["feats"][~present].any()
        assert torch.equal(got[r]["resumed"][0], got[r]["feats"]) and torch.equal(got[r]["resumed"][1], present)
    assert torch.equal(got[0]["ids"], got[1]["ids"])
    bank = cluster.FeatureBank(x.size(0), x.size(1))
    bank.reset(2)
    bank.add(torch.nonzero(present).flatten(), torch.cat([x[present], x[present]]))
    one = cluster.cluster_bank(bank, k=4, pca_dim=4, iters=8, seed=5, epoch=3, progress=False).ids
    assert torch.equal(got[0]["ids"], one) and (one[~present] == -1).all()
    assert _same_partition(one[present], labels[present])


# ------------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_kmeans_cuda_matches_cpu():
    x, labels = _blobs(n_per=200, centers=12, dim=16, spread=1.0)
    for dtype in (torch.float64, torch.float32):
        c, a, inertia = cluster.kmeans(x.to(dtype), 12, iters=10, seed=0)
        cg, ag, ig = cluster.kmeans(x.to(dtype).cuda(), 12, iters=10, seed=0)
        print(dtype, "cpu", inertia, "cuda", ig, "max centroid diff", (cg.cpu() - c).abs().max().item())
        assert ag.device.type == "cuda" and cg.device.type == "cuda"
        assert torch.equal(ag.cpu(), a)
        torch.testing.assert_close(cg.cpu(), c, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-5)
        assert ig == pytest.approx(inertia, rel=1e-9 if dtype == torch.float64 else 1e-5)
        cg2, ag2, _ = cluster.kmeans(x.to(dtype).cuda(), 12, iters=10, seed=0)
        assert torch.equal(ag2, ag) and torch.equal(cg2, cg), "not deterministic on CUDA"


@pytest.mark.gpu
@needs_cuda
def test_extract_features_cuda_bf16_and_pca():
    ds = _IndexedImages(300)
    enc = _encoder(out=24)
    expected = _expected_features(ds, enc)
    loader = DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    feats = cluster.extract_features(enc.cuda(), loader, len(ds), "cuda", progress=False)
    assert feats.device.type == "cuda" and feats.dtype == torch.float32
    err = ((feats.cpu() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
    print("bf16 autocast max row rel err", err)
    assert err < 3e-2
    fp32 = cluster.extract_features(enc, loader, len(ds), "cuda", amp=False, progress=False)
    torch.testing.assert_close(fp32.cpu(), expected, rtol=1e-3, atol=1e-3)  # TF32 at most
    w_gpu = cluster.pca_whiten(fp32.double(), dim=16)
    w_cpu = cluster.pca_whiten(fp32.cpu().double(), dim=16)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=0, atol=1e-8)  # signs fixed: same on every device
