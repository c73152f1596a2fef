"""SPEC §4: P gloo processes holding N/P rows each equal one process holding the global batch.

Two levels, each with one `mp.spawn` of 2 CPU processes (float64):
- ops: `contrastive_loss` / `siamese_loss` / `spcl_loss` with group="world" give the global loss value, and the
  gradient of a rank's rows divided by the world size equals the single-process gradient of those rows (DDP's
  averaging divides by P); head gradients averaged over ranks equal the single-process ones. Every backend in
  {reference, cpu, triton} (triton in the interpreter without a GPU), rows split so that some images have both
  views on one rank and others across ranks.
- trainer: one optimisation step of `trainer.step_loss` through DDP + `DistBatchNorm` + LARS on 2 ranks gives
  the same loss, parameter gradients, BN running statistics and updated parameters as 1 process on the
  concatenated batch, for every fn_mode (mask/attract: prototype labels of the other rank's rows reach the
  contrastive term), each backend and both siamese `balance` settings.
Plus the helpers of protoclr.dist (init_distributed_mode, barrier, the differentiable all-reduce).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from helpers import make_batch

from protoclr import config, dist, ops
from protoclr.ops.checks import FN_MODES

pytestmark = pytest.mark.dist

WORLD = 2
OPS_BACKENDS = [b for b in ops.BACKENDS if b != "cuda"]  # gloo runs on the CPU (triton: its interpreter)
# float64 throughout, so the only differences are summation order. Measured: ops ~1e-15 (sums over <= 24 rows,
# terms O(1)); a trainer step ~1e-13 (a ResNet's backward through BN and LARS, gradients up to O(10)). The bounds
# leave 100x of that and still catch a missing or doubled term (a local count or normaliser is >= 1e-3 here).
TOL = 1e-13
TOL_STEP = 1e-11


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


# ------------------------------------------------------------------------------------------------- ops level


def _ops_batch():
    g = torch.Generator().manual_seed(7)
    # M = 12 images x 2 views = 24 rows, shuffled, a quarter of the images without a prototype. Rank r takes rows
    # [12r, 12r + 12): with this seed some images have both views on one rank and others one view per rank
    # (checked in the test), so positives within a rank and across ranks are both exercised.
    return make_batch(12, 2, dz=16, dh=24, k=3, generator=g, shuffle=True)


def _split(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.size(0) // world
    return t[rank * n : (rank + 1) * n]


def _ops_terms(b: dict, backend: str, fn_mode: str, balance: bool, group) -> dict[str, torch.Tensor]:
    """Loss values and gradients of z, h, head weight and bias for the three public losses."""
    out = {}
    z = b["z"].detach().clone().requires_grad_(True)
    lc = ops.contrastive_loss(z, b["inst"], b["proto"], tau=0.5, fn_mode=fn_mode, backend=backend, group=group)
    (gz,) = torch.autograd.grad(lc, z)
    out.update(con=lc.detach(), con_gz=gz)
    h = b["h"].detach().clone().requires_grad_(True)
    w = b["weight"].detach().clone().requires_grad_(True)
    bias = b["bias"].detach().clone().requires_grad_(True)
    ls = ops.siamese_loss(h, b["inst"], b["proto"], w, bias, balance=balance, backend=backend, group=group)
    gh, gw, gb = torch.autograd.grad(ls, (h, w, bias))
    out.update(sia=ls.detach(), sia_gh=gh, sia_gw=gw, sia_gb=gb)
    z = b["z"].detach().clone().requires_grad_(True)
    h = b["h"].detach().clone().requires_grad_(True)
    w = b["weight"].detach().clone().requires_grad_(True)
    loss, st = ops.spcl_loss(
        z,
        h,
        b["inst"],
        b["proto"],
        head_weight=w,
        head_bias=b["bias"],
        tau=0.5,
        fn_mode=fn_mode,
        balance=balance,
        lambda_con=1.0,
        lambda_sia=0.7,
        backend=backend,
        group=group,
    )
    gz, gh, gw = torch.autograd.grad(loss, (z, h, w))
    out.update(spcl=loss.detach(), spcl_gz=gz, spcl_gh=gh, spcl_gw=gw)
    for k in ("fn_rate", "sim_pos", "sim_neg", "sim_fn", "loss_con", "loss_sia"):
        out[f"stat_{k}"] = st[k].detach()
    return out


def _ops_cases():
    return [(be, fm, bal) for be in OPS_BACKENDS for fm in FN_MODES for bal in (True, False)]


def _ops_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    b = _ops_batch()
    local = {k: (_split(v, rank, world) if k in ("z", "h", "inst", "proto") else v) for k, v in b.items()}
    results = {}
    for case in _ops_cases():
        try:
            results[case] = _ops_terms(local, case[0], case[1], case[2], group="world")
        except Exception:
            results[case] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"ops{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ops_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops_dist")
    mp.spawn(_ops_worker, args=(WORLD, str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"ops{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_ops_batch_has_positives_within_and_across_ranks():
    inst = _ops_batch()["inst"]
    rank = torch.arange(inst.numel()) // (inst.numel() // WORLD)
    same_img = inst[:, None] == inst[None, :]
    same_img.fill_diagonal_(False)
    same_rank = rank[:, None] == rank[None, :]
    assert (same_img & same_rank).any() and (same_img & ~same_rank).any()


@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_ops_two_ranks_equal_one_process(ops_runs, backend):
    b = _ops_batch()
    worst = 0.0
    for case in [c for c in _ops_cases() if c[0] == backend]:
        ranks = [r[case] for r in ops_runs]
        for r, res in enumerate(ranks):
            if isinstance(res, str):
                pytest.fail(f"rank {r}, case {case} raised:\n{res}")
        single = _ops_terms(b, *case, group=None)
        for key, ref in single.items():
            if key.endswith(("_gz", "_gh")):  # row gradients: rank r owns its rows; DDP divides by the world
                got = torch.cat([res[key] for res in ranks]) / WORLD
            elif key.endswith(("_gw", "_gb")):  # parameter gradients: DDP averages over ranks
                got = sum(res[key] for res in ranks) / WORLD
            else:  # values: the global value on every rank
                for res in ranks[1:]:
                    assert _max_err(res[key], ranks[0][key]) == 0.0, (case, key, "ranks disagree")
                got = ranks[0][key]
            err = _max_err(got, ref)
            worst = max(worst, err)
            assert err <= TOL, f"{case} {key}: max abs error {err:.3g} > {TOL}"
    print(f"backend {backend}: max abs error over all cases and outputs {worst:.3g}")


# ------------------------------------------------------------------------------------------------ trainer level


# (backend, fn_mode, balance): every fn_mode, every CPU-capable backend, both balance settings
TRAINER_CASES = [
    ("reference", "mask", True),
    ("cpu", "none", False),
    ("cpu", "attract", True),
    ("triton", "mask", False),
]


def _tiny_cfg(backend: str, fn_mode: str, balance: bool) -> config.Config:
    cfg = config.Config()
    config.apply_overrides(
        cfg,
        {
            "model.arch": "resnet18",
            "model.width": 4,
            "model.stem": "cifar",
            "model.proj_dim": 8,
            "cluster.k": 3,
            "aug.image_size": 8,
            "loss.backend": backend,
            "loss.fn_mode": fn_mode,
            "loss.balance": balance,
            "loss.lambda_sia": 0.5,
            "loss.lambda_proto": 0.8,
        },
        "test",
    )
    return cfg


def _step_batch():
    """A global batch of 8 images (4 per rank) x 2 views of 8x8 px, ids and a prototype table (some -1)."""
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    index = torch.tensor([5, 17, 2, 9, 11, 0, 14, 7])
    proto_table = torch.randint(0, 3, (20,), generator=g)
    proto_table[[2, 14]] = -1
    return views, index, proto_table


def _one_step(model, raw, views, index, proto_table, cfg, distributed):
    from protoclr.optim import build_optimizer
    from protoclr.trainer import step_loss

    opt = build_optimizer(cfg.optim, raw, lr=0.3)
    loss, l_proto, st = step_loss(model, raw.head, views, index, proto_table, cfg, distributed)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in raw.named_parameters()}
    opt.step()
    return {
        "loss": loss.detach(),
        "l_proto": l_proto.detach(),
        "fn_rate": st["fn_rate"],
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in raw.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in raw.named_buffers()},
    }


def _build(cfg):
    from protoclr.model import build_model

    torch.manual_seed(0)
    return build_model(cfg).to(torch.float64)


def _step_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from protoclr.model import DistBatchNorm, convert_sync_batchnorm

    _init(rank, world, init_file)
    results = {}
    for case in TRAINER_CASES:
        try:
            cfg = _tiny_cfg(*case)
            raw = convert_sync_batchnorm(_build(cfg), torch.device("cpu"))
            assert any(isinstance(m, DistBatchNorm) for m in raw.modules())
            model = DDP(raw)
            views, index, proto_table = _step_batch()
            b = index.numel() // world
            local_views = [v[rank * b : (rank + 1) * b] for v in views]
            local_index = index[rank * b : (rank + 1) * b]
            results[case] = _one_step(model, raw, local_views, local_index, proto_table, cfg, distributed=True)
        except Exception:
            results[case] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"step{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("step_dist")
    mp.spawn(_step_worker, args=(WORLD, str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"step{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda c: f"{c[0]}-{c[1]}-balance{int(c[2])}")
def test_ddp_step_equals_single_process(step_runs, case):
    ranks = [r[case] for r in step_runs]
    for r, res in enumerate(ranks):
        if isinstance(res, str):
            pytest.fail(f"rank {r}, case {case} raised:\n{res}")
    cfg = _tiny_cfg(*case)
    raw = _build(cfg)
    views, index, proto_table = _step_batch()
    ref = _one_step(raw, raw, views, index, proto_table, cfg, distributed=False)
    errs = {}
    for r, res in enumerate(ranks):
        for key in ("loss", "l_proto", "fn_rate"):
            errs[f"{key}[{r}]"] = _max_err(res[key], ref[key])
        for group in ("grads", "params", "buffers"):
            assert res[group].keys() == ref[group].keys()
            errs[f"{group}[{r}]"] = max(_max_err(res[group][n], ref[group][n]) for n in ref[group])
    print("max abs errors, 2 gloo ranks vs 1 process:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert float(ref["l_proto"]) > 0  # the prototype term is active
    if case[1] != "none":  # prototype labels reach the contrastive term (the batch has false negatives)
        assert float(ref["fn_rate"]) > 0
    assert max(float(g.abs().max()) for g in ref["grads"].values()) > 1e-3  # a step that moves something
    for key, err in errs.items():
        assert err <= TOL_STEP, f"{key}: max abs error {err:.3g} > {TOL_STEP}"


# ------------------------------------------------------------------------------------------------ helpers


def _helpers_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    info = dist.init_distributed_mode("cpu")  # reuses the group
    assert (info.rank, info.world_size, info.distributed) == (rank, world, True)
    dist.barrier()
    x = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = dist.all_reduce_sum_grad(x)  # every rank: [3, 3, 3]
    (y * (rank + 1)).sum().backward()  # d(sum over ranks)/dx_r = 1 + 2 = 3
    obj = dist.broadcast_object({"path": f"rank{rank}"})
    gathered = dist.all_gather_object(rank * 10)
    torch.save(
        {"y": y.detach(), "grad": x.grad, "obj": obj, "gathered": gathered},
        os.path.join(out_dir, f"h{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def test_dist_helpers_two_ranks(tmp_path):
    mp.spawn(_helpers_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"h{r}.pt", weights_only=False)
        assert torch.equal(res["y"], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(res["grad"], torch.full((3,), 3.0, dtype=torch.float64))
        assert res["obj"] == {"path": "rank0"}
        assert res["gathered"] == [0, 10]


def test_init_distributed_mode_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = dist.init_distributed_mode("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)
    assert info.device == torch.device("cpu") and info.is_main
    dist.barrier()
    x = torch.ones(2, requires_grad=True)
    assert dist.all_reduce_sum_grad(x) is x
    with pytest.raises(ValueError, match="device"):
        dist.init_distributed_mode("tpu")


def test_slurm_master_addr(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the plain parser
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[017-020,033],login1")
    assert dist._slurm_master_addr() == "gpu017"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node5")
    assert dist._slurm_master_addr() == "node5"
