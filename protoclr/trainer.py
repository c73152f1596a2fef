"""The SPCL training loop, one linear story (STYLE §4): `train(cfg)`.

Sections: distributed + device → output, logging, config → precision → seeds → data → model → optimiser +
schedule → resume → compile + DDP → loop (per epoch: E-step, steps, kNN, checkpoint, summary) → finish.
Elsewhere: the split of the data folder (data/splits.py), what a checkpoint holds (checkpoint.py), the metrics
rows and log lines (monitor.py).

Distributed semantics (SPEC §4): each rank holds batch_size / world images; `ops.spcl_loss(..., group="world")`
gathers columns with gradient and normalises by global counts, and the prototype cross-entropy is a global mean
through `dist.ddp_loss`, so after DDP's gradient averaging every step equals one process on the global batch.
"""

from __future__ import annotations

import functools
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
from .config import Config, to_yaml
from .data import PrototypePairSampler, build_train_loader, load_splits, paper_pairs, sharded_eval_loader
from .eval import knn_baselines, knn_eval
from .model import build_model, convert_sync_batchnorm
from .monitor import (
    EPOCH_MEANS,
    MetricLogger,
    Monitor,
    epoch_line,
    epoch_row,
    final_line,
    setup_logging,
    step_line,
    step_row,
    step_values,
)
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
    "seconds"}. The process group it creates, the torch thread count and the ops' default backend it sets are
    undone on return or error.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint in cfg.out is left intact).
    """
    owns_group = not dist.is_dist()
    prev_threads, prev_backend = torch.get_num_threads(), ops.get_default_backend()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(prev_threads)
        ops.set_default_backend(prev_backend)
        if owns_group:
            dist.destroy()


def _train(cfg: Config) -> dict:
    cfg.validate()
    # ============ distributed mode and device ============
    info = dist.init_distributed_mode(cfg.device)
    device, world, rank, distributed = info.device, info.world_size, info.rank, info.distributed

    # ============ output folder, logging, config ============
    out, sha = _open_output(cfg, info)

    # ============ precision ============
    precision, amp_dtype, param_dtype = _setup_precision(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ops.set_default_backend(cfg.loss.backend)
    torch.set_num_threads(dist.cpu_threads(cfg.threads, device, cfg.data.num_workers, world))

    # ============ seeds ============
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)  # the model's initialisation is the same on every rank

    # ============ data ============
    train_ds, val_ds, desc = load_splits(cfg.data, cfg.seed)
    log.info("data: %s", desc)
    _check_data(cfg, train_ds, world)
    sampler = PrototypePairSampler(len(train_ds), cfg.batch_size // world, world, rank, seed=cfg.seed, drop_last=True)
    loader = build_train_loader(
        train_ds, sampler, cfg.aug, device, backend=cfg.data.backend, num_workers=cfg.data.num_workers, seed=cfg.seed
    )
    cluster_loader = sharded_eval_loader(train_ds, cfg, device)  # the E-step's pass over the training set
    steps_per_epoch = len(sampler)
    total_steps = cfg.epochs * steps_per_epoch
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # ============ model ============
    raw_model = model = _build_model(cfg, device, param_dtype, distributed)
    log.info("model: %s", _describe_model(raw_model, cfg, precision))
    torch.manual_seed(cfg.seed + rank)

    # ============ optimizer, schedule, prototypes ============
    lr = scaled_lr(cfg.optim.base_lr, cfg.batch_size)
    optimizer = build_optimizer(cfg.optim, raw_model, lr)
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    sched = WarmupCosine(optimizer, lr, cfg.optim.final_lr, total_steps, warmup_steps)
    protos = cluster.Prototypes(len(train_ds), device)
    estep = EStep(cfg, raw_model, optimizer, protos, train_ds, cluster_loader, amp_dtype or param_dtype)
    bank = estep.bank
    log.info("optim: %s", _describe_optim(cfg, lr, sched.warmup_steps, total_steps, steps_per_epoch))

    # ============ resume ============
    state = checkpoint.TrainingState(raw_model, optimizer, sched, scaler, protos, sampler, loader, bank)
    last_ckpt, start_epoch, global_step, step_in_epoch = checkpoint.resume(cfg, state, out, device)

    # ============ compile and DDP wrap ============
    if cfg.model.compile:
        raw_model.backbone.compile()  # in place: parameter names (and checkpoints) are unchanged
    if distributed:
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ training loop ============
    save = functools.partial(checkpoint.save_training, out, state, cfg, device=device, sha=sha)
    monitor = Monitor(out, info.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress, start_step=global_step)
    knn = functools.partial(_knn_top1, raw_model.backbone, train_ds, val_ds, cfg, device)
    top1, top1_step = None, -1
    stop = global_step >= run_steps
    t_run = time.perf_counter()
    first_step = global_step
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if stop:
            break
        # ---- E-step (not when resumed mid-epoch: its prototypes came with the checkpoint) ----
        if not (epoch == start_epoch and step_in_epoch > 0):
            step_in_epoch = 0
            estep.start_epoch(epoch)
        collect = bank if bank is not None and bank.epoch == epoch else None
        sampler.set_epoch(epoch)
        sampler.set_prototypes(protos.ids if protos.k else None)
        proto_table = protos.ids.to(device)
        model.train()
        meters = MetricLogger()
        monitor.start_epoch(epoch, steps_per_epoch, initial=step_in_epoch)
        t_epoch = t_last = time.perf_counter()
        for views, index in loader:
            t_data = time.perf_counter() - t_last
            # ---- forward, backward ----
            if param_dtype != torch.float32:
                views = [v.to(param_dtype) for v in views]
            loss, l_proto, stats = step_loss(
                model, raw_model.head, views, index, proto_table, cfg, distributed, autocast, collect
            )
            grad_norm = _backward(loss, optimizer, scaler, raw_model, cfg.optim.clip_grad)
            # One host sync per step: the logged values, and the NaN check before the parameters move.
            values = step_values(loss, l_proto, stats, grad_norm)
            if not math.isfinite(values["loss"]):
                where = f"epoch {epoch} step {step_in_epoch + 1}/{steps_per_epoch} (global step {global_step + 1})"
                _stop_on_non_finite_loss(values, where, sched.get_last_lr(), last_ckpt, monitor)
            # ---- update ----
            scaler.step(optimizer)
            scaler.update()
            sched.step()
            global_step += 1
            step_in_epoch += 1
            # ---- metrics, stop, mid-epoch checkpoint ----
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            row = step_row(global_step, epoch, values, sched.get_last_lr(), index.numel() * world, t_data, dt, device)
            meters.update(**{k: row[k] for k in EPOCH_MEANS})
            stop = global_step >= run_steps
            log_due = global_step % cfg.log_every == 0 or step_in_epoch in (1, steps_per_epoch) or stop
            eta = (now - t_run) / (global_step - first_step) * (run_steps - global_step)
            monitor.step(row, step_line(row, meters, run_steps, eta) if log_due else None)
            if step_in_epoch < steps_per_epoch and (stop or (cfg.ckpt_every and global_step % cfg.ckpt_every == 0)):
                last_ckpt = save(epoch, step_in_epoch, global_step)
            if stop:
                break
            t_last = time.perf_counter()

        # ---- end of epoch (or a mid-epoch stop): E-step from the bank, kNN, checkpoint, summary ----
        epoch_done = step_in_epoch >= steps_per_epoch
        if epoch_done and collect is not None:
            # The next epoch's E-step from the bank, before the boundary checkpoint, which then need not hold it.
            estep(epoch + 1)
        meters.synchronize_between_processes()
        knn_due = cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0
        if epoch_done and (knn_due or epoch == cfg.epochs - 1 or stop):
            top1, top1_step = knn(), global_step
        if epoch_done:
            epochs_done = epoch + 1
            last_ckpt = save(epoch + 1, 0, global_step)
        knn_now = top1 if top1_step == global_step else None
        seconds = time.perf_counter() - t_epoch
        summary = epoch_row(epoch, global_step, knn_now, seconds, loader.skipped, sampler.stats, protos.k, meters)
        monitor.epoch(summary, epoch_line(summary, epoch_done))

    # ============ finish: the final kNN monitor and its baselines ============
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
        result.update(_report_final_knn(top1, cfg, train_ds, val_ds, device, global_step, monitor))
    monitor.close(final=result)
    return result


# ------------------------------------------------------------------------------------------------ helpers


def _open_output(cfg: Config, info: dist.DistInfo) -> tuple[Path, str]:
    """The output folder: logging to train.log, the run's first lines, config.yaml. Returns (folder, git_sha())."""
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    setup_logging(out if info.is_main else None, info.rank)
    if info.is_main:
        checkpoint.remove_stale_temporaries(out)  # a run killed while saving left one (logged)
    sha = git_sha()
    threads = dist.cpu_threads(cfg.threads, info.device, cfg.data.num_workers, info.world_size)
    log.info(
        "protoclr %s | git %s | torch %s | %d process(es), device %s, %d CPU thread(s)",
        *(__version__, sha, torch.__version__, info.world_size, info.device, threads),
    )
    log.info("config:\n%s", to_yaml(cfg).rstrip())
    if info.is_main:
        checkpoint.atomic_write(out / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
    return out, sha


def resolve_precision(precision: str, device_type: str) -> str:
    """cfg.precision with 'auto' resolved: bf16 on CUDA, fp32 elsewhere."""
    return precision if precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")


def _setup_precision(cfg: Config, device: torch.device) -> tuple[str, torch.dtype | None, torch.dtype]:
    """(cfg.precision resolved, autocast dtype or None, parameter dtype); 'auto' is bf16 on CUDA, else fp32.
    On CUDA it also turns TF32 matmuls and the cuDNN autotuner on."""
    precision = resolve_precision(cfg.precision, device.type)
    if precision == "fp64" and device.type == "cuda":
        raise ValueError("config: precision=fp64 is for CPU tests; use bf16 or fp32 on CUDA")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type == "cpu" and amp_dtype is not None and not _cpu_has_native(amp_dtype):
        log.warning("precision=%s: this CPU has no native %s support, so it runs slower than fp32; set precision=fp32",
                    precision, precision)  # fmt: skip
    return precision, amp_dtype, torch.float64 if precision == "fp64" else torch.float32


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs `dtype` convolutions natively here (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16 or AMX)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    return bool(getattr(torch.ops.mkldnn, probe, lambda: False)())


def _check_data(cfg: Config, train_ds, world: int) -> None:
    """The config errors that depend on the training set or the number of ranks (one line each)."""
    if cfg.batch_size % world or (cfg.batch_size // world) % 2:
        raise ValueError(
            f"config: batch_size={cfg.batch_size} must split into an even number of images per rank "
            f"over {world} rank(s); use a multiple of {2 * world}"
        )
    if cfg.loss.pairs == "paper" and world > 1:
        raise ValueError("config: loss.pairs=paper samples pairs per rank and runs on one process; use dense pairs")
    n_classes = len(train_ds.classes)
    if cfg.cluster.source == "labels" and cfg.cluster.k != n_classes:
        raise ValueError(
            f"config: cluster.source=labels uses the {n_classes} classes as prototypes; "
            f"set cluster.k={n_classes} (got {cfg.cluster.k})"
        )
    if len(train_ds) < cfg.batch_size:
        raise ValueError(f"config: batch_size={cfg.batch_size} exceeds the {len(train_ds)} training images")
    if cfg.cluster.source == "kmeans" and cfg.cluster.k > len(train_ds):  # before any feature extraction
        raise ValueError(f"config: cluster.k={cfg.cluster.k} exceeds the {len(train_ds)} training images")


def _build_model(cfg: Config, device: torch.device, dtype: torch.dtype, distributed: bool):
    """The SPCL model on `device` in `dtype` (channels_last, SyncBatchNorm under DDP as configured), logged."""
    model = build_model(cfg).to(device=device, dtype=dtype)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed and cfg.model.sync_bn:
        model = convert_sync_batchnorm(model, device)
    return model


def _describe_model(model, cfg: Config, precision: str) -> str:
    stem = "cifar" if isinstance(model.backbone.maxpool, torch.nn.Identity) else "imagenet"
    n_params = sum(p.numel() for p in model.backbone.parameters())
    return (
        f"{cfg.model.arch} width {cfg.model.width} ({stem} stem), C={model.feat_dim}, {n_params / 1e6:.2f}M "
        f"backbone parameters, K={cfg.cluster.k} prototypes, {precision} precision"
    )


def _describe_optim(cfg: Config, lr: float, warmup_steps: int, total_steps: int, steps_per_epoch: int) -> str:
    o = cfg.optim
    return (
        f"{o.name}, lr {lr:.4g} (= {o.base_lr:g} x {cfg.batch_size} / 256), {warmup_steps} warm-up steps, "
        f"{total_steps} steps ({cfg.epochs} epochs x {steps_per_epoch} steps/epoch)"
        + (f", stopping after {cfg.max_steps}" if cfg.max_steps else "")
    )


class EStep:
    """The E-step (SPEC §1): prototypes from the current encoder, then a fresh classifier and its momentum reset.

    cluster.source=labels: the class labels are the prototypes, set (and the classifier drawn) once. kmeans: the
    features of the feature bank when it holds all of the previous epoch (cluster.features=bank), else of a pass
    over the training set with the eval transform (`cluster_loader`)."""

    def __init__(self, cfg: Config, model, optimizer, protos, train_ds, cluster_loader, dtype: torch.dtype) -> None:
        self.cfg, self.model, self.optimizer = cfg, model, optimizer
        self.protos, self.train_ds, self.cluster_loader = protos, train_ds, cluster_loader
        self.device = protos.ids.device
        # The pass runs in the training forward's precision where that is bf16 (also on a CPU, where
        # extract_features would default to fp32): the prototypes are part of training, not an evaluation.
        self.amp = True if dtype == torch.bfloat16 else None
        # cluster.features=bank: each E-step clusters the features the training forward computed in the epoch
        # before it, in the forward's own dtype `dtype` (README "E-step features").
        self.bank = (
            cluster.FeatureBank(len(train_ds), model.feat_dim, dtype, self.device)
            if cfg.cluster.features == "bank" and cfg.cluster.source == "kmeans"
            else None
        )

    def start_epoch(self, epoch: int) -> None:
        """At the start of `epoch`: the E-step when due and not done yet, and the bank set to collect this epoch's
        features when the next epoch re-clusters."""
        # With the bank the E-step of this epoch ran at the end of the previous one (then protos.epoch == epoch);
        # here it runs the pass: always with cluster.features=pass, else for the first E-step or after a resume.
        if self.due(epoch) and self.protos.epoch != epoch:
            self(epoch)
        if self.bank is not None:
            self.bank.reset(epoch if self.due(epoch + 1) and epoch + 1 < self.cfg.epochs else None)

    def due(self, epoch: int) -> bool:
        """Whether epoch `epoch` starts with an E-step (cluster.start_epoch, then every cluster.recluster_every)."""
        since = epoch - self.cfg.cluster.start_epoch
        return since >= 0 and since % self.cfg.cluster.recluster_every == 0

    def __call__(self, epoch: int) -> None:
        cfg = self.cfg
        if cfg.cluster.source == "labels":
            if self.protos.k:
                return
            labels = torch.tensor(self.train_ds.targets, dtype=torch.int64, device=self.device)
            self.protos.update(labels, torch.eye(cfg.cluster.k, device=self.device), epoch)
        else:
            self._kmeans(epoch)
        self.model.reset_classifier(cfg.loss.proto_init, seed=cfg.seed * 1_000_003 + epoch)
        for p in self.model.classifier.parameters():
            self.optimizer.state.pop(p, None)

    def _kmeans(self, epoch: int) -> None:
        cfg, bank = self.cfg, self.bank
        kw = dict(
            k=cfg.cluster.k,
            pca_dim=min(cfg.cluster.pca_dim, self.model.feat_dim),
            iters=cfg.cluster.iters,
            seed=cfg.seed + epoch,
            epoch=epoch,
            prototypes=self.protos,
            backend=cfg.loss.backend,
            progress=cfg.progress,
        )
        if bank is not None and bank.epoch is not None and bank.epoch == epoch - 1:  # all of the previous epoch
            cluster.cluster_bank(bank, **kw)
        else:
            n = len(self.train_ds)
            cluster.cluster_dataset(self.model.backbone, self.cluster_loader, n, device=self.device, amp=self.amp, **kw)


def _backward(loss: torch.Tensor, optimizer, scaler, model, clip_grad: float) -> torch.Tensor:
    """Gradients of `loss` (unscaled), clipped to norm `clip_grad` when > 0; returns their total norm (on device)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if clip_grad > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def _stop_on_non_finite_loss(values: dict[str, float], where: str, lr: float, last_ckpt: Path | None, monitor) -> None:
    """Log and raise the NonFiniteLossError of a NaN/inf loss at `where`: every loss term, and what to resume from."""
    v = values
    if last_ckpt:
        try:
            saved_step = checkpoint.load(last_ckpt)["step"]
        except Exception:
            saved_step = "?"
        resume = f"last good checkpoint: {last_ckpt} (step {saved_step})"
    else:
        resume = "no checkpoint was written yet"
    msg = (
        f"non-finite loss at {where}: loss={v['loss']} (con={v['loss_con']} sia={v['loss_sia']} "
        f"proto={v['loss_proto']}), lr={lr:.4g}, grad-norm={v['grad_norm']}. Stopping without updating the "
        f"parameters; {resume}. Try a lower optim.base_lr, optim.clip_grad > 0 or precision=fp32, then --resume auto."
    )
    log.error(msg)
    monitor.close()
    raise NonFiniteLossError(msg)


def _report_final_knn(top1: float, cfg: Config, train_ds, val_ds, device, step: int, monitor) -> dict[str, float]:
    """Log the final kNN top-1 with the no-learning baselines (eval.baselines); returns those as {"knn_<name>": %}."""
    base = knn_baselines(cfg, train_ds, val_ds, device) if cfg.eval.baselines else {}
    log.info(final_line(top1, cfg.eval.knn_k, cfg.eval.knn_t, len(val_ds), step, base))
    monitor.scalar("eval/knn_top1", top1, step)
    return {f"knn_{k}": v for k, v in base.items()}


def _knn_top1(encoder, train_ds, val_ds, cfg: Config, device: torch.device) -> float | None:
    """The kNN monitor: top-1 % of the held-out set against the training set (None without a held-out set)."""
    if val_ds is None:
        return None
    return knn_eval(encoder, train_ds, val_ds, cfg, device, progress=False)["top1"]
