"""CPU-backend specifics (csrc/cpu): thread-count independence, gradcheck, direct-op validation, opcheck of the
row/column split of the distributed form, degenerate rows and a memory bound. Parity per mode/size/dtype, the split
included, lives in test_ops_contrastive.py / test_ops_siamese.py (the `backend` fixture)."""

import os

import pytest
import torch

from protoclr import ops
from protoclr.ops import backend_ext, backend_reference
from protoclr.ops.checks import FN_MODES as MODES
from tests.helpers import make_batch, make_batch_n, rel_err

pytestmark = pytest.mark.skipif(backend_ext.available(torch.device("cpu")) is not None, reason="protoclr._C not built")


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _con(b, fn_mode):
    z = b["z"].detach().clone().requires_grad_()
    loss = ops.contrastive_loss(z, b["inst"], b["proto"], tau=0.2, fn_mode=fn_mode, backend="cpu")
    return [loss, *torch.autograd.grad(loss * 1.3, z)]


def _sia(b, balance):
    h, w, bias = (b[k].detach().clone().requires_grad_() for k in ("h", "weight", "bias"))
    loss = ops.siamese_loss(h, b["inst"], b["proto"], w, bias, balance=balance, backend="cpu")
    return [loss, *torch.autograd.grad(loss * 1.3, (h, w, bias))]


@pytest.mark.parametrize("fn_mode", MODES)
def test_thread_count_independence_contrastive(fn_mode):
    b = make_batch_n(613, dz=72, k=6, dtype=torch.float32)
    with _threads(1):
        one = _con(b, fn_mode)
    with _threads(2):
        two = _con(b, fn_mode)
    errs = [rel_err(a, r) for a, r in zip(two, one)]
    print(f"contrastive {fn_mode}: 1 vs 2 threads, loss/grad rel diff {errs[0]:.1e} {errs[1]:.1e}")
    assert max(errs) <= 1e-6


