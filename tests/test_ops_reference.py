"""The reference backend against independent brute-force float64 loops over pairs (SPEC §1)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protoclr import ops
from protoclr.ops import checks
from protoclr.ops.checks import FN_MODES as MODES
from protoclr.ops.checks import TAU_RANGE
from tests.helpers import make_batch, rel_err

# ----------------------------------------------------------------------------------------- brute force


def brute_contrastive(z, inst, proto, tau, fn_mode):
    """SPEC 1.1 with explicit loops; torch scalar ops so autograd gives the gradient too."""
    n = z.size(0)
    inst, proto = inst.tolist(), proto.tolist()
    losses = []
    for i in range(n):
        P = [j for j in range(n) if j != i and inst[j] == inst[i]]
        Fn = [j for j in range(n) if inst[j] != inst[i] and proto[i] >= 0 and proto[j] == proto[i]]
        pos = P + Fn if fn_mode == "attract" else P
        den = [j for j in range(n) if j != i and not (fn_mode == "mask" and j in Fn)]
        if not pos:
            continue
        s = lambda j: (z[i] * z[j]).sum() / tau  # noqa: B023
        lse = torch.stack([s(j) for j in den]).logsumexp(0)
        losses.append(-sum(s(p) for p in pos) / len(pos) + lse)
    return torch.stack(losses).mean() if losses else z.sum() * 0


def brute_siamese(h, inst, proto, w, b, pairs=None, balance=True):
    n = h.size(0)
    inst, proto = inst.tolist(), proto.tolist()
    if pairs is None:
        plist = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        plist = list(zip(pairs[0].tolist(), pairs[1].tolist()))
    per = {0: [], 1: []}
    for i, j in plist:
        y = int(inst[i] == inst[j] or (proto[i] >= 0 and proto[i] == proto[j]))
        d = (w.reshape(-1) * (h[i] - h[j]).abs()).sum() + b.reshape(())
        per[y].append(F.softplus(d, threshold=math.inf) - y * d)  # exact: no linear branch above d = 20
    if balance:
        means = [torch.stack(v).mean() for v in per.values() if v]
        return torch.stack(means).mean()
    return torch.stack(per[0] + per[1]).mean()


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


# ----------------------------------------------------------------------------------------- contrastive


@pytest.mark.parametrize("fn_mode", MODES)
@pytest.mark.parametrize("m,views,k,unknown", [(1, 2, 1, 0.0), (4, 2, 2, 0.25), (5, 3, 3, 0.4), (6, 2, 1, 0.0)])
def test_contrastive_matches_brute_force(fn_mode, m, views, k, unknown):
    b = make_batch(m, views, k=k, unknown=unknown, requires_grad=True)
    tau = 0.37
    got = ops.contrastive_loss(b["z"], b["inst"], b["proto"], tau=tau, fn_mode=fn_mode, backend="reference")
    want = brute_contrastive(b["z"], b["inst"], b["proto"], tau, fn_mode)
    assert rel_err(got, want) < 1e-12
    (g,) = _grads(got, b["z"])
    (gw,) = _grads(want, b["z"])
    assert rel_err(g, gw) < 1e-11


def test_ntxent_closed_form():
    """V=2, fn_mode none == NT-Xent: l_i = -s_{i,i'} + log Σ_{j≠i} exp(s_ij), rows i and i+M paired."""
    m, tau = 7, 0.5
    z = F.normalize(torch.randn(2 * m, 9, dtype=torch.float64), dim=1)
    inst = torch.arange(m).repeat(2)
    proto = torch.full_like(inst, -1)
    s = z @ z.T / tau
    s.fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
    want = (-s[torch.arange(2 * m), partner] + s.logsumexp(1)).mean()
    got = ops.contrastive_loss(z, inst, proto, tau=tau, backend="reference")
    assert rel_err(got, want) < 1e-13
    # proto ids do not change fn_mode="none"
    proto2 = torch.randint(0, 2, (m,)).repeat(2)
    assert rel_err(ops.contrastive_loss(z, inst, proto2, tau=tau, backend="reference"), want) < 1e-13


@pytest.mark.parametrize("fn_mode", MODES)
def test_contrastive_gradcheck(fn_mode):
    b = make_batch(4, 2, dz=5, k=2, requires_grad=True)
    f = lambda z: ops.contrastive_loss(z, b["inst"], b["proto"], tau=0.4, fn_mode=fn_mode, backend="reference")
    assert torch.autograd.gradcheck(f, (b["z"],))


def test_contrastive_no_positives_is_zero_with_zero_grad():
    z = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1).requires_grad_()
    inst = torch.arange(6)
    proto = torch.full_like(inst, -1)
    for mode in MODES:
        loss = ops.contrastive_loss(z, inst, proto, fn_mode=mode, backend="reference")
        (g,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and torch.isfinite(g).all() and g.abs().max() == 0


def test_contrastive_one_prototype_mask_and_attract():
    """All rows share one prototype: mask leaves only the same-image views in the denominator."""
    b = make_batch(4, 2, k=1, unknown=0.0, requires_grad=True)
    for mode in ("mask", "attract"):
        got = ops.contrastive_loss(b["z"], b["inst"], b["proto"], fn_mode=mode, backend="reference")
        want = brute_contrastive(b["z"], b["inst"], b["proto"], 0.5, mode)
        assert rel_err(got, want) < 1e-12
        (g,) = torch.autograd.grad(got, b["z"])
        assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------- siamese


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("m,views,k,unknown", [(1, 2, 1, 0.0), (4, 2, 2, 0.25), (5, 3, 3, 0.4)])
def test_siamese_dense_matches_brute_force(balance, m, views, k, unknown):
    b = make_batch(m, views, k=k, unknown=unknown, requires_grad=True)
    args = (b["h"], b["inst"], b["proto"], b["weight"], b["bias"])
    got = ops.siamese_loss(*args, balance=balance, backend="reference")
    want = brute_siamese(*args, balance=balance)
    assert rel_err(got, want) < 1e-12
    for g, gw in zip(_grads(got, b["h"], b["weight"], b["bias"]), _grads(want, b["h"], b["weight"], b["bias"])):
        assert rel_err(g, gw) < 1e-11


@pytest.mark.parametrize("balance", [True, False])
def test_siamese_pairs_match_brute_force(balance):
    b = make_batch(5, 2, k=2, requires_grad=True)
    n = b["h"].size(0)
    i_idx = torch.randint(0, n, (23,))
    j_idx = torch.randint(0, n, (23,))
    args = (b["h"], b["inst"], b["proto"], b["weight"], b["bias"])
    got = ops.siamese_loss(*args, pairs=(i_idx, j_idx), balance=balance, backend="reference")
    want = brute_siamese(*args, pairs=(i_idx, j_idx), balance=balance)
    assert rel_err(got, want) < 1e-12
    for g, gw in zip(_grads(got, b["h"], b["weight"]), _grads(want, b["h"], b["weight"])):
        assert rel_err(g, gw) < 1e-11


@pytest.mark.parametrize("balance", [True, False])
def test_siamese_exact_for_large_logits(balance):
    """|d| > 20, where F.softplus(d) returns d itself (off by up to 2e-9 per pair): the reference lost ~1e-10
    against exact float64 pair sums (the loss 1e-11, dh 1e-10), which read as a cpu error past one tile."""
    b = make_batch(8, 2, dh=8, k=2, requires_grad=True)
    h = (b["h"].detach() * 30).requires_grad_()
    args = (h, b["inst"], b["proto"], b["weight"], b["bias"])
    got = ops.siamese_loss(*args, balance=balance, backend="reference")
    # the loss in plain Python floats, softplus(d) - y·d = softplus(±d) = max(±d, 0) + log1p(exp(-|d|))
    n, hl, w, bias = h.size(0), h.tolist(), b["weight"].tolist(), b["bias"].item()
    inst, proto = b["inst"].tolist(), b["proto"].tolist()
    per, ds = {0: [], 1: []}, []
    for i in range(n):
        for j in range(i + 1, n):
            y = int(inst[i] == inst[j] or (proto[i] >= 0 and proto[i] == proto[j]))
            d = math.fsum(wk * abs(a - c) for wk, a, c in zip(w, hl[i], hl[j])) + bias
            ds.append(d)
            x = -d if y else d
            per[y].append(max(x, 0.0) + math.log1p(math.exp(-abs(x))))
    if balance:
        want = sum(math.fsum(v) / len(v) for v in per.values() if v) / sum(1 for v in per.values() if v)
    else:
        want = math.fsum(per[0] + per[1]) / (len(per[0]) + len(per[1]))
    assert max(ds) > 20 and abs(got.item() - want) <= 1e-14 * abs(want)
    brute = brute_siamese(*args, balance=balance)
    for g, gw in zip(_grads(got, h, b["weight"], b["bias"]), _grads(brute, h, b["weight"], b["bias"])):
        assert rel_err(g, gw) < 1e-13


def test_siamese_gradcheck():
    b = make_batch(3, 2, dh=5, k=2, requires_grad=True)
    f = lambda h, w, bias: ops.siamese_loss(h, b["inst"], b["proto"], w, bias, backend="reference")
    assert torch.autograd.gradcheck(f, (b["h"], b["weight"], b["bias"]))


def test_siamese_sign_zero_gradient():
    """Identical rows: |h_i - h_j| has subgradient sign(0) = 0, so those pairs give h no gradient."""
    h = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    inst = torch.tensor([0, 0, 1, 1])
    proto = torch.full_like(inst, -1)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.full((1,), 0.3, dtype=torch.float64, requires_grad=True)
    loss = ops.siamese_loss(h, inst, proto, w, bias, backend="reference")
    gh, gw, gb = torch.autograd.grad(loss, (h, w, bias))
    assert gh.abs().max() == 0 and gw.abs().max() == 0 and gb.abs() > 0


def test_siamese_single_class_balanced_is_plain_mean():
    """All pairs positive (one prototype): balance averages over the one present class only."""
    b = make_batch(3, 2, k=1, unknown=0.0)
    args = (b["h"], b["inst"], b["proto"], b["weight"], b["bias"])
    assert rel_err(ops.siamese_loss(*args, balance=True), ops.siamese_loss(*args, balance=False)) < 1e-14


# ---------------------------------------------------------------------------------------------- assign


@pytest.mark.parametrize("with_bias", [False, True])
def test_assign_matches_brute_force(with_bias):
    x = torch.randn(37, 6, dtype=torch.float64)
    c = torch.randn(11, 6, dtype=torch.float64)
    bias = -0.5 * c.pow(2).sum(1) if with_bias else None
    idx, score = ops.assign(x, c, bias, backend="reference")
    for m in range(37):
        vals = [float(x[m] @ c[k]) + (float(bias[k]) if with_bias else 0.0) for k in range(11)]
        assert idx[m].item() == max(range(11), key=lambda k: (vals[k], -k))
        assert abs(score[m].item() - max(vals)) < 1e-12
    if with_bias:  # nearest centroid in L2
        assert torch.equal(idx, torch.cdist(x, c).argmin(1))


def test_assign_ties_take_lowest_index():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    idx, score = ops.assign(x, c, backend="reference")
    assert idx.tolist() == [1, 3, 1] and score.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ spcl


def test_spcl_combines_terms_and_stats():
    b = make_batch(6, 2, k=2, unknown=0.0, requires_grad=True)
    loss, st = ops.spcl_loss(
        b["z"], b["h"], b["inst"], b["proto"], head_weight=b["weight"], head_bias=b["bias"],
        fn_mode="mask", lambda_con=0.7, lambda_sia=1.3, backend="reference",
    )  # fmt: skip
    con = brute_contrastive(b["z"], b["inst"], b["proto"], 0.5, "mask")
    sia = brute_siamese(b["h"], b["inst"], b["proto"], b["weight"], b["bias"])
    assert rel_err(loss, 0.7 * con + 1.3 * sia) < 1e-12
    # stats by brute force
    z, inst, proto = b["z"].detach(), b["inst"], b["proto"]
    n = z.size(0)
    sims = {"pos": [], "fn": [], "tn": []}
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            kind = "pos" if inst[i] == inst[j] else ("fn" if proto[i] >= 0 and proto[i] == proto[j] else "tn")
            sims[kind].append(float(z[i] @ z[j]))
    n_neg = len(sims["fn"]) + len(sims["tn"])
    assert abs(st["fn_rate"].item() - len(sims["fn"]) / n_neg) < 1e-6
    for key, name in (("pos", "sim_pos"), ("fn", "sim_fn"), ("tn", "sim_neg")):
        assert abs(st[name].item() - sum(sims[key]) / len(sims[key])) < 1e-6


def test_spcl_online_assignment_uses_prototypes():
    b = make_batch(5, 2, k=2)
    c = F.normalize(torch.randn(4, b["z"].size(1), dtype=torch.float64), dim=1)
    loss, st = ops.spcl_loss(
        b["z"],
        b["h"],
        b["inst"],
        prototypes=c,
        head_weight=b["weight"],
        head_bias=b["bias"],
        fn_mode="attract",
        backend="reference",
    )
    proto = (b["z"] @ c.T).argmax(1)
    assert torch.equal(st["proto"], proto)
    con = brute_contrastive(b["z"], b["inst"], proto, 0.5, "attract")
    sia = brute_siamese(b["h"], b["inst"], proto, b["weight"], b["bias"])
    assert rel_err(loss, con + sia) < 1e-12


# ------------------------------------------------------------------------------------------ validation


def _batch():
    return make_batch(4, 2)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b.update(inst=b["inst"].int()), "inst"),
        (lambda b: b.update(inst=b["inst"][:-1]), "inst"),
        (lambda b: b.update(proto=b["proto"].float()), "proto"),
        (lambda b: b.update(proto=b["proto"] - 5), "proto"),
        (lambda b: b.update(inst=b["inst"] - 100), "inst"),
        (lambda b: b.update(z=b["z"][:1], inst=b["inst"][:1], proto=b["proto"][:1]), "N >= 2"),
        (lambda b: b.update(z=b["z"][0]), "z"),
        (lambda b: b.update(z=b["z"].long()), "z"),
    ],
)
def test_contrastive_bad_input(mutate, match):
    b = _batch()
    mutate(b)
    with pytest.raises(ValueError, match=match):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], backend="reference")


