"""End-to-end training-step benchmark: where a step's time goes, and the loss and clustering share of an epoch.

Runs the real trainer (`protoclr.trainer.train`) for a few steps and times its phases from the outside, by
wrapping the names it calls (nothing in the trainer changes):

    data      waiting for the next batch (`build_train_loader`'s iterator, device transfer included)
    forward   the model's forward (`step_loss` entry -> `ops.spcl_loss` entry)
    loss      `ops.spcl_loss` + the prototype cross-entropy forward, and the backward of `spcl_loss` (gradient
              hooks on its z and h inputs)
    backward  the rest of the backward (model), gradient norm and the trainer's one host sync per step
    optimiser `optimizer.step` (LARS/SGD)
    other     scaler/scheduler update, metrics and logging
and the E-step, per re-clustering: `cluster.cluster_dataset` (cluster.features=pass: a second forward pass
over the training set + PCA + k-means) or `cluster.cluster_bank` (cluster.features=bank: PCA + k-means on the
features the training forward left in the bank), plus, with the bank, its fill in each step
(`FeatureBank.add`, timed on its own and also inside `forward`). The E-step share of an epoch is the
steady state: with the bank, the first E-step (a pass: no bank yet) is reported apart, so a bank run must cross
an epoch boundary (--steps >= steps per epoch). Each phase boundary synchronises the GPU, so the split is exact
on the CPU and slightly pessimistic on the GPU (no overlap across boundaries). The first --warmup steps
(compilation, cudnn autotuning, Triton JIT) are left out.

Takes train.py's flags and key=value overrides, for example:

    python bench/e2e.py                                       # bundled digits preset, CPU, 20 steps
    python bench/e2e.py --steps 30 --device cuda --config configs/cifar_r18.yaml --data /data/cifar10
    python bench/e2e.py --batch-size 256 loss.backend=reference
    python bench/e2e.py --steps 30 cluster.features=bank                   # E-step share without the second pass
    python bench/e2e.py --config configs/fmnist.yaml --steps 80 cluster.features=bank

Appends one JSON line to bench/results/e2e_<device>.jsonl (schema: bench/results/README.md) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import torch  # noqa: E402

PHASES = ("data", "forward", "loss", "backward", "optimiser", "other")


def _train_parser() -> argparse.ArgumentParser:
    """train.py's parser (its flags and key=value overrides), as a parent of ours (DINO style)."""
    spec = importlib.util.spec_from_file_location("_protoclr_train_cli", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_args_parser()


class Timeline:
    """Synchronised timestamps of one step's phase boundaries, per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.events: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.cur[name] = self.now()

    def mark_max(self, name: str) -> None:
        self.cur[name] = max(self.cur.get(name, 0.0), self.now())

    def new_step(self) -> None:
        t = self.now()
        if self.cur:
            self.cur["next"] = t
            self.steps.append(self.cur)
        self.cur = {"data_in": t}

    def split(self, s: dict[str, float]) -> dict[str, float] | None:
        """Seconds per phase of one finished step (None if a boundary is missing)."""
        need = ("data_in", "data_out", "fwd_in", "loss_in", "loss_out", "opt_in", "opt_out", "next")
        if any(k not in s for k in need):
            return None
        loss_bwd_end = min(max(s.get("loss_bwd", s["loss_out"]), s["loss_out"]), s["opt_in"])
        return {
            "data": s["data_out"] - s["data_in"],
            "forward": s["loss_in"] - s["data_out"],
            "loss": (s["loss_out"] - s["loss_in"]) + (loss_bwd_end - s["loss_out"]),
            "backward": s["opt_in"] - loss_bwd_end,
            "optimiser": s["opt_out"] - s["opt_in"],
            "other": s["next"] - s["opt_out"],
        }


class _TimedLoader:
    """The trainer's loader, timing each `next()` (the data wait) and starting a step at each batch."""

    def __init__(self, inner, sampler, tl: Timeline):
        self.inner, self.sampler, self.tl = inner, sampler, tl

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        it = iter(self.inner)
        while True:
            self.tl.new_step()
            try:
                batch = next(it)
            except StopIteration:
                self.tl.cur = {}
                return
            self.tl.mark("data_out")
            yield batch


def instrument(tl: Timeline) -> tuple[dict, callable]:
    """Wrap the names the trainer calls; returns (info filled during the run, undo)."""
    from protoclr import cluster, ops, trainer

    saved = []
    info: dict = {"steps_per_epoch": None, "estep": [], "fill_s": []}

    def patch(mod, name, new):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, new)

    orig_loader = trainer.build_train_loader

    def build_train_loader(dataset, sampler, *a, **kw):
        info["steps_per_epoch"] = len(sampler)
        return _TimedLoader(orig_loader(dataset, sampler, *a, **kw), sampler, tl)

    orig_step_loss = trainer.step_loss

    def step_loss(*a, **kw):
        tl.mark("fwd_in")
        out = orig_step_loss(*a, **kw)
        tl.mark("loss_out")
        return out

    orig_spcl = ops.spcl_loss

    def spcl_loss(z, h, *a, **kw):
        tl.mark("loss_in")
        for t in (z, h):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: (tl.mark_max("loss_bwd"), g)[1])
        return orig_spcl(z, h, *a, **kw)

    orig_build_opt = trainer.build_optimizer

    def build_optimizer(*a, **kw):
        opt = orig_build_opt(*a, **kw)
        inner_step = opt.step

        def step(*sa, **skw):
            tl.mark("opt_in")
            r = inner_step(*sa, **skw)
            tl.mark("opt_out")
            return r

        opt.step = step
        return opt

    def timed_estep(fn, source):
        def wrapper(*a, **kw):
            t0 = tl.now()
            r = fn(*a, **kw)
            info["estep"].append((source, tl.now() - t0))
            return r

        return wrapper

    orig_add = cluster.FeatureBank.add

    def bank_add(self, *a, **kw):
        t0 = tl.now()
        orig_add(self, *a, **kw)
        info["fill_s"].append(tl.now() - t0)

    def knn_eval(*a, **kw):  # the kNN monitor is not part of a training step
        return {"top1": None}

    patch(trainer, "build_train_loader", build_train_loader)
    patch(trainer, "step_loss", step_loss)
    patch(ops, "spcl_loss", spcl_loss)
    patch(trainer, "build_optimizer", build_optimizer)
    patch(cluster, "cluster_dataset", timed_estep(cluster.cluster_dataset, "pass"))
    patch(cluster, "cluster_bank", timed_estep(cluster.cluster_bank, "bank"))
    patch(cluster.FeatureBank, "add", bank_add)
    patch(trainer, "knn_eval", knn_eval)

    def undo():
        for mod, name, old in reversed(saved):
            setattr(mod, name, old)

    return info, undo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        "bench/e2e.py", parents=[_train_parser()], add_help=False, conflict_handler="resolve",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    p.add_argument("--steps", type=int, default=20, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the statistics")
    p.add_argument("--results", default=None, help="JSONL to append to (default bench/results/e2e_<device>.jsonl)")
    args = p.parse_intermixed_args(argv)

    from protoclr import config

    out_dir = args.out or tempfile.mkdtemp(prefix="protoclr_e2e_")
    named = {"data.root": args.data, "out": out_dir, "epochs": args.epochs, "batch_size": args.batch_size,
             "max_steps": args.warmup + args.steps, "resume": None, "device": args.device}  # fmt: skip
    overrides = ["tensorboard=false", "progress=false", "eval.knn_every=0", "ckpt_every=0"] + list(args.overrides)
    cfg = config.resolve(args.config or config.DEFAULT_PRESET, named, overrides)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")

    from protoclr import ops

    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    backend = cfg.loss.backend
    if backend == "auto":
        ops.set_default_backend(None)
        backend = ops.resolve("auto", device).__name__.rsplit(".", 1)[-1].replace("backend_", "")
        backend = {"ext": device.type}.get(backend, backend)  # backend_ext serves both cpu and cuda
    tl = Timeline(device)
    info, undo = instrument(tl)
    from protoclr import trainer

    t0 = time.perf_counter()
    try:
        result = trainer.train(cfg)
    finally:
        undo()
    wall = time.perf_counter() - t0

    splits = [s for s in (tl.split(x) for x in tl.steps[args.warmup :]) if s is not None]
    if not splits:
        raise SystemExit(f"e2e: no complete step was timed ({len(tl.steps)} steps seen); raise --steps")
    med = {k: statistics.median(s[k] for s in splits) for k in PHASES}
    med_sum = sum(med.values())  # shares are of this sum, so they add up to 100%
    step_s = statistics.median(sum(s.values()) for s in splits)
    mode = cfg.cluster.features if cfg.cluster.source == "kmeans" else "labels"
    steady = [t for src, t in info["estep"] if src == mode]
    if mode == "bank" and info["estep"] and not steady:
        raise SystemExit(
            f"e2e: cluster.features=bank, but no E-step from the bank was timed (only the first, a pass); raise "
            f"--steps past one epoch ({info['steps_per_epoch']} steps)"
        )
    estep = statistics.median(steady) if steady else None
    fill_s = statistics.median(info["fill_s"]) if info["fill_s"] else 0.0  # also inside the step's `forward`
    spe = info["steps_per_epoch"]
    epoch_s = spe * step_s + (estep or 0.0) if spe else None
    estep_epoch = (estep or 0.0) + spe * fill_s if spe else None  # all the E-step costs an epoch
    images = cfg.batch_size
    row = {
        "schema": common.SCHEMA, "bench": "e2e", "type": "step_split", "device": device.type,
        "run_id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "config": {"arch": cfg.model.arch, "width": cfg.model.width, "batch_size": cfg.batch_size,
                   "views": cfg.aug.num_views, "image_size": cfg.aug.image_size, "precision": precision,
                   "loss_backend": backend, "k": cfg.cluster.k, "features": mode,
                   "data": str(cfg.data.root or (cfg.data.dataset if cfg.data.dataset != "auto" else "digits"))},
        "steps": len(splits), "warmup": args.warmup, "step_ms": 1e3 * step_s,
        "phase_ms": {k: 1e3 * v for k, v in med.items()},
        "phase_share": {k: v / med_sum for k, v in med.items()},
        "img_per_s": images / step_s, "loss_share_step": med["loss"] / med_sum,
        "estep_s": estep, "estep_first": dict(zip(("source", "s"), info["estep"][0])) if info["estep"] else None,
        "bank_fill_ms": 1e3 * fill_s, "steps_per_epoch": spe, "epoch_s_est": epoch_s,
        "loss_share_epoch": (spe * step_s * med["loss"] / med_sum / epoch_s) if epoch_s else None,
        "estep_share_epoch": (estep_epoch / epoch_s) if (epoch_s and estep is not None) else None,
        "wall_s": wall, "train_result": {k: result.get(k) for k in ("step", "seconds")},
        "env": common.env_info(device),
    }  # fmt: skip
    path = Path(args.results) if args.results else common.RESULTS / f"e2e_{device.type}.jsonl"
    common.append_jsonl(path, [row])
    print(render(row))
    print(f"\ne2e: appended to {path}")
    return 0