@pytest.mark.parametrize("balance", [True, False])
def test_thread_count_independence_siamese(balance):
    b = make_batch_n(301, dh=77, k=6, dtype=torch.float32)
    with _threads(1):
        one = _sia(b, balance)
    with _threads(2):
        two = _sia(b, balance)
    errs = [rel_err(a, r) for a, r in zip(two, one)]
    print("siamese: 1 vs 2 threads, loss/dh/dw/db rel diff " + " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= 1e-6


@pytest.mark.parametrize("fn_mode", MODES)
def test_gradcheck_contrastive(fn_mode):
    b = make_batch_n(11, dz=5, k=2)
    z = b["z"].detach().requires_grad_()

    def f(z):
        return ops.contrastive_loss(z, b["inst"], b["proto"], tau=0.4, fn_mode=fn_mode, backend="cpu")

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("balance", [True, False])
def test_gradcheck_siamese(balance):
    b = make_batch_n(9, dh=6, k=2)
    args = tuple(b[k].detach().requires_grad_() for k in ("h", "weight", "bias"))

    def f(h, w, bias):
        return ops.siamese_loss(h, b["inst"], b["proto"], w, bias, balance=balance, backend="cpu")

    assert torch.autograd.gradcheck(f, args)


# --------------------------------------------------------------------------------- row/column split


def _grads(outs, inputs, seeds):
    total = sum((o * s).sum() for o, s in zip(outs, seeds))
    return torch.autograd.grad(total, inputs, allow_unused=True)


def test_opcheck_split():
    b, r0, r1 = make_batch_n(40, dz=9, dh=9, k=3, dtype=torch.float32), 13, 29
    z, zc = b["z"][r0:r1].detach().contiguous(), b["z"].detach()
    lab = (b["inst"][r0:r1], b["inst"], b["proto"][r0:r1], b["proto"])
    fwd = torch.ops.protoclr.contrastive_fwd.default
    torch.library.opcheck(fwd, (z.clone().requires_grad_(), zc.clone().requires_grad_(), *lab, r0, 0.5, "mask"))
    h, hc = b["h"][r0:r1].detach().contiguous(), b["h"].detach()
    w, bias = b["weight"].detach(), b["bias"].detach()
    torch.library.opcheck(
        torch.ops.protoclr.siamese_fwd.default,
        (h.requires_grad_(), hc.requires_grad_(), *lab, w.requires_grad_(), bias.requires_grad_(), r0),
    )


# ------------------------------------------------------------------- symmetric form (zc is z, row_offset 0)
# csrc/cpu/contrastive.cpp visits only the tiles (I, J >= I) when rows and columns are one set; square tiles of
# 32..256 rows (at least ~4 strips per thread), so 613 rows span 8 (1 thread) or 13 (2 threads) ragged strips.

SYM_BATCHES = {  # name: (rows, views per image)
    "n2": (2, 2),
    "v3": (63, 3),
    "n97": (97, 2),
    "n613": (613, 2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _sym_batch(name, dtype):
    n, views = SYM_BATCHES[name]
    b = make_batch(n // views, views, dz=40, k=5) if views != 2 else make_batch_n(n, dz=40, k=5)
    return b["z"].detach().to(dtype), b["inst"], b["proto"]


def _fwd_bwd(impl, z, inst, instc, proto, protoc, row_offset, fn_mode):
    """lse, stats and the gradient of a random combination of them with respect to z, passed as rows and columns
    (one leaf: autograd adds dz and dzc)."""
    zz = z.detach().clone().requires_grad_()
    lse, st = impl.contrastive(zz, zz, inst, instc, proto, protoc, row_offset, 0.3, fn_mode)
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (lse, st)]
    return lse, st, *_grads((lse, st), (zz,), seeds)


def _errs(z, *args):
    """Relative errors of the cpu op's lse, stats and gradient against the float64 reference on the inputs as
    the kernel sees them, and the bound each must meet."""
    got = _fwd_bwd(backend_ext, z, *args)
    truth = _fwd_bwd(backend_reference, z.double(), *args)
    errs = [rel_err(a, r) for a, r in zip(got, truth)]
    if z.dtype == torch.float64:
        return errs, [1e-12] * 3
    # fp32 math on the rounded inputs; a low-precision gradient within 3 roundings of the exact one (the general
    # kernels round dz and dzc, then autograd their sum; the symmetric backward measures ~1.3 roundings)
    return errs, [1e-5, 1e-5, max(1e-5, 3 * rel_err(truth[2].to(z.dtype), truth[2]))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("fn_mode", MODES)
@pytest.mark.parametrize("batch", list(SYM_BATCHES))
def test_symmetric_kernels(batch, fn_mode, dtype, threads, monkeypatch):
    """The symmetric forward (upper-triangle tiles, column side merged per tile) and single-pass backward
    (M = G + G^T) against the float64 reference, and the general row/column kernels (PROTOCLR_CPU_SYMMETRIC=0)
    against the same bounds."""
    z, inst, proto = _sym_batch(batch, dtype)
    args = (inst, inst, proto, proto, 0, fn_mode)
    with _threads(threads):
        sym, tol = _errs(z, *args)
        monkeypatch.setenv("PROTOCLR_CPU_SYMMETRIC", "0")
        gen, _ = _errs(z, *args)
    print(
        f"{batch} {fn_mode} {dtype} {threads}t: lse/stats/grad err symmetric "
        + " ".join(f"{e:.1e}" for e in sym)
        + ", general "
        + " ".join(f"{e:.1e}" for e in gen)
    )
    assert all(e <= t for e, t in zip(sym, tol)) and all(e <= t for e, t in zip(gen, tol))


@pytest.mark.parametrize("fn_mode", MODES)
@pytest.mark.parametrize("case", ["row_offset", "other_labels"])
def test_symmetric_form_only_for_one_set(case, fn_mode):
    """zc is z, but the rows are not the columns (row_offset > 0) or the column labels differ: the masks are not
    symmetric and the general kernels must run (the symmetric ones would exclude the wrong diagonal or mask)."""
    z, inst, proto = _sym_batch("n613", torch.float64)
    if case == "row_offset":
        args = (inst, inst, proto, proto, 5, fn_mode)
    else:
        perm = torch.randperm(z.size(0), generator=torch.Generator().manual_seed(4))
        args = (inst, inst[perm], proto, proto[perm], 0, fn_mode)
    errs, tol = _errs(z, *args)
    assert all(e <= t for e, t in zip(errs, tol)), errs


def test_symmetric_backward_outputs(monkeypatch):
    """The op's outputs (csrc/ops.cpp): with zc z itself the symmetric backward returns the whole gradient in dz
    and zeros in dzc; a zc that only equals z (another tensor) still gets its own partial dzc."""
    z, inst, proto = _sym_batch("n97", torch.float64)
    lab = (inst, inst, proto, proto)
    lse, _ = backend_ext.contrastive(z, z, *lab, 0, 0.3, "mask")
    gl, gs = torch.randn_like(lse), torch.randn(z.size(0), 5, dtype=z.dtype)

    def bwd(zc):
        return torch.ops.protoclr.contrastive_bwd(gl, gs, z, zc, *lab, lse, 0, 0.3, "mask")

    dz, dzc = bwd(z)
    assert (dzc == 0).all()
    dz_c, dzc_c = bwd(z.clone())
    monkeypatch.setenv("PROTOCLR_CPU_SYMMETRIC", "0")
    dz_g, dzc_g = bwd(z)
    assert rel_err(dz, dz_g + dzc_g) <= 1e-12 and rel_err(dzc_c, dzc_g) <= 1e-12 and rel_err(dz_c, dz_g) <= 1e-12


# ------------------------------------------------------------------------------------ degenerate rows


def test_empty_denominator_lse_is_neg_inf_and_backward_finite():
    """mask mode, two images of one prototype: each anchor's only other-image column is a false negative. With
    a single view per image Den(i) is empty: lse = -inf, and even a nonzero grad_lse gives no NaN."""
    z = torch.nn.functional.normalize(torch.randn(2, 6, dtype=torch.float64), dim=1)
    inst, proto = torch.tensor([0, 1]), torch.tensor([4, 4])
    lse, st = backend_ext.contrastive(z, z, inst, inst, proto, proto, 0, 0.5, "mask")
    assert torch.isneginf(lse).all()
    assert st[:, 3].tolist() == [1.0, 1.0] and st[:, 1].tolist() == [0.0, 0.0]
    gs = torch.randn(2, 5, dtype=torch.float64)
    dz, dzc = torch.ops.protoclr.contrastive_bwd(
        torch.ones(2, dtype=torch.float64), gs, z, z, inst, inst, proto, proto, lse, 0, 0.5, "mask"
    )
    assert torch.isfinite(dz).all() and torch.isfinite(dzc).all()
    # only the F and A statistics carry gradient: G_ij = gs_i2 + gs_i4; zc is z, so dz + dzc is the defined part
    g = gs[:, 2] + gs[:, 4]
    assert torch.allclose(dz + dzc, (g[0] + g[1]) * z.flip(0))
    # the loss has no anchor at all
    loss = ops.contrastive_loss(z.clone().requires_grad_(), inst, proto, fn_mode="mask", backend="cpu")
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn_mode", MODES)
def test_huge_logits_and_rows_without_positives(dtype, fn_mode):
    """|c|/tau up to ~1e4 (unnormalised z, small tau) with singleton rows (grad_lse = 0): no inf/NaN leaks
    through the softmax weight of rows that carry no softmax gradient."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(12, 6, generator=g, dtype=torch.float64) * 30).to(dtype)
    inst = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8])
    proto = torch.tensor([0, 0, 1, 1, 0, 1, -1, 2, 2, 0, -1, 1])
    grads = {}
    for be, dt in (("reference", torch.float64), ("cpu", dtype)):
        zz = z.to(dt).requires_grad_()
        loss = ops.contrastive_loss(zz, inst, proto, tau=0.05, fn_mode=fn_mode, backend=be)
        grads[be] = (loss, *torch.autograd.grad(loss, zz))
    assert all(torch.isfinite(t).all() for t in grads["cpu"])
    # fp32: logits of ~1e4 carry ~1e-3 absolute rounding from c alone (ill-conditioned, not a kernel error)
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    assert max(rel_err(a, r) for a, r in zip(grads["cpu"], grads["reference"])) <= tol


def test_empty_column_set():
    """Nc = 0 columns (a direct call): lse = -inf, zero statistics and gradients; no crash."""
    z = torch.randn(3, 4)
    e = torch.empty(0, 4)
    inst, proto, none = torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    lse, st = torch.ops.protoclr.contrastive_fwd(z, e, inst, none, proto, none, 0, 0.5, "none")
    assert torch.isneginf(lse).all() and (st == 0).all()
    dz, dzc = torch.ops.protoclr.contrastive_bwd(
        torch.ones(3), torch.ones(3, 5), z, e, inst, none, proto, none, lse, 0, 0.5, "none"
    )
    assert (dz == 0).all() and dzc.shape == (0, 4)
    loss, count = torch.ops.protoclr.siamese_fwd(z, e, inst, none, proto, none, torch.ones(4), torch.zeros(1), 0)
    assert (loss == 0).all() and (count == 0).all()


# ------------------------------------------------------------------------------- direct-op validation


def _con_args(n=6, d=5, dtype=torch.float32):
    z = torch.randn(n, d, dtype=dtype)
    lab = torch.arange(n)
    return [z, z, lab, lab, lab, lab, 0, 0.5, "none"]


@pytest.mark.parametrize(
    "pos,value,match",
    [
        (0, torch.randn(6), "z"),
        (1, torch.randn(6, 4), "zc"),
        (1, torch.randn(6, 5, dtype=torch.float64), "zc"),
        (2, torch.arange(6, dtype=torch.int32), "inst"),
        (3, torch.arange(5), "instc"),
        (4, torch.arange(7), "proto"),
        (5, torch.zeros(6), "protoc"),
        (0, torch.randint(0, 3, (6, 5)), "z"),
        (6, -1, "row_offset"),
        (7, 0.0, "tau"),
        (7, float("nan"), "tau"),
        (8, "drop", "fn_mode"),
    ],
)
def test_contrastive_fwd_bad_input(pos, value, match):
    args = _con_args()
    args[pos] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.protoclr.contrastive_fwd(*args)


@pytest.mark.parametrize(
    "name,value",
    [
        ("grad_lse", torch.randn(5)),
        ("grad_stats", torch.randn(6, 4)),
        ("lse", torch.randn(6, 1)),
        ("grad_stats", torch.randint(0, 2, (6, 5))),
    ],
)
def test_contrastive_bwd_bad_input(name, value):
    z, zc, inst, instc, proto, protoc, off, tau, mode = _con_args()
    kw = dict(grad_lse=torch.randn(6), grad_stats=torch.randn(6, 5), lse=torch.randn(6))
    kw[name] = value
    with pytest.raises(ValueError, match=name):
        torch.ops.protoclr.contrastive_bwd(
            kw["grad_lse"], kw["grad_stats"], z, zc, inst, instc, proto, protoc, kw["lse"], off, tau, mode
        )


def _sia_args(n=6, d=5):
    h = torch.randn(n, d)
    lab = torch.arange(n)
    return [h, h, lab, lab, lab, lab, torch.randn(d), torch.randn(1), 0]


@pytest.mark.parametrize(
    "pos,value,match",
    [
        (0, torch.randn(6, 5, 1), "h"),
        (1, torch.randn(6, 3), "hc"),
        (1, torch.randn(6, 5, dtype=torch.float16), "hc"),
        (2, torch.arange(4), "inst"),
        (3, torch.arange(6, dtype=torch.int32), "instc"),
        (6, torch.randn(4), "weight"),
        (6, torch.randn(1, 5), "weight"),
        (6, torch.randn(5, dtype=torch.float16), "weight"),
        (7, torch.randn(2), "bias"),
        (8, -3, "row_offset"),
    ],
)
def test_siamese_fwd_bad_input(pos, value, match):
    args = _sia_args()
    args[pos] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.protoclr.siamese_fwd(*args)
    with pytest.raises(ValueError, match=match):
        torch.ops.protoclr.siamese_bwd(torch.randn(6, 2), *args)


def test_siamese_bwd_bad_grad():
    with pytest.raises(ValueError, match="grad_loss"):
        torch.ops.protoclr.siamese_bwd(torch.randn(6, 3), *_sia_args())


# ------------------------------------------------------------------------------------------ memory


def _peak_rss_delta_mb(fn) -> float | None:
    """Peak resident memory added while fn runs (Linux: reset VmHWM via /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        raise KeyError(key)

    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_no_n_by_n_buffer():
    """N = 4096 fp32 fwd+bwd: one N×N fp32 matrix would be 64 MiB; the fused op must stay far below it."""
    b = make_batch_n(4096, dz=128, k=50, dtype=torch.float32)
    z = b["z"].detach().requires_grad_()

    def run():
        loss = ops.contrastive_loss(z, b["inst"], b["proto"], fn_mode="mask", backend="cpu")
        loss.backward()

    run()  # warm up allocator and BLAS buffers
    z.grad = None
    delta = _peak_rss_delta_mb(run)
    if delta is None:
        pytest.skip("cannot reset the peak RSS counter")
    print(f"contrastive N=4096 D=128 fp32 fwd+bwd: peak RSS growth {delta:.1f} MiB (one N×N fp32 = 64 MiB)")
    # A bound from the sizes, not from an allocator: half of one N×N fp32 matrix. Any N×N buffer fails it; the
    # O(N·D) work buffers (per-thread tiles and strips, dz: a few N×D = 2 MiB each) stay far below it.
    assert delta < 4096 * 4096 * 4 / 2 / 2**20