def test_contrastive_bad_scalars():
    b = _batch()
    with pytest.raises(ValueError, match="fn_mode"):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], fn_mode="drop")
    with pytest.raises(ValueError, match="backend"):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], backend="numpy")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(weight=torch.randn(5)), "weight"),
        (dict(bias=torch.randn(2)), "bias"),
        (dict(pairs=(torch.tensor([0, 1]), torch.tensor([1]))), "pairs"),
        (dict(pairs=(torch.tensor([0, 99]), torch.tensor([1, 2]))), "pairs"),
        (dict(pairs=(torch.tensor([0.0]), torch.tensor([1.0]))), "pairs"),
        (dict(h=torch.randn(8, 24, dtype=torch.float64)[:, :3]), "weight"),
    ],
)
def test_siamese_bad_input(kw, match):
    b = _batch()
    args = dict(h=b["h"], inst=b["inst"], proto=b["proto"], weight=b["weight"], bias=b["bias"])
    pairs = kw.pop("pairs", None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ops.siamese_loss(**args, pairs=pairs, backend="reference")


@pytest.mark.parametrize(
    "x,c,bias,match",
    [
        (torch.randn(5, 3), torch.randn(4, 2), None, "prototypes"),
        (torch.randn(5, 3), torch.randn(4, 3, dtype=torch.float64), None, "prototypes"),
        (torch.randn(5, 3), torch.randn(4, 3), torch.randn(3), "bias"),
        (torch.randn(5), torch.randn(4, 3), None, "x"),
        (torch.randn(5, 3), torch.randn(0, 3), None, "prototypes"),
    ],
)
def test_assign_bad_input(x, c, bias, match):
    with pytest.raises(ValueError, match=match):
        ops.assign(x, c, bias, backend="reference")


def test_spcl_bad_input():
    b = _batch()
    with pytest.raises(ValueError, match="proto or prototypes"):
        ops.spcl_loss(
            b["z"],
            b["h"],
            b["inst"],
            b["proto"],
            prototypes=torch.randn(3, 16, dtype=torch.float64),
            head_weight=b["weight"],
            head_bias=b["bias"],
        )
    with pytest.raises(ValueError, match="h"):
        ops.spcl_loss(b["z"], b["h"][:4], b["inst"], b["proto"], head_weight=b["weight"], head_bias=b["bias"])


@pytest.mark.parametrize(
    "tau", [0.0, -0.5, float("nan"), float("inf"), True, 1e-50, 1e-4, 1e4, "0.5", torch.tensor(0.5), None]
)
def test_bad_tau_names_tau_and_the_range(tau):
    """tau=1e-50 overflowed fp32 (NaN loss on every backend) and tau=True was taken for 1.0."""
    b = _batch()
    with pytest.raises(ValueError, match=r"tau must be a float in \[0.001, 1000\]"):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], tau=tau)
    with pytest.raises(ValueError, match=r"spcl_loss: tau must be a float in \[0.001, 1000\]"):
        ops.spcl_loss(b["z"], b["h"], b["inst"], b["proto"], tau=tau, head_weight=b["weight"], head_bias=b["bias"])


