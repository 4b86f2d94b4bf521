"""Strong batch augmentation on device tensors: RandAugment and AutoAugment (CIFAR-10 policy), vectorised.

`data.augment` picks a policy (`crop_flip`: nothing beyond the loader's crop and flip; `randaugment`;
`autoaugment`); it runs on the float [0, 1] NCHW batch before the random crop and flip, as in AT-BSL's
torchvision pipeline (policy, then RandomCrop(32, 4), then RandomHorizontalFlip).

Every random draw (which op, sign, probability, cutout position) comes from the loader's CPU generator, so a
batch depends only on the seed and the generator state, whatever the device. The ops are those of
torchvision's RandAugment / AutoAugment with the same magnitude ranges (`MAX`), written for float tensors:
each op runs once on the sub-batch of images that drew it (an index, no per-image Python).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Registry

AUGMENTS = Registry("augment")

# ---------------------------------------------------------------- ops: (x float NCHW in [0, 1], m (n,) signed magnitude)


def _blend(img, other, factor):
    """factor * img + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    return (factor.view(-1, 1, 1, 1) * img + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0.0, 1.0)


def grayscale(x):
    if x.shape[1] != 3:
        return x[:, :1]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def brightness(x, m, g=None):
    return _blend(x, torch.zeros_like(x), 1 + m)


def color(x, m, g=None):
    return _blend(x, grayscale(x), 1 + m)


def contrast(x, m, g=None):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), 1 + m)


def sharpness(x, m, g=None):
    """Blend with the 3x3 smoothed image ([[1,1,1],[1,5,1],[1,1,1]] / 13); border pixels stay."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, 1 + m)


def posterize(x, m, g=None):
    """Keep the top `bits` bits of each 8-bit value; m holds the bits (1..8)."""
    q = (2.0 ** (8 - m.round())).view(-1, 1, 1, 1)
    return torch.floor(torch.round(x * 255) / q) * q / 255


def solarize(x, m, g=None):
    """Invert the pixels at or above the threshold m (in [0, 1])."""
    return torch.where(x >= m.view(-1, 1, 1, 1), 1.0 - x, x)


def invert(x, m=None, g=None):
    return 1.0 - x


def identity(x, m=None, g=None):
    return x


def autocontrast(x, m=None, g=None):
    """Stretch each channel of each image to [0, 1]; constant channels stay."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp(0.0, 1.0)


