"""Triton-specific checks of the `triton` backend (kernels/, registered as `protoclr_triton::*`).

The shared suites (`test_ops_*.py -k triton`) cover every op and mode through the public API, and the row/column
split (row_offset > 0, zc a different tensor than z, the wide-feature D > 256 path). Here:
- degenerate rows (Den(i) empty -> lse = -inf with a non-zero upstream gradient);
- the interpreter's single-config path;
- `gpu`: N = 16,384 parity against a chunked float64 reference and peak memory O(N·D), never O(N²).
"""

from __future__ import annotations

import pytest
import torch

from protoclr.ops import backend_reference as ref
from protoclr.ops import backend_triton
from protoclr.ops.checks import FN_MODES as MODES
from tests.helpers import TRITON_KERNELS, make_batch, rel_err

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

pytestmark = [
    pytest.mark.skipif(
        backend_triton.available(DEVICE) is not None,
        reason=f"triton backend unavailable: {backend_triton.available(DEVICE)}",
    ),
    # Every test here runs on the GPU when there is one: then `pytest -m gpu` (bench/gpu_check.sh) must select
    # them all, not only the N = 16,384 ones; without a GPU they run in the interpreter in `make test`.
    *([pytest.mark.gpu] if HAS_CUDA else []),
]


def _kops():
    """The registered `protoclr_triton::*` ops (protoclr/ops/backend_triton.py)."""
    return torch.ops.protoclr_triton


def _split(b, nc: int, row_offset: int, n: int, key: str):
    """Columns = the first nc rows of the batch; rows = a copy of columns [row_offset, row_offset + n)."""
    xc = b[key][:nc].detach().clone()
    x = xc[row_offset : row_offset + n].clone()
    inst_c, proto_c = b["inst"][:nc], b["proto"][:nc]
    return x, xc, inst_c[row_offset : row_offset + n], inst_c, proto_c[row_offset : row_offset + n], proto_c


# --------------------------------------------------------------------------------- chunked references
# Exact float64 forms of the building blocks that never hold more than a row chunk of the N×Nc matrix:
# the comparator of the N = 16,384 GPU tests (backend_reference would need O(N²·D) memory for siamese
# gradients). Checked against backend_reference below.


def _contrastive_chunked(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode, grad_lse, grad_stats, chunk=1024):
    z, zc = z.double(), zc.double()
    gl, gs = grad_lse.double(), grad_stats.double()
    lse = torch.empty(z.size(0), dtype=torch.float64, device=z.device)
    stats = torch.empty(z.size(0), 5, dtype=torch.float64, device=z.device)
    dz, dzc = torch.zeros_like(z), torch.zeros_like(zc)
    gj = torch.arange(zc.size(0), device=z.device)
    for r0 in range(0, z.size(0), chunk):
        r1 = min(r0 + chunk, z.size(0))
        c = z[r0:r1] @ zc.T
        gi = row_offset + torch.arange(r0, r1, device=z.device)
        others = gi[:, None] != gj[None, :]
        same = inst[r0:r1, None] == instc[None, :]
        sp = (proto[r0:r1, None] >= 0) & (proto[r0:r1, None] == protoc[None, :])
        pos, fneg = others & same, ~same & sp
        den = others & ~fneg if fn_mode == "mask" else others
        s = torch.where(den, c / tau, float("-inf"))
        lse[r0:r1] = torch.logsumexp(s, 1)
        zero = c.new_zeros(())
        stats[r0:r1] = torch.stack(
            [torch.where(pos, c, zero).sum(1), pos.sum(1), torch.where(fneg, c, zero).sum(1), fneg.sum(1),
             torch.where(others, c, zero).sum(1)], 1,
        ).double()  # fmt: skip
        lse_r = lse[r0:r1, None]
        p = torch.where(den, torch.exp(s - torch.where(torch.isinf(lse_r), 0.0, lse_r)), zero)
        g = gl[r0:r1, None] * p / tau
        g = g + torch.where(pos, gs[r0:r1, 0:1], zero) + torch.where(fneg, gs[r0:r1, 2:3], zero)
        g = g + torch.where(others, gs[r0:r1, 4:5], zero)
        dz[r0:r1] = g @ zc
        dzc += g.T @ z[r0:r1]
    return lse, stats, dz, dzc