@pytest.mark.parametrize("tau", [TAU_RANGE[0], 1, np.float32(0.2), np.float64(0.07), TAU_RANGE[1]])
def test_tau_range_is_accepted(tau):
    b = _batch()
    assert torch.isfinite(ops.contrastive_loss(b["z"], b["inst"], b["proto"], tau=tau))


@pytest.mark.parametrize("name", ["lambda_con", "lambda_sia"])
@pytest.mark.parametrize(
    "value", ["1", None, True, torch.tensor(1.0), float("nan"), float("-inf"), 10**400], ids=lambda v: repr(v)[:12]
)
def test_bad_lambda_names_it(name, value):
    """A string raised an unrelated TypeError and NaN silently gave a NaN loss."""
    b = _batch()
    with pytest.raises(ValueError, match=f"spcl_loss: {name} must be a finite float"):
        ops.spcl_loss(b["z"], b["h"], b["inst"], b["proto"], head_weight=b["weight"], head_bias=b["bias"],
                      **{name: value})  # fmt: skip


def test_lambda_weights_terms():
    b = _batch()
    args = dict(head_weight=b["weight"], head_bias=b["bias"])
    loss, st = ops.spcl_loss(b["z"], b["h"], b["inst"], b["proto"], lambda_con=np.float32(0.5), lambda_sia=-2, **args)
    assert isinstance(loss, torch.Tensor)
    assert rel_err(loss, 0.5 * st["loss_con"] - 2 * st["loss_sia"]) < 1e-12