def equalize(x, m=None, g=None):
    """Histogram equalisation of each channel of each image on 256 levels (PIL's / torchvision's lookup table)."""
    n, c, h, w = x.shape
    v = torch.round(x * 255).long().clamp(0, 255).flatten(2)                       # (n, c, hw)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, v, torch.ones_like(v))
    levels = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)               # last non-empty level
    step = torch.div(h * w - hist.gather(2, last), 255, rounding_mode="floor")   # (n, c, 1)
    safe = step.clamp_min(1)
    lut = torch.div(hist.cumsum(2) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[..., :-1].clamp(0, 255)
    out = lut.gather(2, v).view(n, c, h, w).to(x.dtype) / 255
    return torch.where((step > 0).view(n, c, 1, 1), out, x)


def _warp(x, theta):
    """Nearest-neighbour resampling with the per-image (n, 2, 3) map from output to input coordinates
    (normalised to [-1, 1]); outside the image is black, as torchvision's default fill."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _theta(n, x):
    return torch.eye(2, 3, dtype=torch.float32, device=x.device).repeat(n, 1, 1)


def shear_x(x, m, g=None):
    """x_in = x_out + m * (y_out - top): shear about the top-left corner (torchvision's centre [0, 0])."""
    h, w = x.shape[-2:]
    theta = _theta(len(x), x)
    theta[:, 0, 1] = m * h / w
    theta[:, 0, 2] = m * h / w
    return _warp(x, theta)


def shear_y(x, m, g=None):
    h, w = x.shape[-2:]
    theta = _theta(len(x), x)
    theta[:, 1, 0] = m * w / h
    theta[:, 1, 2] = m * w / h
    return _warp(x, theta)


def translate_x(x, m, g=None):
    """Shift by m whole pixels (truncated like torchvision's int(magnitude))."""
    theta = _theta(len(x), x)
    theta[:, 0, 2] = -2 * torch.trunc(m) / x.shape[-1]
    return _warp(x, theta)


def translate_y(x, m, g=None):
    theta = _theta(len(x), x)
    theta[:, 1, 2] = -2 * torch.trunc(m) / x.shape[-2]
    return _warp(x, theta)


def rotate(x, m, g=None):
    """Rotate by m degrees about the image centre."""
    h, w = x.shape[-2:]
    a = m * math.pi / 180
    cos, sin = torch.cos(a), torch.sin(a)
    theta = _theta(len(x), x)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    return _warp(x, theta)


def cutout(x, m, g=None):
    """Zero a square of side m pixels centred at a random position (clipped at the border; DeVries & Taylor)."""
    n, _, h, w = x.shape
    cy = (torch.rand(n, generator=g) * h).long().to(x.device)
    cx = (torch.rand(n, generator=g) * w).long().to(x.device)
    half = (m.round().long() // 2).view(-1, 1)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    inside_r = (rows >= cy[:, None] - half) & (rows < cy[:, None] - half + m.round().long().view(-1, 1))
    inside_c = (cols >= cx[:, None] - half) & (cols < cx[:, None] - half + m.round().long().view(-1, 1))
    hole = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]
    return x.masked_fill(hole, 0.0)


# name: (function, largest magnitude as a function of image size (h, w) or None, signed)
OPS = {
    "identity": (identity, None, False),
    "shear_x": (shear_x, lambda h, w: 0.3, True),
    "shear_y": (shear_y, lambda h, w: 0.3, True),
    "translate_x": (translate_x, lambda h, w: 150.0 / 331.0 * w, True),
    "translate_y": (translate_y, lambda h, w: 150.0 / 331.0 * h, True),
    "rotate": (rotate, lambda h, w: 30.0, True),
    "brightness": (brightness, lambda h, w: 0.9, True),
    "color": (color, lambda h, w: 0.9, True),
    "contrast": (contrast, lambda h, w: 0.9, True),
    "sharpness": (sharpness, lambda h, w: 0.9, True),
    "posterize": (posterize, None, False),      # bits = 8 - round(4 * strength)
    "solarize": (solarize, None, False),        # threshold = 1 - strength
    "autocontrast": (autocontrast, None, False),
    "equalize": (equalize, None, False),
    "invert": (invert, None, False),
    "cutout": (cutout, lambda h, w: 0.5 * min(h, w), False),
}
OP_NAMES = list(OPS)
RANDAUGMENT_OPS = ["identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                   "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize"]


def op_magnitude(name: str, strength: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The op's magnitude at `strength` in [0, 1] (torchvision's bin / (bins - 1)), before the sign."""
    if name == "posterize":
        return 8 - torch.round(4 * strength)
    if name == "solarize":
        return 1.0 - strength
    largest = OPS[name][1]
    return strength * (largest(h, w) if largest else 0.0)


def apply_ops(x: torch.Tensor, op: torch.Tensor, strength: torch.Tensor, negate: torch.Tensor,
              generator: torch.Generator, names: list[str]) -> torch.Tensor:
    """Image i gets op names[op[i]] (op[i] < 0: none) at strength[i], negated where negate[i] and the op is
    signed. op, strength and negate are CPU tensors drawn from `generator`; one call per op on its sub-batch."""
    h, w = x.shape[-2:]
    out = x
    for k in torch.unique(op[op >= 0]).tolist():
        name = names[k]
        fn, _, signed = OPS[name]
        sel = (op == k).nonzero().flatten()
        m = op_magnitude(name, strength[sel].float(), h, w)
        if signed:
            m = torch.where(negate[sel], -m, m)
        if out is x:
            out = x.clone()
        idx = sel.to(x.device)
        out[idx] = fn(out[idx], m.to(x.device), generator).to(x.dtype)
    return out


# ---------------------------------------------------------------- policies


class RandAugment:
    """RandAugment (Cubuk et al. 2020) as torchvision's: each image gets `num_ops` ops drawn uniformly from
    `ops`, each at magnitude `magnitude` of `num_bins - 1` (AT-BSL-RA: 2 ops, magnitude 8 of 30) with a
    random sign for the signed ops. Different images of a batch draw different ops."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31, ops: list[str] | None = None):
        ops = list(ops or RANDAUGMENT_OPS)
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"data.augment_args.ops: unknown op(s) {unknown}; known: {', '.join(OP_NAMES)}")
        if not 0 <= magnitude < num_bins:
            raise ValueError(f"data.augment_args.magnitude must be in [0, {num_bins - 1}]; got {magnitude}")
        if num_ops < 0:
            raise ValueError(f"data.augment_args.num_ops must be >= 0; got {num_ops}")
        self.num_ops, self.ops = num_ops, ops
        self.strength = magnitude / (num_bins - 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        for _ in range(self.num_ops):
            op = torch.randint(len(self.ops), (n,), generator=generator)
            negate = torch.randint(2, (n,), generator=generator).bool()
            x = apply_ops(x, op, torch.full((n,), self.strength), negate, generator, self.ops)
        return x


# torchvision's AutoAugmentPolicy.CIFAR10 (Cubuk et al. 2019): (op, probability, magnitude bin of 10 or None)
CIFAR10_POLICY = [
    (("invert", 0.1, None), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.5, None), ("equalize", 0.9, None)),
    (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, None), ("equalize", 0.5, None)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)),
    (("equalize", 0.3, None), ("autocontrast", 0.4, None)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, None)),
    (("equalize", 0.2, None), ("autocontrast", 0.6, None)),
    (("equalize", 0.2, None), ("equalize", 0.6, None)),
    (("color", 0.9, 9), ("equalize", 0.6, None)),
    (("autocontrast", 0.8, None), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, None)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.9, None), ("solarize", 0.8, 3)),
    (("equalize", 0.8, None), ("invert", 0.1, None)),
    (("translate_y", 0.7, 9), ("autocontrast", 0.9, None)),
]


