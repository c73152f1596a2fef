"""Representation quality on real data: SPCL against SimCLR, supervised training and raw pixels (Fashion-MNIST).

Every method trains the same backbone with the same augmentations, optimiser, epochs, batch and seeds
(`configs/fmnist.yaml`); only the objective differs (METHODS). Each trained encoder is scored by the trainer's kNN
monitor (k=20, T=0.07) and by the linear probe (`python -m protoclr.eval linear`), both on the held-out split:

- `--split val`: a validation split carved from Fashion-MNIST's training images (disjoint from the training
  subset). Tune here.
- `--split test`: the official 10,000 test images. Report here; never tune on it.

Training images: a class-stratified subset of `--train-images` of the 60,000 training images, the same for
every method and seed; validation: `--val-images` further training images. Runs are subprocesses of the real
command lines (`train.py --resume auto`, `python -m protoclr.eval`), so a killed study resumes where it stopped:
a (method, seed, split) already in the JSONL with the same settings is skipped.

    python bench/quality.py                                   # the study on the test split (make quality)
    python bench/quality.py --split val --methods simclr spcl --seeds 0 1 2
    python bench/quality.py --split val --methods spcl --tag k200 -- cluster.k=200   # an ablation
    python bench/quality.py --report                          # table + plots from the JSONL only
    python bench/quality.py --clusters --split test           # final prototypes vs the labels, per run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's protoclr, also when it is not the installed one
RESULTS = ROOT / "bench" / "results" / "quality.jsonl"
PRESET = ROOT / "configs" / "fmnist.yaml"
# The preset's loss.tau, loss.fn_mode, epochs, precision on this CPU and training crop side (aug.image_size)
# (tests/test_bench.py checks); rows of earlier presets are labelled with theirs.
PRESET_TAU = 0.1
PRESET_FN_MODE = "attract"
PRESET_EPOCHS = 32
PRESET_PRECISION = "bf16"
PRESET_IMAGE_SIZE = 20

# Objective of each method, as overrides of the preset. Everything else is shared. "spcl" is the preset as it is
# (protoclr's default SPCL); the spcl-* rows pin the SPEC §2 values they vary, so they stay what their name says
# when the defaults change.
SPEC_SPCL = ["loss.fn_mode=none", "loss.pairs=dense", "loss.lambda_sia=1.0", "loss.lambda_proto=1.0"]
METHODS: dict[str, list[str] | None] = {
    "raw": None,  # raw normalised pixels, no encoder
    "random": None,  # the backbone at its random initialisation
    "supervised": [
        "cluster.source=labels",
        "cluster.k=10",
        "cluster.start_epoch=0",
        "loss.lambda_con=0",
        "loss.lambda_sia=0",
        "loss.lambda_proto=1.0",
    ],
    "simclr": ["loss.lambda_sia=0", "loss.lambda_proto=0", "cluster.start_epoch=1000000", "loss.fn_mode=none"],
    "spcl-paper": [*SPEC_SPCL, "loss.pairs=paper", "cluster.start_epoch=0"],
    "spcl-dense": [*SPEC_SPCL, "cluster.start_epoch=0"],
    "spcl-mask": [*SPEC_SPCL, "cluster.start_epoch=0", "loss.fn_mode=mask"],
    "spcl-attract": [*SPEC_SPCL, "cluster.start_epoch=0", "loss.fn_mode=attract"],
    "spcl": [],
    "spcl-bank": ["cluster.features=bank"],  # protoclr's SPCL clustering the training forward's features (no pass)
}
# The study: 3 seeds for SimCLR and protoclr's SPCL (the claim) and for SPCL with the feature bank, 1 for the rest.
PLAN = {m: ([0, 1, 2] if m in ("simclr", "spcl", "spcl-bank") else [0]) for m in METHODS}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench/quality.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", choices=["val", "test"], default="test", help="held-out split scored (tune on val)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to run")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds for every method (default: PLAN)")
    p.add_argument("--tag", default="", help="name suffix of an ablation (its overrides follow '--')")
    p.add_argument("--train-images", type=int, default=10_000, help="stratified training subset (of 60,000)")
    p.add_argument("--val-images", type=int, default=5_000, help="validation images carved from the rest")
    p.add_argument("--config", default=str(PRESET), help="the shared preset")
    p.add_argument("--work", default=None, help="runs and split folders (default $PROTOCLR_DATA_DIR/quality)")
    p.add_argument("--results", default=str(RESULTS), help="JSONL the rows are appended to")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = the preset's)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (kNN only; faster tuning)")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plots")
    p.add_argument(
        "--clusters",
        action="store_true",
        help="only measure the final prototypes of every run of --split against the labels: purity, how the\n"
        "false-negative handling sees pairs (same prototype vs same class), and the share of the contrastive\n"
        "repulsion (softmax mass over the training set, tau 0.5 and 0.2) on own-prototype and own-class images",
    )
    p.add_argument("--runs", default="*", help="with --clusters: a glob of run folder names (e.g. 'spcl-s*')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every trained method")
    return p


# ------------------------------------------------------------------------------------------------ data


def work_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    base = os.environ.get("PROTOCLR_DATA_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "protoclr") / "quality"


def prepare_splits(work: Path, n_train: int, n_val: int) -> dict[str, Path]:
    """Folders of symlinks into the Fashion-MNIST export: split/train (n_train), split/val (n_val), both
    class-stratified and disjoint, fixed (seed 0) whatever the training seed; plus the official test folder."""
    from protoclr.data import fmnist, scan_image_folder, stratified_subset

    export = fmnist.export_fmnist()
    split = work / f"split-{n_train}-{n_val}"
    marker = split / ".complete"
    if not marker.exists():
        full = scan_image_folder(export / "train")
        pool = stratified_subset(full, n_train + n_val, seed=0)
        train = stratified_subset(pool, n_train, seed=0)
        taken = {path for path, _ in train.samples}
        val = [(path, y) for path, y in pool.samples if path not in taken]
        for name, samples in (("train", train.samples), ("val", val)):
            for path, y in samples:
                dst = split / name / pool.classes[y] / Path(path).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.symlink(path, dst)
        marker.write_text(json.dumps({"train": len(train), "val": len(val), "export": str(export)}))
    return {"root": split, "val": split / "val", "test": export / "test"}


# ------------------------------------------------------------------------------------------------ runs


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output")


def _run(cmd: list[str], log_path: Path) -> dict:
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"{cmd[1]} failed (exit {proc.returncode}); see {log_path}")
    return _last_json(proc.stdout)


def _knn_curve(run_dir: Path) -> list[list[float]]:
    curve = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("type") == "epoch" and row.get("knn_top1") is not None:
                curve.append([row["epoch"] + 1, row["knn_top1"]])
    return curve


def shared_overrides(args) -> list[str]:
    """Overrides of every method: the split folder is the training subset already; the user's extras."""
    return [
        "data.subset=0",
        "eval.baselines=false",
        *args.overrides,
        *([f"threads={args.threads}"] if args.threads else []),
    ]


