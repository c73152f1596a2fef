"""`python -m protoclr.export --ckpt PATH --out FILE [--format torchvision|safetensors]`: the trained backbone
for code that knows torchvision's ResNets (what solo-learn, DINO and MoCo users expect).

The file holds the backbone only, under torchvision's parameter names, and loads into the matching
`torchvision.models.resnet18|34|50` with `strict=True` once that model's `fc` is `torch.nn.Identity()`: protoclr
trains no classifier, so there is no fc to export, and the model then returns the pooled features h (B, C), exactly
what protoclr's encoder returns. A backbone with the CIFAR stem (model.stem=cifar, or auto at image_size <= 64) also
needs torchvision's stem swapped: `conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)`, `maxpool =
torch.nn.Identity()`. torchvision has base width 64 only, so a backbone of another model.width is refused.

    import torch, torchvision
    from safetensors.torch import load_file
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file("backbone.safetensors"), strict=True)   # or torch.load("backbone.pth")

Formats: `torchvision` = a `torch.save`d state dict (like torchvision's own weight files; `torch.load(FILE,
weights_only=True)`), its metadata in FILE.json; `safetensors` = the same tensors, the metadata in the file's header
(`safetensors.safe_open(FILE, "pt").metadata()`, every value a string, lists as JSON). The metadata says how inputs
must look (image_size, resize_size, mean, std), the stem, the feature dim, the exact loading code, and where the
weights come from. The last line printed is the metadata as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, checkpoint, cli, config
from .data.augment import eval_resize_size

__all__ = ["FORMATS", "backbone_state_dict", "export", "main", "torchvision_backbone"]

log = logging.getLogger("protoclr.export")

FORMATS = ("torchvision", "safetensors")
_PREFIX = "backbone."


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a checkpoint's "model" entry, under torchvision's names (contiguous copies)."""
    model_state = checkpoint.clean_state_dict(model_state)
    return {k[len(_PREFIX) :]: v.contiguous().clone() for k, v in model_state.items() if k.startswith(_PREFIX)}


def torchvision_backbone(arch: str, stem: str) -> nn.Module:
    """The torchvision model an export loads into with strict=True: `torchvision.models.<arch>()` with `fc` =
    Identity, and for the CIFAR stem a 3x3 stride-1 `conv1` and no max-pool."""
    import torchvision

    model = getattr(torchvision.models, arch)()
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _load_code(arch: str, stem: str, fmt: str) -> str:
    read = 'safetensors.torch.load_file("FILE")' if fmt == "safetensors" else 'torch.load("FILE", weights_only=True)'
    lines = [f"model = torchvision.models.{arch}()", "model.fc = torch.nn.Identity()"]
    if stem == "cifar":
        lines += ["model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)", "model.maxpool = torch.nn.Identity()"]
    return "; ".join([*lines, f"model.load_state_dict({read}, strict=True)"])


def export(ckpt: str | Path, out: str | Path, fmt: str = "torchvision") -> dict[str, Any]:
    """Write the backbone of the checkpoint `ckpt` to `out` (see the module docstring); returns the metadata.

    Raises:
        ValueError: an unknown format, `out` is a folder, the checkpoint is not readable, or its backbone has no
            torchvision counterpart (model.width != 64); FileNotFoundError: no such checkpoint.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export: --format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(
            f"export: --out {str(out)!r} is a folder; pass a file name, e.g. {str(out / 'backbone.pth')!r}"
        )
    state = checkpoint.load(ckpt)
    cfg = config.from_dict(state["config"])
    arch, width = cfg.model.arch, cfg.model.width
    if width != 64:
        raise ValueError(
            f"export: the checkpoint's backbone has model.width={width}, but torchvision.models.{arch} has base "
            "width 64; only width-64 backbones load into torchvision (train with model.width=64)"
        )
    weights = backbone_state_dict(state["model"])
    stem = "cifar" if weights["conv1.weight"].shape[-1] == 3 else "imagenet"
    target = torchvision_backbone(arch, stem)
    target.load_state_dict(weights, strict=True)  # the promise made to the user, checked before anything is written
    meta: dict[str, Any] = {
        "format": fmt,
        "arch": arch,
        "torchvision_model": f"torchvision.models.{arch}",
        "stem": stem,
        "fc": "excluded (protoclr trains no classifier): set model.fc = torch.nn.Identity(); the model then returns "
        "the pooled features",
        "feat_dim": [m for m in target.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features,
        "image_size": cfg.aug.eval_size_resolved,
        "resize_size": eval_resize_size(cfg.aug.eval_size_resolved),
        "mean": list(cfg.aug.mean),
        "std": list(cfg.aug.std),
        "input": "RGB scaled to [0, 1], shorter side resized to resize_size, centre crop of image_size, then "
        "(x - mean) / std per channel",
        "load": _load_code(arch, stem, fmt).replace("FILE", out.name),
        "tensors": len(weights),
        "parameters": sum(p.numel() for p in target.parameters()),
        "checkpoint": str(ckpt),
        "epoch": state["epoch"],
        "step": state["step"],
        "git_sha": state.get("git_sha", "unknown"),
        "producer": f"protoclr {__version__}",
    }
    if fmt == "safetensors":
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError:
            raise ValueError("export: --format safetensors needs the safetensors package (requirements.txt)") from None
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        data = safetensors_bytes(weights, metadata=header)
        checkpoint.atomic_write(out, lambda f: f.write(data))
    else:
        checkpoint.atomic_write(out, lambda f: torch.save(weights, f))
        checkpoint.atomic_write(
            out.with_name(out.name + ".json"), lambda f: f.write(json.dumps(meta, indent=1).encode())
        )
    return {"out": str(out), **meta}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m protoclr.export",
        description="Export a checkpoint's backbone for torchvision.models.resnet* (fc excluded: set model.fc = "
        "torch.nn.Identity() before load_state_dict(..., strict=True)). Prints the metadata as one JSON line last.",
    )
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by train.py")
    p.add_argument(
        "--out", required=True, metavar="FILE", help="file to write (e.g. backbone.pth, backbone.safetensors)"
    )
    p.add_argument(
        "--format",
        default="torchvision",
        choices=FORMATS,
        help="torchvision: a torch.save'd state dict, metadata in FILE.json; safetensors: metadata in the header",
    )
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    res = cli.run(parser.prog, lambda: export(args.ckpt, args.out, args.format), args.debug)
    where = "its header" if args.format == "safetensors" else f"{args.out}.json"
    print(f"wrote the {res['arch']} backbone ({res['tensors']} tensors, {res['stem']} stem) to {args.out}")
    print(f"metadata in {where}; fc is excluded (protoclr trains no classifier). Load it with:")
    for line in res["load"].split("; "):
        print(f"    {line}")
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