def test_wrong_python_types_raise_type_error_naming_the_argument():
    """A list for z raised AttributeError (spcl_loss with prototypes); ArgumentTypeError is a TypeError and a
    ValueError (SPEC: bad input raises ValueError)."""
    b = _batch()
    args = dict(head_weight=b["weight"], head_bias=b["bias"])
    protos = torch.randn(3, 16, dtype=torch.float64)
    calls = [
        ("z", lambda: ops.contrastive_loss(b["z"].tolist(), b["inst"], b["proto"])),
        ("z", lambda: ops.spcl_loss(b["z"].tolist(), b["h"], b["inst"], b["proto"], **args)),
        ("z", lambda: ops.spcl_loss(b["z"].tolist(), b["h"], b["inst"], prototypes=protos, **args)),
        ("h", lambda: ops.spcl_loss(b["z"], b["h"].numpy(), b["inst"], b["proto"], **args)),
        ("inst", lambda: ops.contrastive_loss(b["z"], b["inst"].tolist(), b["proto"])),
        ("weight", lambda: ops.siamese_loss(b["h"], b["inst"], b["proto"], b["weight"].tolist(), b["bias"])),
        ("bias", lambda: ops.siamese_loss(b["h"], b["inst"], b["proto"], b["weight"], 0.5)),
        ("x", lambda: ops.assign(b["z"].tolist(), protos)),
    ]
    for name, call in calls:
        with pytest.raises(checks.ArgumentTypeError, match=f": {name} must be") as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_siamese_weight_of_another_shape_is_not_flattened():
    b = make_batch(4, 2, dh=4)
    for w in (b["weight"].reshape(2, 2), b["weight"].reshape(4, 1), b["weight"].reshape(1, 1, 4)):
        with pytest.raises(ValueError, match=r"weight must have shape \(Dh,\)=\(4,\) or \(1, 4\)"):
            ops.siamese_loss(b["h"], b["inst"], b["proto"], w, b["bias"])
    loss = ops.siamese_loss(b["h"], b["inst"], b["proto"], b["weight"].reshape(1, 4), b["bias"])
    assert loss == ops.siamese_loss(b["h"], b["inst"], b["proto"], b["weight"], b["bias"])