def method_overrides(method: str, args) -> list[str]:
    """The overrides a (method, settings) runs with; part of the key that decides whether a row exists."""
    return [*(METHODS[method] or []), *shared_overrides(args)]


def effective_loss(method: str, args) -> tuple[float | None, str | None]:
    """(loss.tau, loss.fn_mode) a (method, settings) trains with ((None, None) where no contrastive term trains: raw,
    random, supervised): part of a row's key, so rows of an earlier preset are not taken for the current one."""
    if METHODS[method] is None:
        return None, None
    from protoclr.config import resolve

    loss = resolve(args.config, {}, method_overrides(method, args)).loss
    return (loss.tau, loss.fn_mode) if loss.lambda_con else (None, None)


def effective_budget(method: str, args) -> tuple[int | None, str | None, int | None]:
    """(epochs, precision, aug.image_size) a (method, settings) trains with ((None, None, None) for raw and random:
    nothing trains): part of a row's key, so rows of a preset with another budget are not taken for the current
    one."""
    if METHODS[method] is None:
        return None, None, None
    import torch

    from protoclr.config import resolve
    from protoclr.trainer import resolve_precision

    cfg = resolve(args.config, {}, method_overrides(method, args))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return cfg.epochs, resolve_precision(cfg.precision, device.split(":")[0]), cfg.aug.image_size


def run_name(method: str, args) -> str:
    return method + (f"-{args.tag}" if args.tag else "")


