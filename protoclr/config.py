"""Training configuration: nested dataclasses, the one source of defaults (STYLE "Config and CLI").

Every field carries `metadata={"help": ...}`; `python train.py --help` lists every key with its default and help.
Precedence, lowest first: the defaults below < a `--config configs/NAME.yaml` file (only the keys it sets)
< named flags (`--batch-size 256`) < `key=value` overrides (dotted, YAML-parsed, type-checked:
`optim.base_lr=0.5 aug.crop_scale=[0.2,1.0]`). An unknown key is an error that names the closest key.

The defaults are SPEC §2's (the paper's CIFAR/ResNet-18 recipe); the presets in `configs/` override them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.augment import AugmentConfig
from .ops import BACKENDS
from .ops.checks import FN_MODES

__all__ = [
    "ClusterConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "AugmentConfig",
    "apply_overrides",
    "data_flag",
    "flatten",
    "help_text",
    "load_yaml",
    "parse_kv",
    "to_dict",
    "to_yaml",
    "from_dict",
    "resolve",
    "DEFAULT_PRESET",
]


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best at the call sites
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    """Where the images come from and how they are read."""

    dataset: str = _f(
        "auto",
        "'auto' (the ImageFolder at data.root; the bundled digits when root is ''), or a built-in source exported "
        "once to $PROTOCLR_DATA_DIR (default ~/.cache/protoclr): 'digits' (scikit-learn's, bundled) or 'fmnist' "
        "(Fashion-MNIST: 60,000 train / 10,000 test images; see data.fmnist_src)",
    )
    root: str = _f(
        "",
        "training images: an ImageFolder (one sub-folder per class; labels are used only by evaluation) or a "
        "folder holding train/ and val/ (or test/) ImageFolders; '' = the bundled digits data (exported once); "
        "must be '' with a built-in data.dataset",
    )
    fmnist_src: str = _f(
        "",
        "folder of the Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] ...) or a torchvision root holding "
        "FashionMNIST/raw/; '' = search $PROTOCLR_FMNIST_DIR, /usr/share/datasets/fashion-mnist/ (apt-get install "
        "dataset-fashion-mnist), then $PROTOCLR_DATA_DIR/FashionMNIST/raw/",
    )
    download: bool = _f(False, "let torchvision download Fashion-MNIST when its IDX files are not found")
    subset: int = _f(
        0,
        "train on a seeded, class-stratified subset of this many training images; 0 = all (the held-out set is "
        "unaffected)",
    )
    val: str = _f(
        "",
        "held-out ImageFolder for the kNN monitor; '' = root/val or root/test when root holds train/, else a "
        "held-out share of root (data.holdout) that training never sees",
    )
    holdout: float = _f(0.1, "share of root held out for the kNN monitor when there is no val folder (0 = no monitor)")
    backend: str = _f("auto", "loader: 'dali' (GPU decode + augmentation), 'torch' (torchvision v2), 'auto'")
    num_workers: int = _f(2, "decoding processes per rank (torch loader) / DALI CPU threads")
    eval_batch_size: int = _f(256, "images per batch for feature extraction (clustering, kNN)")


@dataclass
class ModelConfig:
    """Encoder and heads (SPEC §1, §2)."""

    arch: str = _f("resnet18", "torchvision backbone: resnet18, resnet34 or resnet50")
    width: int = _f(64, "base width (channels of the first stage); 64 = torchvision's ResNet, smaller is faster")
    stem: str = _f(
        "auto",
        "'cifar' (3x3 conv, stride 1, no max-pool: small images), 'imagenet' (7x7/2 + max-pool), 'auto' "
        "(cifar when aug.image_size <= 64)",
    )
    proj_hidden: int = _f(0, "projector hidden width; 0 = the backbone's feature dim C (SPEC §2: Linear(C,C))")
    proj_dim: int = _f(128, "projector output dim Dz (z is L2-normalised in fp32)")
    sync_bn: bool = _f(True, "synchronise BatchNorm statistics across ranks under DDP (global-batch BN)")
    channels_last: bool = _f(True, "NHWC memory format (faster convolutions with tensor cores)")
    compile: bool = _f(False, "torch.compile the backbone (slower start, faster steps on a GPU)")


@dataclass
class LossConfig:
    """SPCL loss (SPEC §1.1-1.3)."""

    tau: float = _f(0.5, "temperature of the contrastive term")
    fn_mode: str = _f(
        "mask",
        "false negatives in L_con: 'mask' (same-prototype images leave the denominator; protoclr's default, see "
        "README 'Quality'), 'none' (SimCLR, the paper) or 'attract' (they become positives)",
    )
    balance: bool = _f(True, "siamese term: mean of the per-class (same / different) means instead of one mean")
    pairs: str = _f(
        "dense",
        "siamese pairs: 'dense' (every pair of the batch, SPEC 1.2) or 'paper' (per sampled image pair: its 2 "
        "same-image and 4 cross-image view pairs, the paper's sampling; one process only)",
    )
    lambda_con: float = _f(1.0, "weight of the contrastive term")
    lambda_sia: float = _f(1.0, "weight of the siamese metric term")
    lambda_proto: float = _f(
        0.0,
        "weight of the prototype classification term (the paper's code: 1.0; off by default: it cost 1.9-7.1 kNN "
        "points on Fashion-MNIST at every setting measured, README 'Quality')",
    )
    proto_init: str = _f(
        "random",
        "prototype classifier after each re-clustering: 'random' (nn.Linear's init, seeded) or 'zero' (CE starts "
        "at ln K and the term is active within a few steps; with 'random' and LARS it needs many steps per epoch)",
    )
    backend: str = _f("auto", "loss kernels: 'auto', 'reference', 'cpu', 'cuda' or 'triton' (see protoclr.ops)")


@dataclass
class ClusterConfig:
    """The per-epoch E-step (SPEC §1)."""

    k: int = _f(512, "number of prototypes K")
    pca_dim: int = _f(256, "PCA-whitening dim before k-means (capped at the feature dim)")
    iters: int = _f(20, "k-means iterations")
    recluster_every: int = _f(1, "re-cluster every this many epochs")
    start_epoch: int = _f(0, "first epoch that clusters; before it prototype ids are -1 (plain SimCLR + siamese)")
    source: str = _f(
        "kmeans",
        "prototypes: 'kmeans' (SPEC §1 E-step) or 'labels' (the class labels, fixed: an oracle for ablations; with "
        "loss.lambda_con=0 loss.lambda_sia=0 it is the supervised baseline; cluster.k must be the class count)",
    )
    features: str = _f(
        "pass",
        "what k-means clusters: 'pass' = a second forward pass over the training set with the eval transform at each "
        "E-step; 'bank' = the training forward's own pooled features (mean over the views), kept in an index-aligned "
        "bank during the epoch before each E-step, so no second pass (the first E-step, and one after a resume without "
        "the bank, still makes the pass). The bank cut the E-step from 17% to 0.5% of a Fashion-MNIST epoch but cost "
        "1.0 kNN point there (README 'E-step features')",
    )


@dataclass
class OptimConfig:
    """Optimiser and schedule (SPEC §2)."""

    name: str = _f("lars", "'lars' (SPEC §2) or 'sgd' (momentum SGD, same param groups)")
    base_lr: float = _f(1.0, "learning rate per 256 images: lr = base_lr * global batch / 256")
    final_lr: float = _f(0.0, "learning rate at the end of the cosine decay (absolute)")
    weight_decay: float = _f(1e-6, "weight decay; BatchNorm parameters and biases are exempt")
    momentum: float = _f(0.9, "momentum")
    eta: float = _f(0.001, "LARS trust coefficient; BatchNorm parameters and biases are not adapted")
    warmup_epochs: float = _f(10.0, "linear warm-up length in epochs, then cosine decay")
    clip_grad: float = _f(0.0, "clip the global gradient norm to this value; 0 = off")


@dataclass
class EvalConfig:
    """kNN monitor during training and the defaults of `python -m protoclr.eval`."""

    knn_k: int = _f(20, "neighbours of the weighted kNN classifier")
    knn_t: float = _f(0.07, "temperature of the kNN vote weights exp(sim / T)")
    knn_every: int = _f(1, "run the kNN monitor every this many epochs (and after the last); 0 = only at the end")
    baselines: bool = _f(
        True,
        "after training, also score raw pixels and the randomly initialised encoder with the same kNN on the same "
        "held-out images (is the run better than no learning?)",
    )
    linear_epochs: int = _f(100, "linear probe epochs (SPEC §2)")
    linear_lr: float = _f(0.1, "linear probe lr per 256 images (SGD Nesterov, cosine)")
    linear_batch_size: int = _f(256, "linear probe batch size")
    linear_wd: float = _f(0.0, "linear probe weight decay")


@dataclass
class Config:
    """Everything a training run needs; saved as config.yaml in --out and in every checkpoint."""

    out: str = _f("out/run", "output folder: checkpoints, config.yaml, train.log, metrics.jsonl/csv, TensorBoard")
    epochs: int = _f(200, "training epochs")
    batch_size: int = _f(512, "GLOBAL batch in images (each gives aug.views views); split evenly across ranks")
    max_steps: int = _f(0, "stop after this many optimisation steps in total (a checkpoint is written); 0 = no limit")
    resume: str = _f("", "'auto' = continue the latest checkpoint in --out (fresh start if none), or a path")
    device: str = _f("auto", "'auto' (CUDA when available), 'cpu' or 'cuda' (rank r uses cuda:LOCAL_RANK)")
    precision: str = _f("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32', 'bf16', 'fp16' or 'fp64' (CPU)")
    seed: int = _f(0, "seed of model init, sampler, augmentations and k-means")
    threads: int = _f(
        0,
        "torch CPU threads per process; 0 = auto: torch's default with CUDA, else the cores left per rank after "
        "data.num_workers (oversubscribed CPU threads make every op wait: 10x slower on a 2-core box)",
    )
    log_every: int = _f(10, "log a step line (and a metrics.jsonl line) every this many steps")
    ckpt_every: int = _f(0, "also write checkpoint.pth every this many steps (mid-epoch); 0 = only per epoch")
    keep_every: int = _f(0, "keep checkpoint{epoch:04}.pth every this many epochs; 0 = only the latest")
    tensorboard: bool = _f(True, "write TensorBoard scalars to --out/tb")
    progress: bool = _f(True, "tqdm progress bars on rank 0")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    aug: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "augmentations (SPEC §2)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"help": "clustering"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})

    def validate(self) -> None:
        """Raise ValueError naming the key when a value is out of range or inconsistent."""
        choices = {
            "data.backend": ("auto", "dali", "torch"),
            "data.dataset": BUILTIN_DATASETS,
            "model.arch": tuple(ARCHS),
            "model.stem": ("auto", "cifar", "imagenet"),
            "loss.fn_mode": FN_MODES,
            "loss.proto_init": ("random", "zero"),
            "loss.pairs": ("dense", "paper"),
            "cluster.source": ("kmeans", "labels"),
            "cluster.features": ("pass", "bank"),
            "loss.backend": ("auto", *BACKENDS),
            "optim.name": ("lars", "sgd"),
            "precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
        }
        flat = flatten(self)
        for key, allowed in choices.items():
            if flat[key] not in allowed:
                raise ValueError(f"config: {key} must be one of {list(allowed)}, got {flat[key]!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"config: device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        positive = [
            "epochs",
            "batch_size",
            "log_every",
            "model.width",
            "model.proj_dim",
            "cluster.k",
            "cluster.pca_dim",
            "cluster.iters",
            "cluster.recluster_every",
            "data.eval_batch_size",
            "eval.knn_k",
            "eval.linear_batch_size",
        ]
        for key in positive:
            if flat[key] < 1:
                raise ValueError(f"config: {key} must be >= 1, got {flat[key]!r}")
        nonneg = [
            "max_steps",
            "threads",
            "ckpt_every",
            "keep_every",
            "model.proj_hidden",
            "cluster.start_epoch",
            "data.num_workers",
            "data.subset",
            "eval.knn_every",
            "eval.linear_epochs",
            "optim.weight_decay",
            "optim.warmup_epochs",
            "optim.clip_grad",
            "optim.final_lr",
            "optim.eta",
            "optim.momentum",
        ]
        for key in nonneg:
            if flat[key] < 0:
                raise ValueError(f"config: {key} must be >= 0, got {flat[key]!r}")
        if self.data.dataset != "auto" and self.data.root:
            raise ValueError(
                f"config: data.root must be '' with data.dataset={self.data.dataset!r} (a built-in source, exported to "
                f"$PROTOCLR_DATA_DIR), got data.root={self.data.root!r}; set data.dataset=auto to train on that folder"
            )
        if not 0 <= self.data.holdout < 1:
            raise ValueError(f"config: data.holdout must be in [0, 1), got {self.data.holdout!r}")
        for key in ("loss.tau", "optim.base_lr", "eval.knn_t", "eval.linear_lr"):
            if flat[key] <= 0:
                raise ValueError(f"config: {key} must be > 0, got {flat[key]!r}")
        from .ops.checks import TAU_RANGE  # the ops' own bound, checked before any data is read

        if not TAU_RANGE[0] <= self.loss.tau <= TAU_RANGE[1]:
            raise ValueError(f"config: loss.tau must be in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], got {self.loss.tau!r}")
        if self.batch_size % 2:
            raise ValueError(f"config: batch_size must be even (the sampler draws image pairs), got {self.batch_size}")
        self.aug.validate()


ARCHS = {"resnet18": "BasicBlock", "resnet34": "BasicBlock", "resnet50": "Bottleneck"}
BUILTIN_DATASETS = ("auto", "digits", "fmnist")


def data_flag(value: str) -> dict[str, str]:
    """The overrides of a `--data` flag: a built-in source's name ('digits', 'fmnist') sets data.dataset, anything
    else is a folder (data.root, data.dataset=auto). A folder named like a source is passed as ./fmnist."""
    if value in BUILTIN_DATASETS[1:]:
        return {"data.dataset": value, "data.root": ""}
    return {"data.dataset": "auto", "data.root": value}


# ------------------------------------------------------------------------------------------- flat keys


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(obj_or_cls, prefix: str = ""):
    """(dotted key, field, type, owning dataclass instance or None) for every leaf field, in declaration order."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(typ):
            sub = getattr(obj_or_cls, f.name) if not isinstance(obj_or_cls, type) else typ
            yield from _fields(sub, key + ".")
        else:
            yield key, f, typ, (None if isinstance(obj_or_cls, type) else obj_or_cls)


