"""Train an encoder with Siamese Prototypical Contrastive Learning (SPCL).

    python train.py                                        # the bundled digits data, configs/digits.yaml
    python train.py --config configs/cifar_r18.yaml --data /data/cifar10 --out out/cifar
    torchrun --nproc_per_node=8 train.py --config configs/imagenet_r50.yaml --data /data/imagenet
    srun python train.py ...                               # SLURM: one task per GPU
    python train.py --resume auto optim.base_lr=0.5        # continue the run in --out; key=value overrides

The last line printed is one JSON object with the final kNN "top1" (percent) on the held-out split. A user error
(a bad setting, data folder, --out or checkpoint) ends with one line on stderr and exit code 2; --debug shows its
traceback.
The training loop itself is protoclr/trainer.py; every key and its default is protoclr/config.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from protoclr import cli, config


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "train.py",
        description="Pretrain a ResNet with SPCL (SPEC.md). Precedence: defaults < --config YAML < named flags < "
        "key=value overrides (dotted keys, YAML values, type-checked).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set any of them as key=value):\n" + config.help_text(),
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="preset to start from (default configs/digits.yaml); its keys override the defaults below",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="data.root: ImageFolder, or a folder with train/ and val/ (or test/); 'digits' or 'fmnist' set "
        "data.dataset to that built-in source instead (default: bundled digits)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="out: checkpoints, logs, metrics, config.yaml")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs: training epochs")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="batch_size: GLOBAL images per step (split across ranks); lr scales with B/256",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="S",
        help="max_steps: stop after S steps in total and write a checkpoint (0 = no limit)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="resume: 'auto' continues the latest checkpoint in --out (fresh start if none), or a path",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["auto", "cpu", "cuda"],
        help="device: auto = CUDA when available (rank r uses cuda:LOCAL_RANK)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.base_lr=0.5")
    cli.add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_intermixed_args(argv)
    return cli.run(parser.prog, lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> dict:
    named = {
        **(config.data_flag(args.data) if args.data is not None else {}),
        "out": args.out,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps": args.max_steps,
        "resume": args.resume,
        "device": args.device,
    }
    cfg = config.resolve(args.config or config.DEFAULT_PRESET, named, args.overrides)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out!r} is a file; pass a folder for the checkpoints and logs")
    from protoclr.trainer import train

    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun / SLURM (set by init_distributed_mode) rank
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
