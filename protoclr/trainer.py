"""The SPCL training loop, one linear story (STYLE §4): `train(cfg)`.

Sections: distributed + device → output, logging, config → precision → data → model → optimiser + schedule →
resume → compile + DDP → helpers (checkpoint, E-step, kNN) → loop (per epoch: re-cluster, then steps) → teardown.

Distributed semantics (SPEC §4): each rank holds batch_size / world images; `ops.spcl_loss(..., group="world")`
gathers columns with gradient and normalises by global counts, and the prototype cross-entropy is a global mean
through `dist.ddp_loss`, so after DDP's gradient averaging every step equals one process on the global batch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import __version__, checkpoint, cluster, dist, ops
from .config import Config, flatten, from_dict, to_dict, to_yaml
from .data import PrototypePairSampler, build_train_loader, paper_pairs
from .eval import knn_baselines, knn_eval, load_splits, sharded_eval_loader
from .model import build_model, convert_sync_batchnorm
from .monitor import MetricLogger, Monitor, format_eta, memory_gb, setup_logging
from .optim import WarmupCosine, build_optimizer, scaled_lr

__all__ = ["train", "NonFiniteLossError", "git_sha", "proto_loss", "step_loss"]

log = logging.getLogger("protoclr.trainer")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, every loss term and the last good checkpoint."""


def git_sha() -> str:
    """Short commit of the source tree, with '-dirty' when it has uncommitted changes ('unknown' outside git)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def proto_loss(logits: torch.Tensor, proto: torch.Tensor, distributed: bool) -> torch.Tensor:
    """L_proto (SPEC 1.3): cross-entropy of the prototype classifier over rows with proto >= 0, a mean over the
    GLOBAL batch (global count; `dist.ddp_loss` under DDP). Always connected to the classifier's graph (zero
    gradient when no row has a prototype) so DDP sees a gradient for every parameter."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    valid = proto >= 0
    ce = F.cross_entropy(logits, proto.clamp(min=0), reduction="none")
    local_sum = torch.where(valid, ce, torch.zeros_like(ce)).sum()
    count = valid.sum().to(ce.dtype)
    if distributed:
        count = dist.all_reduce_sum(count)
        return dist.ddp_loss(local_sum / count.clamp(min=1))
    return local_sum / count.clamp(min=1)