def _siamese_chunked(h, hc, inst, instc, proto, protoc, weight, bias, row_offset, grad_loss, chunk=32):
    h, hc = h.double(), hc.double()
    w, b = weight.double().reshape(-1), bias.double().reshape(())
    gl = grad_loss.double()
    loss = torch.zeros(h.size(0), 2, dtype=torch.float64, device=h.device)
    count = torch.zeros_like(loss)
    dh, dhc, dw = torch.zeros_like(h), torch.zeros_like(hc), torch.zeros_like(w)
    db = torch.zeros((), dtype=torch.float64, device=h.device)
    gj = torch.arange(hc.size(0), device=h.device)
    for r0 in range(0, h.size(0), chunk):
        r1 = min(r0 + chunk, h.size(0))
        diff = h[r0:r1, None, :] - hc[None, :, :]  # (chunk, Nc, D)
        d = diff.abs() @ w + b
        gi = row_offset + torch.arange(r0, r1, device=h.device)
        upper = gi[:, None] < gj[None, :]
        y = (inst[r0:r1, None] == instc[None, :]) | (
            (proto[r0:r1, None] >= 0) & (proto[r0:r1, None] == protoc[None, :])
        )
        l = torch.nn.functional.softplus(d) - y * d  # noqa: E741
        zero = d.new_zeros(())
        for k, m in enumerate((upper & ~y, upper & y)):
            loss[r0:r1, k] = torch.where(m, l, zero).sum(1)
            count[r0:r1, k] = m.sum(1).double()
        g = torch.where(upper, torch.where(y, gl[r0:r1, 1:2], gl[r0:r1, 0:1]) * (torch.sigmoid(d) - y.double()), zero)
        sg = g[:, :, None] * torch.sign(diff)
        dh[r0:r1] = w * sg.sum(1)
        dhc -= w * sg.sum(0)
        dw += (g[:, :, None] * diff.abs()).sum((0, 1))
        db += g.sum()
    return loss, count, dh, dhc, dw.reshape(weight.shape), db.reshape(bias.shape)


def _ref_contrastive_grads(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode, gl, gs):
    z, zc = z.detach().clone().requires_grad_(), zc.detach().clone().requires_grad_()
    lse, st = ref.contrastive(z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode)
    obj = (gl * torch.where(torch.isinf(lse), 0.0, lse)).sum() + (gs * st).sum()
    return (lse.detach(), st.detach(), *torch.autograd.grad(obj, (z, zc)))


