"""One augmentation config for both loaders (SPEC §2), and the parameter logic they share.

`AugmentConfig` holds every knob of the SimCLR-style view transform. The DALI pipeline (`dali.py`) and the
torchvision v2 fallback (`torch_loader.py`) both read it through the helpers below, so a derived value (blur on or
off, blur kernel size, small-crop size, eval resize) is decided once. Both loaders sample the same distributions:

view = random resized crop (scale, ratio) → horizontal flip (flip_p) → colour jitter (brightness, contrast,
saturation, hue; applied with jitter_p) → grayscale (grayscale_p) → Gaussian blur (sigma ~ U(blur_sigma), kernel
≈ 10% of the side, applied with blur_p; large crops only) → normalise (mean, std).

Jitter factors follow torchvision's ColorJitter: brightness, contrast and saturation factors are drawn from
U[max(0, 1 - s), 1 + s], hue from U[-h, h] (fraction of the colour circle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# ImageNet statistics: the usual choice for natural images and a harmless one for the digits data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Augmentations of the training views (SPEC §2 defaults). Lists are accepted for tuple fields (YAML)."""

    image_size: int = field(default=32, metadata={"help": "side of the large (global) crops, in pixels"})
    views: int = field(default=2, metadata={"help": "large views per image (V); SPEC's default is 2"})
    eval_size: int = field(
        default=0,
        metadata={
            "help": "side of the eval centre crop (kNN, linear probe, the E-step's pass); 0 = image_size. Below the "
            "native size training is cheaper, and random-resized crops enlarge objects, so training smaller than "
            "the eval size matches their apparent size (FixRes, Touvron et al. 2019)"
        },
    )
    crop_scale: tuple[float, float] = field(
        default=(0.08, 1.0), metadata={"help": "random resized crop: range of the crop's area share of the image"}
    )
    crop_ratio: tuple[float, float] = field(
        default=(3 / 4, 4 / 3), metadata={"help": "random resized crop: range of the crop's aspect ratio (w/h)"}
    )
    flip_p: float = field(default=0.5, metadata={"help": "probability of a horizontal flip"})
    jitter: tuple[float, float, float, float] = field(
        default=(0.8, 0.8, 0.8, 0.2),
        metadata={"help": "colour jitter strength (brightness, contrast, saturation, hue) as in torchvision"},
    )
    jitter_p: float = field(default=0.8, metadata={"help": "probability of applying colour jitter to a view"})
    grayscale_p: float = field(default=0.2, metadata={"help": "probability of converting a view to grayscale"})
    blur: str = field(
        default="auto",
        metadata={
            "help": "Gaussian blur: 'auto' (on when image_size > 32, the paper skips it for 32-px data), 'on', 'off'"
        },
    )
    blur_p: float = field(default=0.5, metadata={"help": "probability of blurring a large view"})
    blur_sigma: tuple[float, float] = field(
        default=(0.1, 2.0), metadata={"help": "range of the blur's standard deviation, in pixels"}
    )
    mean: tuple[float, float, float] = field(
        default=IMAGENET_MEAN, metadata={"help": "per-channel mean subtracted after scaling pixels to [0, 1]"}
    )
    std: tuple[float, float, float] = field(
        default=IMAGENET_STD, metadata={"help": "per-channel std divided out after subtracting the mean"}
    )
    n_small_crops: int = field(
        default=0, metadata={"help": "multi-crop: extra small views per image (SwAV's 2 large + n small); 0 = off"}
    )
    small_size: int = field(
        default=0, metadata={"help": "side of the small crops; 0 = round(image_size * 96 / 224), at least 8"}
    )
    small_scale: tuple[float, float] = field(
        default=(0.05, 0.14), metadata={"help": "random resized crop scale range of the small crops"}
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"AugmentConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise bad("image_size", "a positive int")
        if not isinstance(self.eval_size, int) or self.eval_size < 0:
            raise bad("eval_size", "an int >= 0 (0 = image_size)")
        if not isinstance(self.views, int) or self.views < 1:
            raise bad("views", "a positive int")
        if not isinstance(self.n_small_crops, int) or self.n_small_crops < 0:
            raise bad("n_small_crops", "an int >= 0")
        if not isinstance(self.small_size, int) or self.small_size < 0:
            raise bad("small_size", "an int >= 0 (0 = derived from image_size)")
        for name in ("crop_scale", "small_scale"):
            lo, hi = _pair(self, name, 2)
            if not 0 < lo <= hi <= 1:
                raise bad(name, "(lo, hi) with 0 < lo <= hi <= 1")
        lo, hi = _pair(self, "crop_ratio", 2)
        if not 0 < lo <= hi:
            raise bad("crop_ratio", "(lo, hi) with 0 < lo <= hi")
        lo, hi = _pair(self, "blur_sigma", 2)
        if not 0 < lo <= hi:
            raise bad("blur_sigma", "(lo, hi) with 0 < lo <= hi")
        b, c, s, h = _pair(self, "jitter", 4)
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise bad("jitter", "(brightness, contrast, saturation >= 0, hue in [0, 0.5])")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise bad(name, "a probability in [0, 1]")
        if self.blur not in ("auto", "on", "off"):
            raise bad("blur", "'auto', 'on' or 'off'")
        _pair(self, "mean", 3)
        if min(_pair(self, "std", 3)) <= 0:
            raise bad("std", "three positive numbers")

    # ---- derived values, decided once for both loaders ----
    @property
    def blur_enabled(self) -> bool:
        """Whether large views are blurred at all (SPEC §2: not for 32-px data)."""
        return self.blur == "on" or (self.blur == "auto" and self.image_size > 32)

    @property
    def small_size_resolved(self) -> int:
        """Side of the small crops (SwAV uses 96 px next to 224 px)."""
        return self.small_size or max(8, round(self.image_size * 96 / 224))

    @property
    def eval_size_resolved(self) -> int:
        """Side of the eval centre crop."""
        return self.eval_size or self.image_size

    @property
    def num_views(self) -> int:
        """Views per image the loaders return: V large then n_small_crops small."""
        return self.views + self.n_small_crops

    def jitter_ranges(
        self,
    ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]:
        """(brightness, contrast, saturation, hue) sampling ranges as torchvision's ColorJitter draws them."""
        b, c, s, h = self.jitter
        return (max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)

    def view_specs(self) -> list[ViewSpec]:
        """One entry per returned view, in output order."""
        large = ViewSpec(self.image_size, self.crop_scale, self.blur_enabled)
        small = ViewSpec(self.small_size_resolved, self.small_scale, False)
        return [large] * self.views + [small] * self.n_small_crops


@dataclass(frozen=True)
class ViewSpec:
    """Geometry of one view: output side, crop scale range, and whether it may be blurred."""

    size: int
    scale: tuple[float, float]
    blur: bool


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel side ≈ 10% of the image side, as SimCLR (23 px at 224 px), at least 3."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def eval_resize_size(image_size: int) -> int:
    """Shorter-side resize before the eval centre crop: the 0.875 crop ratio of ImageNet above 32 px; none below
    (small images such as CIFAR or the digits are evaluated whole)."""
    return image_size if image_size <= 32 else round(image_size / 0.875)


def _pair(cfg: AugmentConfig, name: str, n: int) -> tuple:
    value = getattr(cfg, name)
    if not isinstance(value, tuple) or len(value) != n or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"AugmentConfig: {name} must be {n} numbers, got {value!r}")
    return value