def step_loss(
    model,
    head,
    views: list[torch.Tensor],
    index: torch.Tensor,
    proto_table: torch.Tensor,
    cfg: Config,
    distributed: bool,
    autocast=None,
    bank: cluster.FeatureBank | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one step on this rank's batch (SPEC 1.3): (loss, L_proto, stats of `ops.spcl_loss`).

    Args:
        model: SPCLModel, or its DDP wrapper (so DDP sees the forward). head: the siamese head (nn.Linear(C, 1)).
        views: V tensors (B, 3, H, W); index: (B,) int64 dataset ids; proto_table: (num_images,) prototype ids.
        cfg: the run's Config (loss section). distributed: gather columns / global normalisers (SPEC §4).
        autocast: context manager for the forward (bf16 on CUDA), None = none.
        bank: FeatureBank that collects the pooled features h of this batch (cluster.features=bank), or None.

    Under DDP the returned loss has the global value and, after DDP's gradient averaging, the global gradient.
    """
    inst = index.repeat(len(views))  # (N,) rows are view-major: view v of image b is row v·B + b
    proto = proto_table[index].repeat(len(views))
    pairs = paper_pairs(index.numel(), len(views), index.device) if cfg.loss.pairs == "paper" else None
    with autocast if autocast is not None else nullcontext():
        h, z, logits = model(views)  # (N, C), (N, Dz) fp32, (N, K)
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    if bank is not None:
        bank.add(index, h)
    loss_spcl, stats = ops.spcl_loss(
        z,
        h,
        inst,
        proto,
        head_weight=head.weight,
        head_bias=head.bias,
        tau=cfg.loss.tau,
        fn_mode=cfg.loss.fn_mode,
        pairs=pairs,
        balance=cfg.loss.balance,
        lambda_con=cfg.loss.lambda_con,
        lambda_sia=cfg.loss.lambda_sia,
        backend=cfg.loss.backend,
        group="world" if distributed else None,
    )
    l_proto = proto_loss(logits, proto, distributed)
    return loss_spcl + cfg.loss.lambda_proto * l_proto, l_proto, stats


def train(cfg: Config) -> dict:
    """Train SPCL with `cfg` (see protoclr/config.py); returns the final summary
    {"top1": kNN top-1 % on the held-out split (None without one), "epochs_done", "step", "out", "checkpoint",
    "seconds"}. The process group it creates and the torch thread count it sets are undone on return or error.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint in cfg.out is left intact).
    """
    owns_group = not dist.is_dist()
    prev_threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(prev_threads)
        if owns_group:
            dist.destroy()


def _train(cfg: Config) -> dict:
    cfg.validate()
    # ============ distributed mode and device ============
    info = dist.init_distributed_mode(cfg.device)
    device, world, rank, distributed = info.device, info.world_size, info.rank, info.distributed
    main = info.is_main

    # ============ output folder, logging, config ============
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    setup_logging(out if main else None, rank)
    if main:
        checkpoint.remove_stale_temporaries(out)  # a run killed while saving left one (logged)
    sha = git_sha()
    log.info(
        "protoclr %s | git %s | torch %s | %d process(es), device %s, %d CPU thread(s)",
        __version__,
        sha,
        torch.__version__,
        world,
        device,
        dist.cpu_threads(cfg.threads, device, cfg.data.num_workers, world),
    )
    log.info("config:\n%s", to_yaml(cfg).rstrip())
    if main:
        checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))

    # ============ precision ============
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp64" and device.type == "cuda":
        raise ValueError("config: precision=fp64 is for CPU tests; use bf16 or fp32 on CUDA")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    param_dtype = torch.float64 if precision == "fp64" else torch.float32
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ops.set_default_backend(cfg.loss.backend)
    torch.set_num_threads(dist.cpu_threads(cfg.threads, device, cfg.data.num_workers, world))

    # ============ seeds ============
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)  # the model's initialisation is the same on every rank

    # ============ data ============
    train_ds, val_ds, desc = load_splits(cfg.data, cfg.seed)
    log.info("data: %s", desc)
    if cfg.batch_size % world or (cfg.batch_size // world) % 2:
        raise ValueError(
            f"config: batch_size={cfg.batch_size} must split into an even number of images per rank "
            f"over {world} rank(s); use a multiple of {2 * world}"
        )
    per_rank = cfg.batch_size // world
    if cfg.loss.pairs == "paper" and distributed:
        raise ValueError("config: loss.pairs=paper samples pairs per rank and runs on one process; use dense pairs")
    if cfg.cluster.source == "labels" and cfg.cluster.k != len(train_ds.classes):
        raise ValueError(
            f"config: cluster.source=labels uses the {len(train_ds.classes)} classes as prototypes; "
            f"set cluster.k={len(train_ds.classes)} (got {cfg.cluster.k})"
        )
    if len(train_ds) < cfg.batch_size:
        raise ValueError(f"config: batch_size={cfg.batch_size} exceeds the {len(train_ds)} training images")
    if cfg.cluster.source == "kmeans" and cfg.cluster.k > len(train_ds):  # before any feature extraction
        raise ValueError(f"config: cluster.k={cfg.cluster.k} exceeds the {len(train_ds)} training images")
    sampler = PrototypePairSampler(len(train_ds), per_rank, world, rank, seed=cfg.seed, drop_last=True)
    loader = build_train_loader(
        train_ds, sampler, cfg.aug, device, backend=cfg.data.backend, num_workers=cfg.data.num_workers, seed=cfg.seed
    )
    cluster_loader = sharded_eval_loader(train_ds, cfg, device)
    steps_per_epoch = len(sampler)
    total_steps = cfg.epochs * steps_per_epoch
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # ============ model ============
    model = build_model(cfg).to(device=device, dtype=param_dtype)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed and cfg.model.sync_bn:
        model = convert_sync_batchnorm(model, device)
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.backbone.parameters())
    log.info(
        "model: %s width %d (%s stem), C=%d, %.2fM backbone parameters, K=%d prototypes, %s precision",
        cfg.model.arch,
        cfg.model.width,
        "cifar" if isinstance(raw_model.backbone.maxpool, torch.nn.Identity) else "imagenet",
        raw_model.feat_dim,
        n_params / 1e6,
        cfg.cluster.k,
        precision,
    )
    torch.manual_seed(cfg.seed + rank)

    # ============ optimizer and schedule ============
    lr = scaled_lr(cfg.optim.base_lr, cfg.batch_size)
    optimizer = build_optimizer(cfg.optim, raw_model, lr)
    sched = WarmupCosine(
        optimizer, lr, cfg.optim.final_lr, total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch)
    )
    protos = cluster.Prototypes(len(train_ds), device)
    # cluster.features=bank: each E-step clusters the features the training forward computed in the epoch before
    # it, in the forward's own dtype (README "E-step features").
    bank = (
        cluster.FeatureBank(len(train_ds), raw_model.feat_dim, amp_dtype or param_dtype, device)
        if cfg.cluster.features == "bank" and cfg.cluster.source == "kmeans"
        else None
    )
    log.info(
        "optim: %s, lr %.4g (= %g x %d / 256), %d warm-up steps, %d steps (%d epochs x %d steps/epoch)%s",
        cfg.optim.name,
        lr,
        cfg.optim.base_lr,
        cfg.batch_size,
        sched.warmup_steps,
        total_steps,
        cfg.epochs,
        steps_per_epoch,
        f", stopping after {cfg.max_steps}" if cfg.max_steps else "",
    )

    # ============ resume ============
    start_epoch, global_step, step_in_epoch = 0, 0, 0
    last_ckpt: Path | None = None
    resume_path = dist.broadcast_object(checkpoint.resolve_resume(cfg.resume, out) if main else None)
    if cfg.resume == "auto" and resume_path is None:
        log.info("resume: no checkpoint in %s, starting from scratch", out)
    if resume_path is not None:
        state = checkpoint.load(resume_path, map_location="cpu")
        checkpoint.load_model_state(raw_model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        protos.load_state_dict(state["prototypes"])
        sampler.load_state_dict(state["sampler"])
        start_epoch, global_step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        if bank is not None and step_in_epoch:
            if (state.get("bank") or {}).get("epoch") == start_epoch:
                bank.load_state_dict(state["bank"])
            else:
                log.info("resume: no feature bank of epoch %d in the checkpoint; its E-step makes a pass", start_epoch)
        rngs, loaders = state["rng"], state.get("loader", [])
        if len(rngs) == world:
            checkpoint.set_rng_state(rngs[rank], device)
            if len(loaders) == world:
                loader.load_state_dict(loaders[rank])
        else:
            log.warning(
                "resume: checkpoint has RNG states of %d rank(s), this run has %d; RNGs and augmentation states not "
                "restored",
                len(rngs),
                world,
            )
        changed = {
            k: (v, flatten(cfg)[k])
            for k, v in flatten(from_dict(state["config"])).items()
            if k not in ("resume", "max_steps", "epochs") and flatten(cfg)[k] != v
        }
        if changed:
            log.warning(
                "resume: config differs from the checkpoint's: %s",
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
            )
        last_ckpt = Path(resume_path)
        log.info(
            "resume: %s at epoch %d, step %d (%d/%d of the epoch)",
            resume_path,
            start_epoch,
            global_step,
            step_in_epoch,
            steps_per_epoch,
        )
        del state

    # ============ compile and DDP wrap ============
    if cfg.model.compile:
        raw_model.backbone.compile()  # in place: parameter names (and checkpoints) are unchanged
    if distributed:
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ helpers ============
    monitor = Monitor(out, main, tensorboard=cfg.tensorboard, progress=cfg.progress, start_step=global_step)

    def save_checkpoint(epoch: int, pos: int) -> Path:
        """Checkpoint meaning "epoch `epoch`, `pos` steps of it done"; every rank joins (RNG states)."""
        rngs, loaders = zip(*dist.all_gather_object((checkpoint.rng_state(device), loader.state_dict())))
        # The bank only mid-epoch (at most N·D; a collective): at a boundary the E-step has already used it.
        bank_state = bank.state_dict() if bank is not None and pos and bank.epoch == epoch else None
        path = out / checkpoint.LATEST
        if main:
            state = {
                "model": checkpoint.clean_state_dict(checkpoint.unwrap(raw_model).state_dict()),
                "optimizer": optimizer.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "prototypes": protos.state_dict(),
                "bank": bank_state,
                "sampler": sampler.state_dict(),
                "rng": list(rngs),
                "loader": list(loaders),
                "epoch": epoch,
                "step": global_step,
                "step_in_epoch": pos,
                "world_size": world,
                "config": to_dict(cfg),
                "config_yaml": to_yaml(cfg),
                "git_sha": sha,
                "version": __version__,
            }
            checkpoint.save(path, state)
            if pos == 0 and cfg.keep_every and epoch % cfg.keep_every == 0:
                checkpoint.save(out / f"checkpoint{epoch:04d}.pth", state)
        dist.barrier()
        return path

    def recluster(epoch: int) -> None:
        """E-step (SPEC §1): prototypes from the current encoder, then a fresh classifier and its momentum reset.
        With cluster.source=labels the class labels are the prototypes, set (and the classifier drawn) once."""
        if cfg.cluster.source == "labels":
            if protos.k:
                return
            labels = torch.tensor(train_ds.targets, dtype=torch.int64, device=device)
            protos.update(labels, torch.eye(cfg.cluster.k, device=device), epoch)
        else:
            _kmeans_prototypes(epoch)
        raw_model.reset_classifier(cfg.loss.proto_init, seed=cfg.seed * 1_000_003 + epoch)
        for p in raw_model.classifier.parameters():
            optimizer.state.pop(p, None)

    def _kmeans_prototypes(epoch: int) -> None:
        kw = dict(
            k=cfg.cluster.k,
            pca_dim=min(cfg.cluster.pca_dim, raw_model.feat_dim),
            iters=cfg.cluster.iters,
            seed=cfg.seed + epoch,
            epoch=epoch,
            prototypes=protos,
            backend=cfg.loss.backend,
            progress=cfg.progress,
        )
        if bank is not None and bank.epoch is not None and bank.epoch == epoch - 1:  # all of the previous epoch
            cluster.cluster_bank(bank, **kw)
        else:
            cluster.cluster_dataset(raw_model.backbone, cluster_loader, len(train_ds), device=device, **kw)

    def recluster_due(epoch: int) -> bool:
        since = epoch - cfg.cluster.start_epoch
        return since >= 0 and since % cfg.cluster.recluster_every == 0

    def knn() -> float | None:
        if val_ds is None:
            return None
        res = knn_eval(raw_model.backbone, train_ds, val_ds, cfg, device, progress=False)
        return res["top1"]

    # ============ training loop ============
    top1: float | None = None
    top1_step = -1
    stop = global_step >= run_steps
    t_run = time.perf_counter()
    steps_this_run = 0
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if stop:
            break
        resumed_mid_epoch = epoch == start_epoch and step_in_epoch > 0
        if not resumed_mid_epoch:
            step_in_epoch = 0
            # With the bank the E-step of this epoch ran at the end of the previous one (then protos.epoch == epoch);
            # here it runs the pass: always with cluster.features=pass, else for the first E-step or after a resume.
            if recluster_due(epoch) and protos.epoch != epoch:
                recluster(epoch)
            if bank is not None:  # collect this epoch's features only when the next epoch re-clusters
                bank.reset(epoch if recluster_due(epoch + 1) and epoch + 1 < cfg.epochs else None)
        collect = bank if bank is not None and bank.epoch == epoch else None
        sampler.set_epoch(epoch)
        sampler.set_prototypes(protos.ids if protos.k else None)
        proto_table = protos.ids.to(device)
        model.train()
        meters = MetricLogger()
        monitor.start_epoch(epoch, steps_per_epoch, initial=step_in_epoch)
        t_epoch = time.perf_counter()
        t_last = time.perf_counter()
        for views, index in loader:
            t_data = time.perf_counter() - t_last
            # ---- forward ----
            if param_dtype != torch.float32:
                views = [v.to(param_dtype) for v in views]
            loss, l_proto, st = step_loss(
                model, raw_model.head, views, index, proto_table, cfg, distributed, autocast, collect
            )
            # ---- backward ----
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if cfg.optim.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.clip_grad)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in raw_model.parameters() if p.grad is not None]
                )
            # One host sync per step: the logged values, and the NaN check before the parameters move.
            vals = torch.stack(
                [
                    loss.detach().float(),
                    st["loss_con"].float(),
                    st["loss_sia"].float(),
                    l_proto.detach().float(),
                    st["fn_rate"].float(),
                    st["sim_pos"].float(),
                    st["sim_neg"].float(),
                    st["sim_fn"].float(),
                    grad_norm.float(),
                ]
            ).tolist()
            lv, lcon, lsia, lpro, fn_rate, sim_pos, sim_neg, sim_fn, gnorm = vals
            if not math.isfinite(lv):
                where = (
                    f"last good checkpoint: {last_ckpt} (step {_ckpt_step(last_ckpt)})"
                    if last_ckpt
                    else "no checkpoint was written yet"
                )
                msg = (
                    f"non-finite loss at epoch {epoch} step {step_in_epoch + 1}/{steps_per_epoch} "
                    f"(global step {global_step + 1}): loss={lv} (con={lcon} sia={lsia} proto={lpro}), "
                    f"lr={sched.get_last_lr():.4g}, grad-norm={gnorm}. Stopping without updating the parameters; "
                    f"{where}. Try a lower optim.base_lr, optim.clip_grad > 0 or precision=fp32, then "
                    "--resume auto."
                )
                log.error(msg)
                monitor.close()
                raise NonFiniteLossError(msg)
            scaler.step(optimizer)
            scaler.update()
            sched.step()
            global_step += 1
            step_in_epoch += 1
            steps_this_run += 1
            # ---- metrics ----
            now = time.perf_counter()
            dt = now - t_last
            t_last = now
            imgs = index.numel() * world
            row = {
                "step": global_step,
                "epoch": epoch,
                "loss": lv,
                "loss_con": lcon,
                "loss_sia": lsia,
                "loss_proto": lpro,
                "lr": optimizer.param_groups[0]["lr"],
                "fn_rate": fn_rate,
                "sim_pos": sim_pos,
                "sim_neg": sim_neg,
                "sim_fn": sim_fn,
                "grad_norm": gnorm,
                "img_per_s": imgs / dt,
                "data_share": t_data / dt,
                "step_time": dt,
                "mem_gb": memory_gb(device),
                "time": time.time(),
            }
            meters.update(
                loss=lv,
                loss_con=lcon,
                loss_sia=lsia,
                loss_proto=lpro,
                fn_rate=fn_rate,
                img_per_s=imgs / dt,
                data_share=t_data / dt,
                step_time=dt,
            )
            line = None
            if global_step % cfg.log_every == 0 or step_in_epoch in (1, steps_per_epoch) or global_step == run_steps:
                elapsed = now - t_run
                eta = elapsed / steps_this_run * (run_steps - global_step)
                line = (
                    f"epoch {epoch} step {global_step}/{run_steps} | loss {lv:.4f} (con {lcon:.4f} sia {lsia:.4f} "
                    f"proto {lpro:.4f}) | lr {row['lr']:.4g} | {meters.meters['img_per_s'].median:.0f} img/s | "
                    f"data {100 * meters.meters['data_share'].avg:.0f}% | fn-rate {fn_rate:.3f} | "
                    f"mem {row['mem_gb']:.2f}G | eta {format_eta(eta)}"
                )
            monitor.step(row, line)
            if global_step >= run_steps:
                stop = True
            if step_in_epoch < steps_per_epoch and (stop or (cfg.ckpt_every and global_step % cfg.ckpt_every == 0)):
                last_ckpt = save_checkpoint(epoch, step_in_epoch)
            if stop:
                break
            t_last = time.perf_counter()

        # ---- end of epoch (or a mid-epoch stop) ----
        epoch_done = step_in_epoch >= steps_per_epoch
        if epoch_done and collect is not None:
            # The next epoch's E-step from the bank, before the boundary checkpoint, which then need not hold it.
            recluster(epoch + 1)
        meters.synchronize_between_processes()
        avg = meters.global_avg()
        last = epoch == cfg.epochs - 1
        if epoch_done and ((cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0) or last or stop):
            top1, top1_step = knn(), global_step
        if epoch_done:
            epochs_done = epoch + 1
            last_ckpt = save_checkpoint(epoch + 1, 0)
        summary = {
            "epoch": epoch,
            "step": global_step,
            "knn_top1": top1 if top1_step == global_step else None,
            "seconds": time.perf_counter() - t_epoch,
            "skipped": loader.skipped,
            "same_pair_share": sampler.stats.get("same_share"),
            "prototypes_k": protos.k,
            **avg,
        }
        knn_txt = f" | knn top1 {top1:.2f}" if summary["knn_top1"] is not None else ""
        monitor.epoch(
            summary,
            f"epoch {epoch} {'done' if epoch_done else 'stopped'} | step {global_step} | "
            f"loss {avg.get('loss', float('nan')):.4f} (con {avg.get('loss_con', float('nan')):.4f} "
            f"sia {avg.get('loss_sia', float('nan')):.4f} proto {avg.get('loss_proto', float('nan')):.4f}) | "
            f"fn-rate {avg.get('fn_rate', float('nan')):.3f}{knn_txt} | "
            f"{avg.get('img_per_s', 0):.0f} img/s | data {100 * avg.get('data_share', 0):.0f}% | "
            f"skipped {loader.skipped} | {summary['seconds']:.1f}s",
        )

    # ============ teardown ============
    if top1_step != global_step:
        top1 = knn()
    result = {
        "top1": top1,
        "epochs_done": epochs_done,
        "step": global_step,
        "out": str(out),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "seconds": round(time.perf_counter() - t_run, 1),
    }
    if top1 is not None:
        base = knn_baselines(cfg, train_ds, val_ds, device) if cfg.eval.baselines else {}
        result.update({f"knn_{k}": v for k, v in base.items()})
        log.info(
            "final kNN top-1 %.2f%% (k=%d, T=%g) on %d held-out images after %d steps%s",
            top1,
            cfg.eval.knn_k,
            cfg.eval.knn_t,
            len(val_ds),
            global_step,
            f" | same kNN on raw pixels {base['pixels']:.2f}%, on the random-init encoder {base['random_init']:.2f}%"
            if base
            else "",
        )
        monitor.scalar("eval/knn_top1", top1, global_step)
    monitor.close()
    if main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "final", **result}) + "\n")
    return result


def _ckpt_step(path: Path | None) -> int | str:
    try:
        return checkpoint.load(path)["step"]
    except Exception:
        return "?"