def render(row: dict) -> str:
    c = row["config"]
    lines = [
        f"**{row['env'].get('device_name')}**: {c['arch']} w{c['width']}, {c['batch_size']} images × "
        f"{c['views']} views at {c['image_size']} px, {c['precision']}, loss backend {c['loss_backend']}, K={c['k']}, "
        f"E-step features: {c.get('features', 'pass')}; "
        f"median of {row['steps']} steps: {row['step_ms']:.1f} ms/step, {row['img_per_s']:.0f} img/s",
        "",
        "| phase | ms/step | share of step |",
        "|---|---|---|",
    ]
    for k in PHASES:
        lines.append(f"| {k} | {row['phase_ms'][k]:.1f} | {100 * row['phase_share'][k]:.1f}% |")
    if row["epoch_s_est"]:
        fill = row.get("bank_fill_ms") or 0.0
        lines += [
            "",
            f"Epoch estimate: {row['steps_per_epoch']} steps × {row['step_ms']:.1f} ms + E-step "
            f"{row['estep_s'] or 0:.2f} s = {row['epoch_s_est']:.1f} s; loss {100 * row['loss_share_epoch']:.1f}% and "
            f"clustering {100 * (row['estep_share_epoch'] or 0):.1f}% of the epoch "
            f"(loss {100 * row['loss_share_step']:.1f}% of a step)"
            + (f"; bank fill {fill:.2f} ms/step counted in the E-step" if fill else "")
            + (
                f"; first E-step ({row['estep_first']['source']}) {row['estep_first']['s']:.2f} s"
                if row.get("estep_first") and c.get("features") == "bank"
                else ""
            )
            + ".",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
