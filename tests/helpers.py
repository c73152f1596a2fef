"""Batch factory shared by tests and benchmarks, error metrics, and the tiny training configuration."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

# The digits preset shrunk to seconds (command-line key=value form): a ResNet-18 of base width 4 at 8 px, K = 5.
TINY = [
    "model.width=4",
    "aug.image_size=8",
    "cluster.k=5",
    "cluster.pca_dim=16",
    "batch_size=32",
    "data.num_workers=0",
    "data.backend=torch",
    "data.eval_batch_size=512",
    "progress=false",
    "log_every=1",
    "threads=1",
]
# Whole runs inside the test process: no periodic kNN, and the plain-PyTorch loss unless a test picks a backend.
TINY_IN_PROCESS = [*TINY, "eval.knn_every=0", "loss.backend=reference"]


def tiny_cfg(out: Path, *extra: str, **named):
    """The tiny in-process configuration writing to `out`, with extra key=value overrides and named fields."""
    from protoclr import config

    return config.resolve(config.DEFAULT_PRESET, {"out": str(out), **named}, TINY_IN_PROCESS + list(extra))


def write_digit_images(root: Path, n_per_class: int, corrupt: bool, offset: int = 0) -> None:
    """An ImageFolder of the bundled digits as 16-px PNG files, `n_per_class` of each of the 10 classes from `offset`
    on; `corrupt` adds a garbage, a truncated and an empty file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        idx = [i for i in range(len(d.target)) if d.target[i] == c][offset : offset + n_per_class]
        for i in idx:
            px = (d.images[i] * 255 / 16).astype("uint8")
            Image.fromarray(px, "L").resize((16, 16)).convert("RGB").save(root / str(c) / f"{i:04d}.png")
    if corrupt:
        (root / "3" / "zz_garbage.png").write_bytes(b"this is not an image at all")
        good = (root / "4").iterdir().__next__().read_bytes()
        (root / "4" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
        (root / "5" / "zz_empty.png").write_bytes(b"")


# every Triton kernel of protoclr.kernels (the autotuned ones on a GPU)
TRITON_KERNELS = (
    "_assign_kernel",
    "_contrastive_fwd_kernel",
    "_contrastive_bwd_rows_kernel",
    "_contrastive_bwd_cols_kernel",
    "_siamese_fwd_kernel",
    "_siamese_bwd_kernel",
)


def make_batch(
    m: int,
    views: int = 2,
    dz: int = 16,
    dh: int = 24,
    k: int = 3,
    unknown: float = 0.25,
    dtype=torch.float64,
    device="cpu",
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
):
    """A random SPCL batch of M images × V views (N = M·V rows).

    Returns dict with z (N, dz) L2-normalised, h (N, dh), inst (N,) int64 (dataset-like ids, not 0..M-1),
    proto (N,) int64 in [-1, k) (a share `unknown` of images at -1, per image, so views agree), weight (dh,),
    bias (1,). Rows are shuffled so views of an image are not adjacent.
    """
    g = generator
    n = m * views
    ids = torch.randperm(10 * m + 7, generator=g)[:m] + 3  # distinct image ids
    img_proto = torch.randint(0, k, (m,), generator=g)
    img_proto[torch.rand(m, generator=g) < unknown] = -1
    inst = ids.repeat(views)
    proto = img_proto.repeat(views)
    if shuffle:
        perm = torch.randperm(n, generator=g)
        inst, proto = inst[perm], proto[perm]
    z = F.normalize(torch.randn(n, dz, generator=g, dtype=torch.float64), dim=1)
    h = torch.randn(n, dh, generator=g, dtype=torch.float64)
    weight = torch.randn(dh, generator=g, dtype=torch.float64) / dh**0.5
    bias = torch.randn(1, generator=g, dtype=torch.float64)
    out = dict(z=z, h=h, inst=inst, proto=proto, weight=weight, bias=bias)
    for key in ("z", "h"):
        out[key] = out[key].to(device=device, dtype=dtype).requires_grad_(requires_grad)
    for key in ("weight", "bias"):
        wdt = torch.float64 if dtype == torch.float64 else torch.float32
        out[key] = out[key].to(device=device, dtype=wdt).requires_grad_(requires_grad)
    out["inst"] = out["inst"].to(device)
    out["proto"] = out["proto"].to(device)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute when b is 0); NaN anywhere gives inf."""
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    nb = b.norm().item()
    d = (a - b).norm().item()
    return d / nb if nb > 0 else d


def make_batch_n(n: int, **kw):
    """make_batch with exactly n rows (pairs of views, the last image possibly with a single view)."""
    b = make_batch((n + 1) // 2, 2, **kw)
    for key in ("z", "h", "inst", "proto"):
        t = b[key][:n]
        b[key] = t.detach().requires_grad_(b[key].requires_grad) if t.is_floating_point() else t
    return b


def split_case_id(case) -> str:
    """Test id of a row/column split case (nc, r0, r1, D, dtype): the nc columns, anchor rows [r0, r1)."""
    nc, r0, r1, d, dtype = case
    return f"n{nc}-rows{r0}:{r1}-d{d}-{str(dtype).removeprefix('torch.')}"


# Relative error bounds vs the float64 reference (SPEC §3 numerics).
def tolerance(device: str, dtype: torch.dtype) -> float:
    if dtype == torch.float64:  # the CPU kernels measure ~1e-15; 1e-12 catches a lost digit range (1e-11)
        return 1e-12 if device == "cpu" else 1e-9
    if dtype == torch.float32:
        return 1e-5  # on the GPU too: 3xTF32 or IEEE fp32; plain TF32 (~5e-4) is not fp32 (SPEC §3)
    return 1e-2


def interpreting_triton(backend: str, device) -> bool:
    return backend == "triton" and str(device) == "cpu"


def file_tree(root) -> dict[str, tuple[int, int, int]]:
    """{relative path: (inode, mtime_ns, size)} of every file under root: equal before and after an operation
    means it wrote nothing (an idempotent export)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out