def settings_digest(method: str, args) -> str:
    """8 hex digits of the preset's text and the overrides: a run folder holds one setting, so a crashed run resumes
    but a run of an earlier preset (or other overrides) is never resumed as if it were this one."""
    text = json.dumps([Path(args.config).read_text(), method_overrides(method, args)])
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_one(method: str, seed: int, args, paths: dict[str, Path], work: Path) -> dict:
    """Train (unless raw/random) and evaluate one (method, seed); returns the JSONL row."""
    held = paths[args.split]
    py = sys.executable
    name = run_name(method, args)
    run_dir = work / "runs" / args.split / f"{name}-s{seed}-{settings_digest(method, args)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "study.log"
    shared = shared_overrides(args)
    overrides = method_overrides(method, args)
    common = ["--data", str(paths["root"]), "--val", str(held)]
    tau, fn_mode = effective_loss(method, args)
    epochs, precision, image_size = effective_budget(method, args)
    row: dict = {"method": name, "seed": seed, "split": args.split, "tau": tau, "fn_mode": fn_mode}
    row.update(epochs=epochs, precision=precision, image_size=image_size)
    t0 = time.perf_counter()
    if METHODS[method] is None:
        base = [py, "-m", "protoclr.eval", "--config", args.config, *common]
        flavour = ["--features", "pixels"] if method == "raw" else ["--init", "random"]
        extra = [f"seed={seed}", *shared]
        knn = _run([*base[:3], "knn", *base[3:], *flavour, *extra], log_path)
        lin = None if args.no_linear else _run([*base[:3], "linear", *base[3:], *flavour, *extra], log_path)
        row["train_seconds"] = 0.0
        row["knn_curve"] = []
        row["overrides"] = overrides
    else:
        cmd = [py, "train.py", "--config", args.config, "--data", str(paths["root"]), "--out", str(run_dir)]
        cmd += ["--resume", "auto", f"seed={seed}", f"data.val={held}", "progress=false", *overrides]
        res = _run(cmd, log_path)
        ckpt = run_dir / "checkpoint.pth"
        knn = {"top1": res["top1"]}
        lin = None
        if not args.no_linear:
            lin = _run([py, "-m", "protoclr.eval", "linear", "--ckpt", str(ckpt), *common], log_path)
        row["train_seconds"] = res["seconds"]
        row["knn_curve"] = _knn_curve(run_dir)
        row["overrides"] = overrides
    row.update(
        knn_top1=knn["top1"],
        linear_top1=None if lin is None else lin["top1"],
        seconds=round(time.perf_counter() - t0, 1),
        config=Path(args.config).name,
        train_images=args.train_images,
        val_images=args.val_images,
        git_sha=_git_sha(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        loadavg_1m=os.getloadavg()[0],
    )
    return row


def _git_sha() -> str:
    from protoclr.trainer import git_sha

    return git_sha()


def _key(row: dict) -> tuple:
    return (
        row["method"],
        row["seed"],
        row["split"],
        row.get("train_images"),
        tuple(row.get("overrides") or ()),
        row.get("tau"),
        row.get("fn_mode"),
        row.get("epochs"),
        row.get("precision"),
        row.get("image_size"),
    )


def planned_key(method: str, seed: int, args) -> tuple:
    """The `_key` of the row that running (method, seed) with these settings writes."""
    overrides = tuple(method_overrides(method, args))
    loss, budget = effective_loss(method, args), effective_budget(method, args)
    return (run_name(method, args), seed, args.split, args.train_images, overrides, *loss, *budget)


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "method" in r]  # this study's rows (an ablations file may hold older hand-run ones)


def _label(row: dict) -> str:
    """The table's name of a row: its method, and where it differs from the current preset: its temperature, and its
    fn_mode, epochs, precision and training crop side unless its name says so (the method pins them, as SimCLR's
    fn_mode, or a tagged ablation's overrides set them). So a row of an earlier preset, or of an untagged run with
    overrides (`-- epochs=64`), is never taken for the preset's."""
    tau, fn_mode, epochs, precision, size = (
        row.get(k) for k in ("tau", "fn_mode", "epochs", "precision", "image_size")
    )
    named = (METHODS[row["method"]] or ()) if row["method"] in METHODS else (row.get("overrides") or ())

    def shown(value, preset, key: str) -> bool:
        return value is not None and value != preset and not any(o.startswith(key + "=") for o in named)

    differs = [f"τ {tau:g}"] if tau is not None and tau != PRESET_TAU else []
    differs += [fn_mode] if shown(fn_mode, PRESET_FN_MODE, "loss.fn_mode") else []
    differs += [f"{epochs} ep"] if shown(epochs, PRESET_EPOCHS, "epochs") else []
    differs += [precision] if shown(precision, PRESET_PRECISION, "precision") else []
    differs += [f"{size} px"] if shown(size, PRESET_IMAGE_SIZE, "aug.image_size") else []
    return row["method"] + (f" ({', '.join(differs)})" if differs else "")


# ------------------------------------------------------------------------------------------------ report


