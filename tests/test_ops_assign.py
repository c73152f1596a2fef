"""Every non-reference backend's prototype assignment against the reference (SPEC 1.4)."""

import pytest
import torch

from protoclr import ops


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
# (1025, 300, 100) spans several tiles in every dimension: cpu 256 rows (512 prototypes per tile: several in
# test_ties_take_lowest_index); Triton's interpreter 64 x 64, with 32 float64 / 64 float32 features per step.
@pytest.mark.parametrize("m,k,d", [(1, 1, 1), (97, 13, 33), (1025, 300, 100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_parity(backend, dtype, m, k, d, with_bias):
    name, device = backend
    x = torch.randn(m, d, dtype=torch.float64).to(dtype)
    c = torch.randn(k, d, dtype=torch.float64).to(dtype)
    bias = torch.randn(k, dtype=torch.float64) if with_bias else None
    ref_idx, ref_score = ops.assign(x.double(), c.double(), bias, backend="reference")
    idx, score = ops.assign(x.to(device), c.to(device), None if bias is None else bias.to(device), backend=name)
    assert idx.dtype == torch.int64 and score.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    idx, score = idx.cpu(), score.cpu()
    # The reference scores the rounded inputs exactly, so a backend's only error is its accumulation: D products
    # (exact in fp32 for 16-bit inputs, one rounding each otherwise) summed in the accumulator, plus the bias'
    # rounding. The recursive-summation bound, in any order: |error| <= (D + 2)·u·(Σ_d |x_d c_d| + |b|), with u
    # the accumulator's unit roundoff. A different index is allowed only within twice that of the best score.
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    full = x.double() @ c.double().T + (0 if bias is None else bias)
    absdot = x.double().abs() @ c.double().abs().T + (0 if bias is None else bias.abs())
    bound = (d + 2) * u * absdot.max(1).values
    chosen = full.gather(1, idx[:, None]).squeeze(1)
    assert ((ref_score - chosen).abs() <= 2 * bound).all()
    assert ((score.double() - ref_score).abs() <= bound).all()
    if dtype == torch.float64:
        assert torch.equal(idx, ref_idx)


def test_ties_take_lowest_index(backend):
    name, device = backend
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], device=device)
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], device=device)
    idx, score = ops.assign(x, c, backend=name)
    assert idx.tolist() == [1, 3, 1, 0] and score.tolist() == [1.0, 1.0, 1.0, 0.0]
    # many equal centroids spread over several tiles
    c = torch.zeros(700, 2, device=device)
    c[[301, 450, 699]] = torch.tensor([1.0, 0.0], device=device)
    idx, _ = ops.assign(x[:1], c, backend=name)
    assert idx.tolist() == [301]


def test_non_finite_input_gives_nan_scores(backend):
    """NaN in, NaN out, the same on every backend (SPEC §3): a score that involves a non-finite x_m, c_k or bias_k
    is NaN and the row takes the lowest such k (torch.max's rule). Before, cpu and triton skipped a NaN
    prototype and returned finite scores, and a NaN row scored -inf."""
    name, device = backend
    x = torch.randn(70, 9)
    c = torch.randn(300, 9)
    x[5, 1], x[66, 0] = float("nan"), float("inf")
    cases = {"x": (x, c, None)}
    c_bad = c.clone()
    c_bad[200, 3], c_bad[140, 5] = float("nan"), -float("inf")
    cases["prototypes"] = (torch.randn(70, 9), c_bad, None)
    bias = torch.randn(300)
    bias[299], bias[17] = float("inf"), float("nan")
    cases["bias"] = (torch.randn(70, 9), c, bias)
    for what, (xx, cc, bb) in cases.items():
        want_idx, want_score = ops.assign(xx, cc, bb, backend="reference")
        idx, score = ops.assign(xx.to(device), cc.to(device), None if bb is None else bb.to(device), backend=name)
        idx, score = idx.cpu(), score.cpu()
        assert torch.equal(idx, want_idx) and torch.equal(score.isnan(), want_score.isnan()), what
        ok = ~want_score.isnan()
        assert torch.allclose(score[ok], want_score[ok], rtol=1e-5, atol=1e-5), what
    assert want_idx.eq(17).all()  # the lowest non-finite bias
    idx, score = ops.assign(x, c, backend="reference")
    assert idx[[5, 66]].tolist() == [0, 0] and score.isnan().sum() == 2
    idx, score = ops.assign(cases["prototypes"][0], c_bad, backend="reference")
    assert idx.eq(140).all() and score.isnan().all()


def test_non_finite_rule_needs_no_host_sync(backend):
    """The rule is decided on the device: torch.compile(fullgraph=True) would break the graph at a host sync."""
    name, device = backend
    impl = ops.resolve(name, device)

    def f(x, c):
        return ops._assign_non_finite(x, c, None, *impl.assign(x, c, None))

    x, c = torch.randn(20, 8, device=device), torch.randn(5, 8, device=device)
    c[2, 1] = float("nan")
    idx, score = torch.compile(f, fullgraph=True, backend="aot_eager")(x, c)
    assert idx.eq(2).all() and score.isnan().all()


def test_nearest_centroid_bias(backend):
    name, device = backend
    x = torch.randn(200, 7, dtype=torch.float64, device=device)
    c = torch.randn(31, 7, dtype=torch.float64, device=device)
    idx, _ = ops.assign(x, c, -0.5 * c.pow(2).sum(1), backend=name)
    assert torch.equal(idx.cpu(), torch.cdist(x.cpu(), c.cpu()).argmin(1))


def test_opcheck(backend):
    name, device = backend
    impl = ops.resolve(name, device)
    x, c = torch.randn(33, 10, device=device), torch.randn(9, 10, device=device)
    torch.library.opcheck(impl.torch_ops()["assign"], (x, c, None))
    torch.library.opcheck(impl.torch_ops()["assign"], (x, c, torch.randn(9, device=device)))