def test_spcl_errors_name_the_argument():
    b = _batch()
    args = dict(head_weight=b["weight"], head_bias=b["bias"])
    with pytest.raises(ValueError, match=r"spcl_loss: h must have z's N=8 rows, got 6"):
        ops.spcl_loss(b["z"], b["h"][:6], b["inst"], b["proto"], **args)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(K, D\) with D=16 like z, got \(3, 5\)"):
        ops.spcl_loss(b["z"], b["h"], b["inst"], prototypes=torch.randn(3, 5, dtype=torch.float64), **args)
    with pytest.raises(ValueError, match="prototypes must have z's dtype"):
        ops.spcl_loss(b["z"], b["h"], b["inst"], prototypes=torch.randn(3, 16), **args)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_meta_tensors_give_shapes(backend):
    """Meta tensors (shape propagation) go through the fake implementations; the label checks, which read values,
    are skipped. They raised NotImplementedError (no data) before."""
    b = {k: v.to("meta") for k, v in make_batch(4, 2, requires_grad=False).items()}
    z, h = b["z"].requires_grad_(), b["h"].requires_grad_()
    w, bias = b["weight"].requires_grad_(), b["bias"].requires_grad_()
    loss, st = ops.spcl_loss(z, h, b["inst"], b["proto"], head_weight=w, head_bias=bias, backend=backend)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float64
    grads = torch.autograd.grad(loss, (z, h, w, bias))
    assert [g.shape for g in grads] == [z.shape, h.shape, w.shape, bias.shape]
    idx, score = ops.assign(z.detach(), z.detach()[:3], backend=backend)
    assert idx.shape == (8,) and idx.device.type == "meta" and score.dtype == torch.float64


def test_meta_tensors_on_triton_say_which_backends_take_them():
    b = {k: v.to("meta") for k, v in make_batch(4, 2).items()}
    with pytest.raises(RuntimeError, match="meta tensors work with backend 'cpu', 'cuda' or 'reference'"):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], backend="triton")


def test_explicit_unavailable_backend_says_why():
    b = _batch()
    with pytest.raises(RuntimeError, match="cuda"):
        ops.contrastive_loss(b["z"], b["inst"], b["proto"], backend="cuda")