def _mean_std(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(rows: list[dict], split: str) -> list[dict]:
    """Mean and std over seeds per method (the latest row of each (method, seed) counts)."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r["split"] == split:
            latest[(_label(r), r["seed"])] = r
    by_method: dict[str, list[dict]] = defaultdict(list)
    for (method, _), r in sorted(latest.items()):
        by_method[method].append(r)
    out = []
    for method, rs in by_method.items():
        (km, ks), (lm, ls) = _mean_std(rs, "knn_top1"), _mean_std(rs, "linear_top1")
        out.append(
            {
                "method": method,
                "seeds": [r["seed"] for r in rs],
                "knn": [r["knn_top1"] for r in rs],
                "knn_mean": km,
                "knn_std": ks,
                "linear_mean": lm,
                "linear_std": ls,
                "train_min": statistics.fmean(r["train_seconds"] for r in rs) / 60,
                "curves": [r.get("knn_curve") or [] for r in rs],
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    out.sort(
        key=lambda s: (
            order.get(s["method"].split(" (")[0], order.get(s["method"].split("-")[0], 99)),
            s["method"],
        )
    )
    return out


def table(summary: list[dict]) -> str:
    def pm(m, s, n):
        if m is None:
            return "–"
        return f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"

    lines = [
        "| method | seeds | kNN top-1 per seed | kNN top-1 (mean ± std) | linear top-1 | train min/run |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        n = len(s["seeds"])
        per_seed = " / ".join(f"{v:.2f}" for v in s["knn"])
        lines.append(
            f"| {s['method']} | {n} | {per_seed} | {pm(s['knn_mean'], s['knn_std'], n)} | "
            f"{pm(s['linear_mean'], s['linear_std'], n)} | {s['train_min']:.1f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], split: str, out_dir: Path) -> Path | None:
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5.2))
    ax2.set_prop_cycle(color=plt.cm.tab20.colors)  # distinct colours for up to 20 methods
    names = [s["method"] for s in summary]
    x = range(len(names))
    w = 0.38
    for off, key, label in ((-w / 2, "knn", "kNN top-1"), (w / 2, "linear", "linear top-1")):
        means = [s[f"{key}_mean"] or 0.0 for s in summary]
        stds = [s[f"{key}_std"] or 0.0 for s in summary]
        ax1.bar([i + off for i in x], means, w, yerr=stds, capsize=3, label=label)
    lo = min((s["knn_mean"] for s in summary if s["knn_mean"]), default=0)
    ax1.set_ylim(max(0, math.floor(lo / 5) * 5 - 5), 100)
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_ylabel("top-1 %")
    ax1.set_title(f"Fashion-MNIST, {split} split (mean ± std over seeds)")
    ax1.legend(loc="upper right")
    for s in summary:
        pts = [c for c in s["curves"] if c]
        if not pts:
            continue
        epochs = sorted({e for c in pts for e, _ in c})
        mean = [statistics.fmean(v for c in pts for e2, v in c if e2 == e) for e in epochs]
        style = "--" if " (" in s["method"] else "-"  # rows of an earlier preset
        ax2.plot(epochs, mean, style, marker="o", label=s["method"])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("kNN top-1 % (mean over seeds)")
    ax2.set_title("kNN monitor during training")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over them
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quality_fmnist_{split}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main


def cluster_stats(ckpt_path: Path) -> dict | None:
    """The final prototypes of a run against the class labels (None without prototypes). Over ordered pairs of
    distinct training images: `precision` = P(same class | same prototype), what fn_mode mask/attract treat as
    false negatives that are; `recall` = P(same prototype | same class), the share of the true false negatives
    they catch; `masked` = P(same prototype), the share of pairs they touch; `same_class` = P(same class)."""
    import numpy as np
    import torch

    from protoclr.data.folder import scan_image_folder, stratified_subset

    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ids = state["prototypes"]["ids"].numpy()
    if not (ids >= 0).any():
        return None
    data = state["config"]["data"]
    root = Path(data["root"])
    ds = scan_image_folder(root / "train" if (root / "train").is_dir() else root)
    if data.get("subset"):
        ds = stratified_subset(ds, data["subset"], state["config"]["seed"])
    labels = np.array([label for _, label in ds.samples])
    known = ids >= 0
    ids, labels = ids[known], labels[known]
    table = np.zeros((ids.max() + 1, labels.max() + 1))
    np.add.at(table, (ids, labels), 1)
    n = known.sum()
    pairs = lambda counts: float((counts**2).sum() - n)  # noqa: E731  (ordered pairs i != j sharing a group)
    both, same_p, same_y = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    return {
        "k": state["config"]["cluster"]["k"],
        "purity": float(table.max(1).sum() / n),
        "precision": both / same_p,
        "recall": both / same_y,
        "masked": same_p / (n * (n - 1)),
        "same_class": same_y / (n * (n - 1)),
        **negative_mass(state, ds, known),
    }


def repulsion_shares(z, *groups, tau: float) -> list[float]:
    """Per grouping g (an int label per row), the mean over anchors i of
    sum_{j != i, g_j = g_i} exp(z_i·z_j / tau) / sum_{j != i} exp(z_i·z_j / tau), for L2-normalised rows z."""
    import torch

    shares = [0.0] * len(groups)
    for rows in torch.split(torch.arange(len(z)), 1024):
        w = torch.exp((z[rows] @ z.T - 1) / tau)  # shifted by the largest possible similarity: no overflow
        w[torch.arange(len(rows)), rows] = 0
        total = w.sum(1)
        for k, g in enumerate(groups):
            shares[k] += float(((w * (g[rows, None] == g[None])).sum(1) / total).sum())
    return [share / len(z) for share in shares]


def negative_mass(state: dict, ds, known, taus: tuple[float, ...] = (0.5, 0.2)) -> dict:
    """Where a trained encoder's contrastive repulsion goes. Over every anchor i and image j != i of the training
    set (eval transform, z in eval mode), the share of sum_j exp(z_i·z_j / tau) that falls on images of i's
    prototype (what fn_mode=mask removes) and on images of i's class (the true false negatives), averaged over
    anchors, at each tau in `taus`. A random batch's denominator holds the same shares in expectation."""
    import torch
    import torch.nn.functional as F

    from protoclr import checkpoint
    from protoclr.config import from_dict
    from protoclr.eval import extract
    from protoclr.model import build_model

    cfg = from_dict(state["config"])
    model = build_model(cfg)
    checkpoint.load_model_state(model, state["model"])
    model.eval()
    with torch.no_grad():
        h, y, _ = extract(model.backbone, ds, cfg, torch.device("cpu"))
        z = F.normalize(model.projector(h).double(), dim=1)
    keep = torch.as_tensor(known)
    z, y, p = z[keep], y[keep], state["prototypes"]["ids"][keep]
    out = {}
    for tau in taus:
        out[f"mass_proto_t{tau:g}"], out[f"mass_class_t{tau:g}"] = repulsion_shares(z, p, y, tau=tau)
    out["tau"] = state["config"]["loss"]["tau"]
    return out


def print_cluster_stats(work: Path, split: str, runs: str = "*") -> None:
    print("| run | tau | K | purity | P(same class \\| same prototype) | P(same prototype \\| same class) "
          "| pairs masked | pairs of one class | repulsion on own prototype, tau 0.5 / 0.2 "
          "| repulsion on own class, tau 0.5 / 0.2 |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for ckpt in sorted((work / "runs" / split).glob(f"{runs}/checkpoint.pth")):
        st = cluster_stats(ckpt)
        if st is not None:
            print(f"| {ckpt.parent.name} | {st['tau']:g} | {st['k']} | {st['purity']:.3f} | {st['precision']:.3f} | "
                  f"{st['recall']:.3f} | {100 * st['masked']:.2f}% | {100 * st['same_class']:.2f}% "
                  f"| {100 * st['mass_proto_t0.5']:.1f}% / {100 * st['mass_proto_t0.2']:.1f}% "
                  f"| {100 * st['mass_class_t0.5']:.1f}% / {100 * st['mass_class_t0.2']:.1f}% |",
                  flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.clusters:
        print_cluster_stats(work_dir(args.work), args.split, args.runs)
        return
    results = Path(args.results)
    if not args.report:
        work = work_dir(args.work)
        paths = prepare_splits(work, args.train_images, args.val_images)
        done = {_key(r) for r in load_rows(results)}
        for method in args.methods:
            for seed in args.seeds if args.seeds is not None else PLAN[method]:
                name = run_name(method, args)
                key = planned_key(method, seed, args)
                if key in done:
                    print(f"quality: {name} seed {seed} ({args.split}) already in {results}, skipped", flush=True)
                    continue
                print(f"quality: {name} seed {seed} ({args.split}) ...", flush=True)
                row = run_one(method, seed, args, paths, work)
                results.parent.mkdir(parents=True, exist_ok=True)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                lin = "–" if row["linear_top1"] is None else f"{row['linear_top1']:.2f}"
                print(
                    f"quality: {name} seed {seed}: kNN {row['knn_top1']:.2f}  linear {lin}  ({row['seconds']:.0f} s)",
                    flush=True,
                )
    summary = summarise(load_rows(results), args.split)
    print(table(summary))
    path = plot(summary, args.split, results.parent / "plots")
    if path:
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