class AutoAugment:
    """AutoAugment's learned CIFAR-10 policy (AT-BSL-AuA): each image draws one of 25 sub-policies and applies
    its two ops, each with its probability, at its magnitude bin of 10, signed ops with a random sign."""

    def __init__(self, policy: str = "cifar10"):
        if policy != "cifar10":
            raise ValueError(f"data.augment_args.policy: only 'cifar10' is implemented; got '{policy}'")
        names = [[s[0] for s in sub] for sub in CIFAR10_POLICY]
        self.op = torch.tensor([[OP_NAMES.index(n) for n in pair] for pair in names])
        self.prob = torch.tensor([[s[1] for s in sub] for sub in CIFAR10_POLICY])
        self.strength = torch.tensor([[(s[2] or 0) / 9 for s in sub] for sub in CIFAR10_POLICY])

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        which = torch.randint(len(self.op), (n,), generator=generator)
        draws = torch.rand(n, 2, generator=generator)
        negate = torch.randint(2, (n, 2), generator=generator).bool()
        for slot in range(2):
            op = torch.where(draws[:, slot] <= self.prob[which, slot], self.op[which, slot], -1)
            x = apply_ops(x, op, self.strength[which, slot], negate[:, slot], generator, OP_NAMES)
        return x


@AUGMENTS.register("crop_flip")
def crop_flip():
    """Only the loader's random crop (data.crop_padding) and flip (data.flip): no extra op, no extra draw."""
    return None


@AUGMENTS.register("randaugment")
def randaugment(num_ops: int = 2, magnitude: int = 9, num_bins: int = 31, ops: list | None = None):
    return RandAugment(num_ops, magnitude, num_bins, ops)


@AUGMENTS.register("autoaugment")
def autoaugment(policy: str = "cifar10"):
    return AutoAugment(policy)


def build_augment(name: str = "crop_flip", args: dict | None = None):
    """The batch augmentation `callable(x, generator) -> x` of data.augment, or None for crop_flip."""
    try:
        return AUGMENTS.build(name, args, "data.augment_args")
    except ValueError as err:
        from ..registry import ConfigError

        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