def test_chunked_references_match_backend_reference():
    """The GPU tests' chunked comparators equal backend_reference (float64, split rows, every mode)."""
    b = make_batch(40, 2, dz=12, dh=9, k=3)
    z, zc, inst, instc, proto, protoc = _split(b, 70, 11, 40, "z")
    gl, gs = torch.randn(40, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    for fn_mode in MODES:
        want = _ref_contrastive_grads(z, zc, inst, instc, proto, protoc, 11, 0.4, fn_mode, gl, gs)
        got = _contrastive_chunked(z, zc, inst, instc, proto, protoc, 11, 0.4, fn_mode, gl, gs, chunk=16)
        assert all(rel_err(a, e) < 1e-12 for a, e in zip(got, want))
    h, hc, *_ = _split(b, 70, 11, 40, "h")
    w = b["weight"].clone().requires_grad_()
    bias = b["bias"].clone().requires_grad_()
    hg, hcg = h.clone().requires_grad_(), hc.clone().requires_grad_()
    g = torch.randn(40, 2, dtype=torch.float64)
    loss, count = ref.siamese(hg, hcg, inst, instc, proto, protoc, w, bias, 11)
    want = (loss, count, *torch.autograd.grad((g * loss).sum(), (hg, hcg, w, bias)))
    got = _siamese_chunked(h, hc, inst, instc, proto, protoc, b["weight"], b["bias"], 11, g, chunk=7)
    assert all(rel_err(a, e) < 1e-12 for a, e in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siamese_low_precision_vs_rounded_inputs(dtype):
    """Low-precision h: compared with the exact gradient of the *rounded* inputs (what fp32 accumulation
    can deliver); against unrounded inputs bf16 sign flips dominate dh (see tests/test_ops_siamese)."""
    b = make_batch(60, 2, dh=40, k=4)
    h = b["h"].to(dtype)
    args = (h, h, b["inst"], b["inst"], b["proto"], b["proto"], b["weight"].float(), b["bias"].float(), 0)
    g = torch.randn(h.size(0), 2)
    want = _siamese_chunked(h.double(), h.double(), *args[2:6], b["weight"], b["bias"], 0, g.double())
    kops = _kops()
    dev = [t.to(DEVICE) for t in args[:8]]
    got = (*kops.siamese_fwd(*dev, 0), *kops.siamese_bwd(g.to(DEVICE), *dev, 0))
    errs = [rel_err(a, e) for a, e in zip(got[:3] + got[4:], want[:3] + want[4:])]  # dh and dhc are h's twins
    assert max(errs) <= (1e-5 if dtype == torch.float32 else 1e-2), errs


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log2(0) = -inf
@pytest.mark.parametrize("fn_mode", MODES)
def test_contrastive_empty_denominator_rows(fn_mode):
    """Distinct images sharing one prototype: under "mask" Den(i) is empty, lse = -inf; a non-zero grad_lse
    on those rows must give finite gradients (only the stats terms contribute)."""
    n = 5
    z = torch.nn.functional.normalize(torch.randn(n, 16, dtype=torch.float64), dim=1)
    inst = torch.arange(n) + 10
    proto = torch.zeros(n, dtype=torch.int64)
    gl, gs = torch.randn(n, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    want = _ref_contrastive_grads(z, z, inst, inst, proto, proto, 0, 0.5, fn_mode, gl, gs)
    kops = _kops()
    dev = [t.to(DEVICE) for t in (z, z, inst, inst, proto, proto)]
    lse, st = kops.contrastive_fwd(*dev, 0, 0.5, fn_mode)
    if fn_mode == "mask":
        assert torch.isinf(lse).all() and (lse < 0).all()
    dz, dzc = kops.contrastive_bwd(gl.to(DEVICE), gs.to(DEVICE), *dev, lse, 0, 0.5, fn_mode)
    assert torch.isfinite(dz).all() and torch.isfinite(dzc).all()
    for a, e in zip((st, dz, dzc), want[1:]):
        assert rel_err(a, e) < 1e-9


# ------------------------------------------------------------- symmetric kernels (kernels/contrastive_sym.py)
# PROTOCLR_TRITON_SYMMETRIC=1 with zc z itself: upper-triangle tiles only, the whole gradient in dz. The
# interpreter's tiles are 64 rows, so 150 rows are 3 strips, the last ragged: diagonal, full and ragged
# off-diagonal tiles; 129 rows leave a last strip of one row.

SYM_CASES = {  # name: (images, views, D, share of images with proto = -1)
    "n150": (75, 2, 20, 0.25),
    "n2": (1, 2, 8, 0.0),
    "v3": (43, 3, 16, 0.25),
    "unknown": (70, 2, 16, 1.0),
    "d300": (65, 2, 300, 0.25),  # wider than one feature tile: the chunked path, output chunks on grid axis 2
}


def _general_fails(monkeypatch, module):
    def fail(*args, **kwargs):
        raise AssertionError(f"{module.__name__}'s kernels ran")

    monkeypatch.setattr(module, "contrastive_fwd", fail)
    monkeypatch.setattr(module, "contrastive_bwd", fail)


def _symmetric_only(monkeypatch):
    """PROTOCLR_TRITON_SYMMETRIC=1, and the general launchers fail if they are called."""
    from protoclr.kernels import contrastive

    monkeypatch.setenv("PROTOCLR_TRITON_SYMMETRIC", "1")
    _general_fails(monkeypatch, contrastive)


def _sym_batch(case):
    m, views, d, unknown = SYM_CASES[case]
    b = make_batch(m, views, dz=d, k=4, unknown=unknown)
    return b["z"].detach().to(DEVICE), b["inst"].to(DEVICE), b["proto"].to(DEVICE)


def _sym_check(z, inst, proto, fn_mode, tau=0.3):
    """(errors of lse, stats and dz against the float64 reference's lse, stats and dz + dzc; dzc) of the ops
    called with zc = z, instc = inst, protoc = proto (the same tensors)."""
    n = z.size(0)
    gl, gs = torch.randn(n, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    lab = (inst.cpu(), inst.cpu(), proto.cpu(), proto.cpu())
    want = _ref_contrastive_grads(z.cpu().double(), z.cpu().double(), *lab, 0, tau, fn_mode, gl, gs)
    kops = _kops()
    lse, st = kops.contrastive_fwd(z, z, inst, inst, proto, proto, 0, tau, fn_mode)
    gl, gs = gl.to(DEVICE, z.dtype), gs.to(DEVICE, z.dtype)
    dz, dzc = kops.contrastive_bwd(gl, gs, z, z, inst, inst, proto, proto, lse, 0, tau, fn_mode)
    return [rel_err(lse, want[0]), rel_err(st, want[1]), rel_err(dz, want[2] + want[3])], dzc


@pytest.mark.parametrize("fn_mode", MODES)
@pytest.mark.parametrize("case", list(SYM_CASES))
def test_contrastive_symmetric_vs_reference(case, fn_mode, monkeypatch):
    """The symmetric forward and single-pass backward (float64) against the reference: the whole gradient
    w.r.t. z in dz, zeros in dzc (csrc/ops.cpp); the general kernels must not run."""
    _symmetric_only(monkeypatch)
    z, inst, proto = _sym_batch(case)
    errs, dzc = _sym_check(z, inst, proto, fn_mode)
    print(f"symmetric {case} {fn_mode}: lse/stats/dz err", errs)
    assert max(errs) <= (1e-12 if DEVICE.type == "cpu" else 1e-9)
    assert dzc.shape == z.shape and not dzc.any()


@pytest.mark.parametrize("programs", [1000, 3])
def test_contrastive_symmetric_segments(programs, monkeypatch):
    """GPU grids cut each pair of strips into segments of CHUNK tiles; 250 rows are 4 strips, 2 pairs of
    5 tiles. 1000 programs: one tile per segment; 3: segments of 4 tiles, one of which ends inside a strip
    and one starts inside a strip (its row slot is not the diagonal's)."""
    from protoclr.kernels import contrastive_sym

    _symmetric_only(monkeypatch)
    monkeypatch.setattr(contrastive_sym, "_programs", lambda device: programs)
    assert contrastive_sym._grid(250, 64, programs) == ((2, 5, 1) if programs == 1000 else (2, 2, 4))
    b = make_batch(125, 2, dz=16, k=4)
    z, inst, proto = b["z"].to(DEVICE), b["inst"].to(DEVICE), b["proto"].to(DEVICE)
    for fn_mode in ("none", "mask"):
        errs, _ = _sym_check(z, inst, proto, fn_mode)
        assert max(errs) <= (1e-12 if DEVICE.type == "cpu" else 1e-9), (fn_mode, errs)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log2(0) = -inf
def test_contrastive_symmetric_empty_denominator_rows(monkeypatch):
    """fn_mode "mask", distinct images of one prototype: Den(i) is empty, lse = -inf from the slot merge, and a
    non-zero grad_lse on those rows gives the finite gradient of the statistics alone."""
    _symmetric_only(monkeypatch)
    z = torch.nn.functional.normalize(torch.randn(70, 16, dtype=torch.float64), dim=1).to(DEVICE)
    inst = (torch.arange(70) + 10).to(DEVICE)
    proto = torch.zeros(70, dtype=torch.int64, device=DEVICE)
    lse, _ = _kops().contrastive_fwd(z, z, inst, inst, proto, proto, 0, 0.5, "mask")
    assert torch.isinf(lse).all() and (lse < 0).all()
    errs, _ = _sym_check(z, inst, proto, "mask", tau=0.5)
    assert max(errs[1:]) <= 1e-9, errs


@pytest.mark.parametrize("fn_mode", MODES)
def test_contrastive_symmetric_switch_keeps_general_forms(fn_mode, monkeypatch):
    """With PROTOCLR_TRITON_SYMMETRIC=1, the DDP split (rows local, columns gathered, row_offset > 0) and a zc
    that only equals z (another tensor) take the general kernels (the symmetric ones are made to fail) and
    return their own dz and dzc; so does zc z itself without the switch."""
    from protoclr.kernels import contrastive_sym

    _general_fails(monkeypatch, contrastive_sym)
    kops = _kops()
    b = make_batch(80, 2, dz=20, k=4)
    gl, gs = torch.randn(70, dtype=torch.float64), torch.randn(70, 5, dtype=torch.float64)
    split = _split(b, 150, 37, 70, "z")
    z = b["z"][:70].detach()
    inst, proto = b["inst"][:70], b["proto"][:70]
    cases = {"split": (split, 37, "1"), "copy": ((z, z.clone(), inst, inst, proto, proto), 0, "1")}
    cases["off"] = ((z, z, inst, inst, proto, proto), 0, "0")
    for name, (args, row_offset, env) in cases.items():
        monkeypatch.setenv("PROTOCLR_TRITON_SYMMETRIC", env)
        want = _ref_contrastive_grads(*args, row_offset, 0.3, fn_mode, gl, gs)
        dev = [t.to(DEVICE) for t in args]
        if name != "split":
            dev[1], dev[3], dev[5] = (dev[0] if name == "off" else dev[1]), dev[2], dev[4]
        lse, st = kops.contrastive_fwd(*dev, row_offset, 0.3, fn_mode)
        dz, dzc = kops.contrastive_bwd(gl.to(DEVICE), gs.to(DEVICE), *dev, lse, row_offset, 0.3, fn_mode)
        errs = [rel_err(a, e) for a, e in zip((lse, st, dz, dzc), want)]
        assert max(errs) <= (1e-10 if DEVICE.type == "cpu" else 1e-9), (name, errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contrastive_symmetric_low_precision_loss(dtype, monkeypatch):
    """contrastive_loss on the triton backend (autograd: dz holds the whole gradient, dzc zeros) against the
    float64 reference on the rounded inputs, within SPEC's bounds and within 2x the general kernels' error."""
    from protoclr import ops

    b = make_batch(75, 2, dz=40, k=4)
    z = b["z"].to(dtype)
    zr = z.double().requires_grad_()
    want = ops.contrastive_loss(zr, b["inst"], b["proto"], tau=0.2, fn_mode="mask", backend="reference")
    want = (want, *torch.autograd.grad(want, zr))
    from protoclr.kernels import contrastive_sym

    calls = []
    bwd = contrastive_sym.contrastive_bwd
    monkeypatch.setattr(contrastive_sym, "contrastive_bwd", lambda *a: calls.append(1) or bwd(*a))
    errs = {}
    for env in ("0", "1"):
        monkeypatch.setenv("PROTOCLR_TRITON_SYMMETRIC", env)
        zt = z.to(DEVICE).requires_grad_()
        loss = ops.contrastive_loss(zt, b["inst"].to(DEVICE), b["proto"].to(DEVICE), tau=0.2, fn_mode="mask",
                                    backend="triton")  # fmt: skip
        got = (loss, *torch.autograd.grad(loss, zt))
        errs[env] = [rel_err(a, e) for a, e in zip(got, want)]
    print(f"symmetric {dtype}: loss/grad err {errs['1']}, general {errs['0']}")
    assert len(calls) == 1
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert all(e <= bound and e <= 2 * g + 1e-7 for e, g in zip(errs["1"], errs["0"])), errs


def test_contrastive_symmetric_opcheck(monkeypatch):
    monkeypatch.setenv("PROTOCLR_TRITON_SYMMETRIC", "1")
    ops_ = backend_triton.torch_ops()
    b = make_batch(6, 2, dz=20, k=2, dtype=torch.float32, device=DEVICE)
    z = b["z"].detach().requires_grad_()
    lab = (b["inst"], b["inst"], b["proto"], b["proto"])
    torch.library.opcheck(ops_["contrastive_fwd"], (z, z, *lab, 0, 0.5, "mask"))
    lse, _ = ops_["contrastive_fwd"](z.detach(), z.detach(), *lab, 0, 0.5, "mask")
    grads = (torch.randn_like(lse), torch.randn(z.size(0), 5, device=DEVICE))
    zd = z.detach()
    torch.library.opcheck(ops_["contrastive_bwd"], (*grads, zd, zd, *lab, lse, 0, 0.5, "mask"))


def test_assign_wide_features_and_many_tiles():
    """D > 128 (the feature loop) and K over several tiles, fp64 exact; lowest index across tiles."""
    x = torch.randn(150, 300, dtype=torch.float64)
    c = torch.randn(200, 300, dtype=torch.float64)
    bias = torch.randn(200, dtype=torch.float64)
    kops = _kops()
    idx, score = kops.assign(x.to(DEVICE), c.to(DEVICE), bias.to(DEVICE))
    ridx, rscore = ref.assign(x, c, bias)
    assert torch.equal(idx.cpu(), ridx) and rel_err(score, rscore) < 1e-12
    c[150] = c[7]  # duplicate a winner across tiles
    x[0] = c[7]
    idx, _ = kops.assign(x[:1].to(DEVICE), c.to(DEVICE), None)
    assert idx.item() == 7


def test_torch_ops_table():
    ops_ = backend_triton.torch_ops()
    assert set(ops_) == {"assign", "contrastive_fwd", "contrastive_bwd", "siamese_fwd", "siamese_bwd"}
    assert all(str(op).startswith("protoclr_triton.") for op in ops_.values())


@pytest.mark.skipif(HAS_CUDA, reason="interpreter path only")
def test_interpreter_single_config():
    """Under TRITON_INTERPRET=1 kernels are plain (no autotuner, no do_bench) and launch one fixed config."""
    import triton
    from protoclr.kernels import assign, contrastive, contrastive_sym, siamese, utils

    assert utils.INTERPRET
    kernels = [
        assign._assign_kernel,
        contrastive._contrastive_fwd_kernel,
        contrastive._contrastive_bwd_rows_kernel,
        contrastive._contrastive_bwd_cols_kernel,
        contrastive_sym._contrastive_sym_fwd_kernel,
        contrastive_sym._contrastive_sym_bwd_kernel,
        siamese._siamese_fwd_kernel,
        siamese._siamese_bwd_kernel,
    ]
    for k in kernels:
        assert not isinstance(k, triton.runtime.Autotuner)
        assert isinstance(k.interp_config, dict) and all(v >= 8 for v in k.interp_config.values())
    # the GPU config lists are well formed; the shared-memory prune keeps bf16's default config and always
    # leaves one that fits, whatever the dtype
    for dtype, bd in [(torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128), (torch.float64, 64)]:
        args = {"z_ptr": torch.empty(1, dtype=dtype), "x_ptr": torch.empty(1, dtype=dtype)}
        for prune, cfgs in [
            (contrastive._prune_fwd, contrastive._FWD_CONFIGS),
            (contrastive._prune_rows, contrastive._ROWS_CONFIGS),
            (contrastive._prune_cols, contrastive._COLS_CONFIGS),
            (contrastive_sym._prune_fwd, contrastive_sym._FWD_CONFIGS),
            (contrastive_sym._prune_bwd, contrastive_sym._BWD_CONFIGS),
            (assign._prune, assign._CONFIGS),
        ]:
            kept = prune(cfgs, args, BLOCK_D=bd)
            assert kept and (dtype != torch.bfloat16 or bd > 128 or kept[0] is cfgs[0])
    # nothing fits: the symmetric kernels' fallback is square (BLOCK), not the general kernels' BLOCK_M/BLOCK_N
    wide = {"z_ptr": torch.empty(1, dtype=torch.float64)}
    for prune, cfgs in [(contrastive_sym._prune_fwd, contrastive_sym._FWD_CONFIGS),
                        (contrastive_sym._prune_bwd, contrastive_sym._BWD_CONFIGS)]:  # fmt: skip
        assert prune(cfgs, wide, BLOCK_D=4096) == [contrastive_sym._SAFE_CONFIG]
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(siamese._CONFIGS[0].kwargs)


# ------------------------------------------------------------------------------------ GPU, N = 16,384


def _peak_extra(fn):
    """(result, peak bytes allocated by fn beyond what was live before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", ["0", "1"])  # PROTOCLR_TRITON_SYMMETRIC: general or symmetric kernels
def test_gpu_contrastive_16k(dtype, symmetric, monkeypatch):
    monkeypatch.setenv("PROTOCLR_TRITON_SYMMETRIC", symmetric)
    n, d = 16384, 128
    b = make_batch(n // 2, 2, dz=d, k=512, device="cuda", dtype=torch.float32)
    z = b["z"].to(dtype)
    inst, proto = b["inst"], b["proto"]
    # realistic scales (grad_lse = 1/#anchors): G ~ 1e-9, which fp16 could not hold (see kernels._acc_dot)
    gl = torch.randn(n, device="cuda") / n
    gs = torch.randn(n, 5, device="cuda") / n
    kops = _kops()
    args = (z, z, inst, inst, proto, proto, 0, 0.2, "mask")

    def run():
        lse, st = kops.contrastive_fwd(*args)
        return lse, st, *kops.contrastive_bwd(gl, gs, z, z, inst, inst, proto, proto, lse, 0, 0.2, "mask")

    run()  # autotune outside the measurement (do_bench allocates its own buffers)
    got, peak = _peak_extra(run)
    want = _contrastive_chunked(z, z, inst, inst, proto, proto, 0, 0.2, "mask", gl, gs)
    if symmetric == "1":  # the whole gradient in dz, zeros in dzc
        assert not got[3].any()
        got, want = got[:3], (*want[:2], want[2] + want[3])
    errs = [rel_err(a, e) for a, e in zip(got, want)]
    print(
        f"contrastive N={n} D={d} {dtype} symmetric={symmetric}: lse/stats/dz(/dzc) err {errs}, "
        f"peak extra {peak / 2**20:.1f} MiB"
    )
    assert max(errs) <= (1e-5 if dtype == torch.float32 else 1e-2)  # SPEC §3; plain TF32 (~5e-4) must fail
    # O(N·D): dz, dzc and the label-set segment sums (a few (N + Nc, D) fp32 buffers) plus O(N) statistics;
    # one N×N fp32 buffer would be 1 GiB. The symmetric forward adds its (max, sum) slots, 2·(N/64)·N fp32
    # (32 MiB here).
    assert peak <= 48 * n * d * 4 + (1 << 20)
    again = run()
    # The general kernels are two passes without atomics, but the label-set sums (`_segment`) use index_add_,
    # which is atomic on CUDA (and the symmetric backward adds its column sides atomically): summation order
    # varies, so runs agree to fp32 rounding, not bitwise.
    assert all(rel_err(a, e) <= 1e-5 for a, e in zip(again, got))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_siamese_16k(dtype):
    n, d = 16384, 256
    b = make_batch(n // 2, 2, dh=d, k=512, device="cuda", dtype=torch.float32)
    h = b["h"].to(dtype)
    w, bias = b["weight"], b["bias"]
    inst, proto = b["inst"], b["proto"]
    g = torch.randn(n, 2, device="cuda") / n
    kops = _kops()
    args = (h, h, inst, inst, proto, proto, w, bias, 0)

    def run():
        return (*kops.siamese_fwd(*args), *kops.siamese_bwd(g, *args))

    run()
    got, peak = _peak_extra(run)
    want = _siamese_chunked(h.double(), h.double(), inst, inst, proto, proto, w, bias, 0, g)
    errs = [rel_err(a, e) for a, e in zip(got, want)]
    print(f"siamese N={n} D={d} {dtype}: loss/count/dh/dhc/dw/db err {errs}, peak extra {peak / 2**20:.1f} MiB")
    assert max(errs) <= (1e-5 if dtype == torch.float32 else 1e-2)  # SPEC §3; plain TF32 (~5e-4) must fail
    assert peak <= 16 * n * d * 4 + (1 << 20)  # O(N·D) accumulators and copies; one N×N fp32 buffer: 1 GiB
    again = run()  # autotuner reset_to_zero + atomics: same result up to summation order
    assert all(rel_err(a, e) < 1e-5 for a, e in zip(again, got))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_assign_16k():
    x = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    bias = -0.5 * c.float().pow(2).sum(1)
    kops = _kops()
    kops.assign(x, c, bias)
    (idx, score), peak = _peak_extra(lambda: kops.assign(x, c, bias))
    full = x.double() @ c.double().T + bias.double()
    best = full.max(1).values
    chosen = full.gather(1, idx[:, None]).squeeze(1)
    # bf16 products are exact in fp32, so the only error is fp32 accumulation over D terms: |error| <=
    # D·2⁻²⁴·Σ|x_d c_d| + the bias' rounding (the bound of recursive summation, in any order)
    u = 2.0**-24
    bound = 256 * u * (x.double().abs() @ c.double().abs().T).max(1).values + u * bias.double().abs().max()
    assert ((best - chosen).abs() <= 2 * bound).all()
    assert ((score.double() - best).abs() <= bound).all()
    assert peak <= 16384 * 16 + (1 << 20)  # no M×K buffer


# ------------------------------------------------------------------------------ quick GPU benchmark
# `python -m tests.test_triton_backend` on a GPU: kernel timings with autotuning (bench/ holds the
# benchmark proper; this is the kernel author's quick check). FLOP models from SPEC §5.


def _bench(parts=("contrastive", "siamese", "baseline")) -> None:  # pragma: no cover - GPU only
    import time

    import triton
    from triton.testing import do_bench

    from protoclr import ops

    kops = _kops()
    t_start = time.time()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192**3 / do_bench(lambda: a @ a, return_mode="median") / 1e9
    print(f"bf16 matmul 8192^3: {mm:.0f} TFLOP/s", flush=True)

    from protoclr.kernels import contrastive, siamese

    runs = [(65536, 128, "none", torch.bfloat16), (65536, 128, "mask", torch.bfloat16)]
    for n, d, mode, dtype in runs if "contrastive" in parts else []:
        b = make_batch(n // 2, 2, dz=d, k=3000, device="cuda", dtype=dtype)
        z, inst, proto = b["z"], b["inst"], b["proto"]
        args = (z, z, inst, inst, proto, proto, 0, 0.2, mode)
        t0 = time.time()
        lse, _ = kops.contrastive_fwd(*args)
        gl, gs = torch.randn(n, device="cuda") / n, torch.randn(n, 5, device="cuda") / n
        bwd = (gl, gs, z, z, inst, inst, proto, proto, lse, 0, 0.2, mode)
        kops.contrastive_bwd(*bwd)
        torch.cuda.synchronize()
        tune = time.time() - t0
        f = do_bench(lambda args=args: kops.contrastive_fwd(*args), return_mode="median")
        g = do_bench(lambda bwd=bwd: kops.contrastive_bwd(*bwd), return_mode="median")
        fwd_tf, tot_tf = 2 * n * n * d / f / 1e9, 8 * n * n * d / (f + g) / 1e9
        print(
            f"contrastive N={n} D={d} {mode} {dtype}: fwd {f:.2f} ms ({fwd_tf:.0f} TFLOP/s), bwd {g:.2f} ms, "
            f"fwd+bwd {tot_tf:.0f} TFLOP/s = {tot_tf / mm:.0%} of matmul (tuning {tune:.0f}s)",
            flush=True,
        )
    for k in ("_contrastive_fwd_kernel", "_contrastive_bwd_rows_kernel", "_contrastive_bwd_cols_kernel"):
        print(k, getattr(getattr(contrastive, k), "best_config", None), flush=True)

    runs = [(16384, 2048, torch.bfloat16), (16384, 2048, torch.float32)]
    for n, d, dtype in runs if "siamese" in parts else []:
        b = make_batch(n // 2, 2, dh=d, k=3000, device="cuda", dtype=dtype)
        h, w, bias, inst, proto = b["h"], b["weight"], b["bias"], b["inst"], b["proto"]
        args = (h, h, inst, inst, proto, proto, w, bias, 0)
        gl = torch.randn(n, 2, device="cuda") / n
        t0 = time.time()
        kops.siamese_fwd(*args)
        kops.siamese_bwd(gl, *args)
        torch.cuda.synchronize()
        tune = time.time() - t0
        f = do_bench(lambda args=args: kops.siamese_fwd(*args), return_mode="median", rep=200)
        g = do_bench(lambda args=args, gl=gl: kops.siamese_bwd(gl, *args), return_mode="median", rep=200)
        print(
            f"siamese N={n} Dh={d} {dtype}: fwd {f:.1f} ms ({1.5 * n * n * d / f / 1e9:.1f} TFLOP/s), bwd {g:.1f} ms,"
            f" fwd+bwd {4.5 * n * n * d / (f + g) / 1e9:.1f} TFLOP/s (tuning {tune:.0f}s)",
            flush=True,
        )
    for k in ("_siamese_fwd_kernel", "_siamese_bwd_kernel"):
        print(k, getattr(getattr(siamese, k), "best_config", None), flush=True)

    # torch.compile(reference) is O(N²·D) memory with gradients: measured small, scaled by N² (both are ~N²).
    if "baseline" in parts and time.time() - t_start < 240:
        n, d = 512, 2048
        b = make_batch(n // 2, 2, dh=d, k=16, device="cuda", dtype=torch.float32)
        leaves = [b[k].detach().requires_grad_() for k in ("h", "weight", "bias")]

        def step(backend):
            loss = ops.siamese_loss(leaves[0], b["inst"], b["proto"], leaves[1], leaves[2], backend=backend)
            return torch.autograd.grad(loss, leaves)

        ref_c = torch.compile(lambda: step("reference"))
        ref_c()
        tc = do_bench(ref_c, return_mode="median")
        te = do_bench(lambda: step("reference"), return_mode="median")
        tt = do_bench(lambda: step("triton"), return_mode="median")
        print(
            f"siamese N={n} Dh={d} fp32 fwd+bwd: compile(reference) {tc:.2f} ms, eager {te:.2f} ms, triton {tt:.2f} ms"
            f" -> at N=16384 compile(reference) ~{tc * (16384 / n) ** 2 / 1e3:.1f} s (N² scaling)",
            flush=True,
        )


def _probe() -> None:  # pragma: no cover - GPU only
    """Per-config timings and compile facts (registers, spills, wgmma) of the contrastive kernels at
    N = 65,536, D = 128, bf16, every fn_mode: which config should be the default."""
    import triton
    from protoclr.kernels import contrastive as C
    from triton.testing import do_bench

    n, d = 65536, 128
    b = make_batch(n // 2, 2, dz=d, k=3000, device="cuda", dtype=torch.bfloat16)
    z = b["z"]
    codes = C._codes(b["inst"], b["inst"], b["proto"], b["proto"])[:4]
    lse = torch.empty(n, device="cuda")
    out = torch.empty_like(z)
    extra = torch.zeros(n, d, device="cuda")
    gl = torch.randn(n, device="cuda") / n

    def facts(ck):
        ptx = ck.asm.get("ptx", "")
        return f"regs {ck.n_regs} spills {ck.n_spills} wgmma {'wgmma' in ptx}"

    for mode in ("none", "mask"):
        consts, meta, _ = C._common(z, 0.2, mode == "mask")
        strides = (z.stride(0), z.stride(1), z.stride(0), z.stride(1))
        for cfg in C._FWD_CONFIGS[:4]:

            def fwd(cfg=cfg, consts=consts, strides=strides, meta=meta):
                return C._contrastive_fwd_kernel.fn[(triton.cdiv(n, cfg.kwargs["BLOCK_M"]),)](
                    z, z, *codes, consts, lse, n, n, d, 0, *strides,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs, **meta,
                )  # fmt: skip

            ck = fwd()
            t = do_bench(fwd, return_mode="median", warmup=5, rep=40)
            print(f"{mode} fwd {cfg}: {t:.2f} ms {facts(ck)}", flush=True)
        for name, kern, cfgs, axis in [
            ("rows", C._contrastive_bwd_rows_kernel, C._ROWS_CONFIGS, "BLOCK_M"),
            ("cols", C._contrastive_bwd_cols_kernel, C._COLS_CONFIGS, "BLOCK_N"),
        ]:
            for cfg in cfgs[:4]:

                def bwd(cfg=cfg, kern=kern, axis=axis, consts=consts, strides=strides, meta=meta):
                    return kern.fn[(triton.cdiv(n, cfg.kwargs[axis]), 1)](
                        gl, lse, z, z, *codes, consts, extra, out, n, n, d, 0, *strides, out.stride(0), out.stride(1),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, G_FP32=False, **cfg.kwargs, **meta,
                    )  # fmt: skip

                ck = bwd()
                t = do_bench(bwd, return_mode="median", warmup=5, rep=40)
                print(f"{mode} bwd {name} {cfg}: {t:.2f} ms {facts(ck)}", flush=True)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["probe"]:
        _probe()
    else:
        _bench(tuple(sys.argv[1:]) or ("contrastive", "siamese", "baseline"))


def test_tuned_configs_reports_the_autotuners_choices(monkeypatch):
    """`utils.tuned_configs()` (recorded by bench/kernels.py next to GPU timings) lists each autotuned kernel's
    chosen config per key; without a GPU the kernels are decorated in a subprocess with the interpreter off."""
    import json
    import os
    import subprocess
    import sys

    from protoclr.kernels import utils

    class FakeTuner:
        def __init__(self, cache):
            self.cache = cache

    monkeypatch.setattr(
        utils,
        "_TUNED",
        {"_k1": FakeTuner({(4096, "torch.bfloat16"): "BLOCK_M: 128, num_warps: 8"}), "_k2": FakeTuner({})},
    )
    assert utils.tuned_configs() == {"_k1": {"(4096, 'torch.bfloat16')": "BLOCK_M: 128, num_warps: 8"}}

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from protoclr.kernels import assign, contrastive, contrastive_sym, siamese, utils; "
        "print(json.dumps(sorted(utils._TUNED)))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # TRITON_KERNELS: the ones bench/sm90_resources.py audits; the opt-in symmetric kernels are not audited yet
    sym = ["_contrastive_sym_fwd_kernel", "_contrastive_sym_bwd_kernel"]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == sorted([*TRITON_KERNELS, *sym])