def flatten(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every leaf field."""
    return {key: getattr(owner, f.name) for key, f, _, owner in _fields(cfg)}


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested dict of plain YAML/JSON types (tuples as lists)."""
    return _plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def _flatten_mapping(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            out.update(_flatten_mapping(v, key + "."))
        else:
            out[key] = v
    return out


def _type_name(typ) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _coerce(key: str, value: Any, typ, source: str) -> Any:
    """value checked against the field's type (int accepts no bool; float accepts int; tuple[...] takes a list of
    the right length); a str field takes any scalar as its text (e.g. `data.root=2024`)."""

    def bad():
        return ValueError(f"config ({source}): {key} must be {_type_name(typ)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(typ)
    if typ is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if typ is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` and `inf` as text
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):  # NaN passes every range check (nan < 0 is False); no setting means inf
            raise ValueError(f"config ({source}): {key} must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad()
        return value if isinstance(value, str) else str(value)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            raise bad()
        return tuple(_coerce(key, v, a, source) for v, a in zip(value, args))
    if origin in (types.UnionType, typing.Union):  # e.g. `int | None`
        for a in typing.get_args(typ):
            if a is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, a, source)
            except ValueError:
                pass
        raise bad()
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """Set dotted keys on cfg in place (type-checked); unknown key -> ValueError naming the closest key."""
    table = {key: (f, typ, owner) for key, f, typ, owner in _fields(cfg)}
    for key, value in overrides.items():
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.0)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"config ({source}): unknown key {key!r}{hint} (`python train.py --help` lists every key)")
        f, typ, owner = table[key]
        setattr(owner, f.name, _coerce(key, value, typ, source))
    return cfg


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans,
    which would turn aug.blur's 'on' (or a folder named 'no') into True."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Flat {dotted key: value} from a YAML preset (nested sections or dotted keys both work)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: --config file {str(path)!r} does not exist")
    data = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys, got {type(data).__name__}")
    return _flatten_mapping(data)


def parse_kv(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: YAML-parsed value} (`a.b=1e-3` -> 0.001, `x=[1,2]` -> [1, 2])."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"config: override {item!r} must look like key=value (e.g. optim.base_lr=0.5)")
        key, _, raw = item.partition("=")
        key = key.strip().lstrip("-")
        try:
            value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"config: cannot parse the value of {key!r}: {raw!r} ({e})") from None
        out[key] = value
    return out


def from_dict(d: dict[str, Any], source: str = "checkpoint") -> Config:
    """Config from a nested dict (a checkpoint's or config.yaml's), defaults for keys it lacks."""
    cfg = Config()
    apply_overrides(cfg, _flatten_mapping(d), source)
    cfg.aug.validate()
    return cfg


def help_text() -> str:
    """Every key with its type, default and help, grouped by section (the epilog of `train.py --help`)."""
    lines = []
    section = None
    for key, f, typ, owner in _fields(Config()):
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            title = Config.__dataclass_fields__[sec].metadata["help"] if sec else "run"
            lines.append(f"\n[{sec or 'top level'}] {title}")
        default = _plain(getattr(owner, f.name))
        lines.append(f"  {key}={default!r}  ({_type_name(typ)})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# The preset `train.py` uses without --config (the bundled digits data, CPU-friendly).
DEFAULT_PRESET = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def resolve(preset: str | Path | None, named: dict[str, Any], overrides: list[str]) -> Config:
    """defaults < preset YAML < named flags (None = not given) < key=value overrides; validated."""
    cfg = Config()
    if preset:
        apply_overrides(cfg, load_yaml(preset), str(preset))
    apply_overrides(cfg, {k: v for k, v in named.items() if v is not None}, "command-line flags")
    apply_overrides(cfg, parse_kv(overrides), "key=value overrides")
    cfg.validate()
    return cfg
