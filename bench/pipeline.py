"""Throughput of the training loaders (images/s), DALI and torchvision v2, on the digits data and on 256×256 JPEGs.

Each (dataset, backend) pair runs one warm-up epoch (pipeline build, worker start, page cache), then `--epochs`
timed epochs of the real training loop's data path: PrototypePairSampler order → read → decode → V augmented
views → normalised float32 channels_last tensors on the device. On a GPU, DALI decodes with nvJPEG (`mixed`).
Results are appended as JSON lines (one per pair) to bench/results/pipeline.jsonl with device, versions and git
commit; a table is printed last. Timings on 2-core CPU machines are noisy: compare backends within one run.

    python bench/pipeline.py                       # both datasets, both backends, this machine's device
    python bench/pipeline.py --device cuda --datasets jpeg256 --jpeg-images 2048
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protoclr.data import (  # noqa: E402
    AugmentConfig,
    PrototypePairSampler,
    build_train_loader,
    digits,
    resolve_backend,
    scan_image_folder,
)

log = logging.getLogger("bench.pipeline")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the views land; 'cuda' makes DALI decode with nvJPEG (default: cuda if available)",
    )
    p.add_argument("--backends", default="dali,torch", help="comma-separated loader backends to measure")
    p.add_argument(
        "--datasets",
        default="digits,jpeg256",
        help="comma-separated: 'digits' (bundled 32-px PNGs), 'jpeg256' (generated 256×256 JPEGs)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (each gives --views views)")
    p.add_argument("--views", type=int, default=2, help="large views per image")
    p.add_argument("--jpeg-images", type=int, default=512, help="number of 256×256 JPEGs to generate")
    p.add_argument("--jpeg-crop", type=int, default=224, help="view size for the JPEG data (blur is on above 32 px)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs after one warm-up epoch")
    p.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DALI threads / DataLoader workers (default: all cores)",
    )
    p.add_argument("--data-dir", default=None, help="digits cache folder (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.jsonl"), help="JSON lines file")
    return p


def git_info() -> tuple[str, bool]:
    """(commit sha, whether the work tree differs from it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def versions() -> dict[str, str | None]:
    import torchvision

    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except Exception:
        dali = None
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def make_jpegs(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """n JPEGs (quality 90) of smooth colour fields plus noise: natural-image-like entropy, 10 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a = rng.uniform(-4, 4, (3, 3))
        img = np.stack([np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) for c in range(3)], -1) * 0.4 + 0.5
        img = img + rng.normal(0, 0.06, img.shape)
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    return root


def run_one(ds, aug: AugmentConfig, backend: str, device: torch.device, args) -> dict:
    sampler = PrototypePairSampler(len(ds), args.batch_size, num_replicas=1, rank=0, seed=0)
    loader = build_train_loader(ds, sampler, aug, device, backend=backend, num_workers=args.num_workers)

    def epoch(e: int) -> int:
        sampler.set_epoch(e)
        n = 0
        for _views, index in loader:
            n += index.numel()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n

    t0 = time.perf_counter()
    epoch(0)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(epoch(1 + e) for e in range(args.epochs))
    dt = time.perf_counter() - t0
    return {
        "images": n,
        "seconds": round(dt, 4),
        "warmup_s": round(warm, 3),
        "images_per_s": round(n / dt, 1),
        "views_per_s": round(n * aug.views / dt, 1),
    }


def sampler_plan_ms(n: int = 1_281_167, batch: int = 4096, replicas: int = 8, k: int = 3000) -> float:
    """One epoch's PrototypePairSampler plan at ImageNet scale (rank 0 of 8, prototypes known), in ms."""
    sampler = PrototypePairSampler(n, batch // replicas, num_replicas=replicas, rank=0, seed=0)
    sampler.set_prototypes(torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(0)))
    t = time.perf_counter()
    n_batches = sum(1 for _ in sampler)
    assert n_batches == len(sampler)
    return round((time.perf_counter() - t) * 1e3, 1)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    sha, dirty = git_info()
    common = {
        "bench": "pipeline",
        "device": device_name(device),
        "device_type": device.type,
        **versions(),
        "git_sha": sha,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        # Shared 2-core machines: the load says how much of the CPU the benchmark actually had.
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "sampler_plan_ms_imagenet": sampler_plan_ms(),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="protoclr-bench-") as tmp:
        tmp = Path(tmp)
        data = {}
        for name in args.datasets.split(","):
            if name == "digits":
                root = digits.export_digits(Path(args.data_dir) if args.data_dir else tmp / "digits")
                data[name] = (scan_image_folder(root / "train"), AugmentConfig(image_size=32, views=args.views))
            elif name == "jpeg256":
                root = make_jpegs(tmp / "jpeg256", args.jpeg_images)
                data[name] = (scan_image_folder(root), AugmentConfig(image_size=args.jpeg_crop, views=args.views))
            else:
                raise ValueError(f"--datasets: unknown dataset {name!r}; use digits and/or jpeg256")
        for name, (ds, aug) in data.items():
            for backend in args.backends.split(","):
                try:
                    picked = resolve_backend(backend, device)
                except RuntimeError as e:
                    log.warning("skipping backend %s: %s", backend, e)
                    continue
                decode = {"dali": "nvjpeg-mixed" if device.type == "cuda" else "dali-cpu", "torch": "pil"}[picked]
                res = run_one(ds, aug, picked, device, args)
                row = {
                    **common,
                    "dataset": name,
                    "n_dataset": len(ds),
                    "backend": picked,
                    "decode": decode,
                    "image_size": aug.image_size,
                    "views": aug.views,
                    "blur": aug.blur_enabled,
                    **res,
                }
                rows.append(row)
                log.info("%s", json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    # Table last, for humans and logs.
    print(f"\n{'dataset':10} {'backend':7} {'decode':13} {'size':>5} {'img/s':>9} {'views/s':>9} {'warmup s':>9}")
    for r in rows:
        print(
            f"{r['dataset']:10} {r['backend']:7} {r['decode']:13} {r['image_size']:5d} {r['images_per_s']:9.1f} "
            f"{r['views_per_s']:9.1f} {r['warmup_s']:9.2f}"
        )
    print(f"sampler plan, 1,281,167 images, 8 ranks, K=3000: {common['sampler_plan_ms_imagenet']:.0f} ms per epoch")
    print(f"device: {common['device']}; results appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
