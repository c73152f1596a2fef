"""`python -m protoclr.eval knn|linear --ckpt PATH --data DIR|digits|fmnist`: evaluate a frozen encoder (SPEC §3.1).

The last line printed is one JSON object with "top1" (percent). Without --ckpt (or with --init random) the
encoder of the config (--config, default configs/digits.yaml) is evaluated at its random initialisation;
--features pixels evaluates the raw normalised pixels instead (a reference point for the learning test).
A user error (bad flag value, data folder or checkpoint) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
from torch import nn

from .. import checkpoint, cli, config, dist
from ..data import load_splits
from ..model import build_model
from ..monitor import setup_logging
from . import extract, knn_classify, linear_probe

log = logging.getLogger("protoclr.eval")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m protoclr.eval",
        description="Evaluate a frozen encoder with weighted kNN or a linear probe. Prints one JSON line last.",
        epilog="key=value overrides (e.g. eval.knn_k=200 data.holdout=0.2) apply to the checkpoint's config; "
        "`python train.py --help` lists every key.",
    )
    p.add_argument("mode", choices=["knn", "linear"], help="knn: weighted kNN (k=20, T=0.07); linear: linear probe")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train.py (its config gives model and data)")
    p.add_argument(
        "--data",
        default=None,
        help="ImageFolder, or a folder with train/ and val/ (or test/), or a built-in source: 'digits' or 'fmnist' "
        "(data.dataset); default: the checkpoint's data (the bundled digits when empty)",
    )
    p.add_argument("--val", default=None, help="held-out ImageFolder (default: DATA/val, DATA/test or data.holdout)")
    p.add_argument("--config", default=None, help="preset used without --ckpt (default configs/digits.yaml)")
    p.add_argument(
        "--init",
        choices=["trained", "random"],
        default="trained",
        help="random: the same architecture at its seeded random initialisation (a baseline)",
    )
    p.add_argument(
        "--features",
        choices=["encoder", "pixels"],
        default="encoder",
        help="pixels: flattened normalised eval images instead of encoder features (a baseline)",
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--k", type=int, default=None, help="kNN neighbours (default eval.knn_k = 20)")
    p.add_argument("--t", type=float, default=None, help="kNN temperature (default eval.knn_t = 0.07)")
    p.add_argument("--epochs", type=int, default=None, help="linear probe epochs (default eval.linear_epochs = 100)")
    p.add_argument("--lr", type=float, default=None, help="linear probe lr per 256 (default eval.linear_lr = 0.1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_intermixed_args(argv)
    return cli.run(parser.prog, lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> dict:
    setup_logging(None, 0)
    t0 = time.perf_counter()
    state = None
    if args.ckpt:
        state = checkpoint.load(args.ckpt)
        cfg = config.from_dict(state["config"])
        config.apply_overrides(cfg, config.parse_kv(args.overrides), "key=value overrides")
    else:
        cfg = config.resolve(args.config or config.DEFAULT_PRESET, {}, args.overrides)
    named = {
        **(config.data_flag(args.data) if args.data is not None else {}),
        "data.val": args.val,
        "eval.knn_k": args.k,
        "eval.knn_t": args.t,
        "eval.linear_epochs": args.epochs,
        "eval.linear_lr": args.lr,
    }
    config.apply_overrides(cfg, {k: v for k, v in named.items() if v is not None}, "command-line flags")
    cfg.validate()
    device = dist.resolve_device(args.device)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(dist.cpu_threads(cfg.threads, device, cfg.data.num_workers))
    try:
        return _evaluate(args, cfg, state, device, t0)
    finally:
        torch.set_num_threads(prev_threads)


def _evaluate(args, cfg, state, device, t0) -> dict:
    train, val, desc = load_splits(cfg.data, cfg.seed)
    if val is None:
        raise ValueError("no held-out set: pass --val, use a folder with train/ and val/, or set data.holdout=0.1")
    log.info("data: %s", desc)
    if args.features == "pixels":
        encoder: nn.Module = nn.Flatten()
        what = "raw pixels"
    else:
        torch.manual_seed(cfg.seed)  # the trainer's initialisation
        model = build_model(cfg)
        if args.init == "trained":
            if state is None:
                raise ValueError("--init trained needs --ckpt (or pass --init random)")
            checkpoint.load_model_state(model, state["model"])
            what = f"{args.ckpt} (epoch {state['epoch']}, step {state['step']})"
        else:
            what = f"{cfg.model.arch} width {cfg.model.width} at random init (seed {cfg.seed})"
        encoder = model.backbone
        if cfg.model.channels_last and device.type == "cuda":
            encoder = encoder.to(memory_format=torch.channels_last)
    encoder = encoder.to(device)
    log.info("encoder: %s", what)
    f_train, y_train, bad_train = extract(encoder, train, cfg, device)
    f_val, y_val, bad_val = extract(encoder, val, cfg, device)
    if args.mode == "knn":
        res = knn_classify(
            f_train, y_train, f_val, y_val, k=cfg.eval.knn_k, t=cfg.eval.knn_t, num_classes=len(train.classes)
        )
        res["t"] = cfg.eval.knn_t
    else:
        res = linear_probe(
            f_train,
            y_train,
            f_val,
            y_val,
            num_classes=len(train.classes),
            epochs=cfg.eval.linear_epochs,
            lr=cfg.eval.linear_lr,
            batch_size=cfg.eval.linear_batch_size,
            weight_decay=cfg.eval.linear_wd,
            seed=cfg.seed,
        )
    res = {
        "mode": args.mode,
        "top1": round(res.pop("top1"), 3),
        **res,
        "features": args.features,
        "init": args.init if args.features == "encoder" else None,
        "ckpt": args.ckpt,
        "unreadable_train": bad_train,  # dropped: they count toward neither the bank nor the score
        "unreadable_val": bad_val,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
