"""DRAEM-style pseudo-anomalies for AAND's Stage I: Perlin-noise masks filled with foreign textures.

Follows AAND's ``datasets/database.py`` (itself DRAEM's recipe, Zavrtanik et al., ICCV 2021):

- mask: Perlin noise with 2^U{0..5} lattice cells per axis, rotated by U(−90°, 90°), thresholded at 0.5, ANDed with
  the image's foreground mask (redrawn up to 10 times when empty);
- source: a random crop of a foreign image, resized to the image size, changed by 3 of AAND's 10 imgaug operations,
  drawn without replacement: GammaContrast, MultiplyAndAddToBrightness (× and + as one operation), EnhanceSharpness,
  AddToHueAndSaturation, Solarize (itself applied with probability 0.5, ``iaa.Solarize(0.5, ...)``), Posterize,
  Invert, Autocontrast, Equalize, Affine rotate;
- blend: ``x·(1 − M) + (1 − β)·src·M + β·x·M`` with β ~ U(0, 0.8); a fraction (20 %) of images stays clean.

What differs from the test defects (``adcore.data.defects``), so that no method trains on what it is tested on:
the foreign textures here come only from :data:`FOREIGN_SOURCES` (scikit-image photographs that the test defects never
use; checked against ``adcore.data.defects.TEST_DEFECT_SOURCES`` at import) and from procedural patterns (stripes,
checkers, coloured noise); the DTD images of the paper are not available offline. The only defect family is the
Perlin-masked texture blend: no scratches, holes or blotches.

Foreground masks follow AAND's ``scripts/fore_extractor.py``: grey image, Gaussian blur of σ = 8 px at the image's
*native* resolution (the script runs on the original files; here σ is scaled to the model's input,
σ = 8·S/native), then a fixed threshold per category group (:data:`MVTEC_FOREGROUND`); textures use the whole image.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from scipy.ndimage import gaussian_filter, rotate

from adcore.data.defects import TEST_DEFECT_SOURCES

__all__ = ["FOREIGN_SOURCES", "MVTEC_FOREGROUND", "PseudoAnomalySynthesizer", "foreground_mask", "perlin_mask",
           "perlin_noise"]

#: scikit-image photographs used as foreign textures (bundled with the package, no download).
FOREIGN_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera")
#: Procedural texture families drawn alongside the photographs.
PROCEDURAL_SOURCES = ("stripes", "checker", "noise")

_overlap = set(FOREIGN_SOURCES) & set(TEST_DEFECT_SOURCES)
if _overlap:  # a guard, not a branch: the two lists are maintained in different files
    raise ImportError(f"pseudo-anomaly sources {sorted(_overlap)} are also test-defect sources; they must be disjoint")

#: AAND's foreground rule per MVTec AD category: ("all" | "bright" | "dark" | "disk", grey threshold in 0..255).
#: AAND's list puts cable with bottle (the centred disk); its ``'cabel'`` typo made the script skip cable, which then
#: silently re-saved the previous class's mask. Cable gets the disk the list intended.
MVTEC_FOREGROUND = {
    **{c: ("all", 0) for c in ("carpet", "grid", "leather", "tile", "wood", "transistor")},
    **{c: ("dark", 150) for c in ("capsule", "screw", "zipper")},
    **{c: ("bright", 50) for c in ("hazelnut", "metal_nut", "pill", "toothbrush")},
    **{c: ("disk", 0) for c in ("bottle", "cable")},
}


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` lattice cells per axis: (H, W) float, roughly in [−1, 1].

    Random unit gradients sit on the (res+1)² lattice corners; each pixel blends the dot products of its cell's four
    corner gradients with its offsets, weighted by the quintic fade 6t⁵ − 15t⁴ + 10t³.
    """
    h, w = shape
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (res0+1, res1+1, 2)
    y = (np.arange(h) + 0.5) * res[0] / h
    x = (np.arange(w) + 0.5) * res[1] / w
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]  # (H, 1), (1, W): offsets inside the cell

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[iy + dy][:, ix + dx]  # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return math.sqrt(2) * (top * (1 - u) + bottom * u)


def perlin_mask(size: int, rng: np.random.Generator, threshold: float = 0.5, max_scale_exp: int = 5) -> np.ndarray:
    """A DRAEM mask (S, S) bool: Perlin noise with 2^U{0..max_scale_exp} cells per axis, rotated ±90°, > threshold."""
    res = (2 ** int(rng.integers(0, max_scale_exp + 1)), 2 ** int(rng.integers(0, max_scale_exp + 1)))
    noise = perlin_noise((size, size), res, rng)
    noise = rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="reflect")
    return noise > threshold


def foreground_mask(images: torch.Tensor, mode: str = "all", threshold: float = 0,
                    native_size: int | None = None) -> torch.Tensor:
    """AAND's foreground rule for (B, 3, S, S) images in [0, 1] → (B, S, S) bool.

    ``"all"``: every pixel; ``"bright"``: blurred grey > threshold; ``"dark"``: blurred grey < threshold (the repo's
    "inverted > t" on 255 − grey); ``"disk"``: a centred disk of radius 0.45·S. ``threshold`` is in grey levels
    0..255. The blur is AAND's σ = 8 px at the images' native side ``native_size`` (None: S), i.e. σ = 8·S/native
    at the input's resolution: blurring the original and then resizing equals resizing and then blurring with the
    scaled σ, up to the resize's own smoothing.
    """
    b, _, h, w = images.shape
    if mode == "all":
        return torch.ones(b, h, w, dtype=torch.bool, device=images.device)
    if mode == "disk":
        yy, xx = torch.meshgrid(torch.arange(h, device=images.device), torch.arange(w, device=images.device),
                                indexing="ij")
        disk = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) <= (0.45 * h) ** 2
        return disk.expand(b, h, w).clone()
    if mode not in ("bright", "dark"):
        raise ValueError(f"foreground mode must be 'all', 'bright', 'dark' or 'disk', got {mode!r}")
    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device)  # PIL's "L" conversion, which AAND uses
    grey = (torch.einsum("bchw,c->bhw", images.detach().float(), luma) * 255).cpu().numpy()
    sigma = 8 * h / (native_size or h)
    blurred = torch.from_numpy(np.stack([gaussian_filter(g, sigma) for g in grey])).to(images.device)
    return blurred > threshold if mode == "bright" else blurred < threshold


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[torch.Tensor, ...]:
    """The foreign photographs as (3, H, W) uint8 tensors, loaded once."""
    import skimage.data

    out = []
    for name in FOREIGN_SOURCES:
        img = np.asarray(getattr(skimage.data, name)())
        img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous())
    return tuple(out)


def _procedural(kind: str, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random procedural texture: (3, S, S) uint8."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    c1, c2 = rng.random(3), rng.random(3)
    if kind == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(3, size / 4)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    elif kind == "checker":
        period = int(rng.integers(3, max(size // 8, 4)))
        t = ((xx // period + yy // period) % 2).astype(float)
    else:  # coloured multi-octave Perlin noise
        t = sum(perlin_noise((size, size), (2 ** k, 2 ** k), rng) / 2 ** (k - 1) for k in range(1, 5))
        t = (t - t.min()) / (np.ptp(t) + 1e-8)
    img = c1[:, None, None] * t[None] + c2[:, None, None] * (1 - t[None])
    return torch.from_numpy((img * 255).round().astype(np.uint8))


def _add(x: torch.Tensor, value: int) -> torch.Tensor:
    return (x.int() + value).clamp(0, 255).to(torch.uint8)


def _operations(rng: np.random.Generator, kind: str) -> list:
    """The colour and geometry operations on a (3, S, S) uint8 tensor, each drawing its own magnitudes from ``rng``.

    ``"aand"``: AAND's ten (``datasets/database.py``). ``"validation"``: the eleven the held-out validation sets
    (:mod:`adcore.validation`) were drawn with when their stored curves were made (brightness × and + apart, solarize
    always); kept so that those curves stay reproducible to the digit.
    """
    gamma = lambda x: TF.adjust_gamma(x, float(rng.uniform(0.5, 2.0)))  # noqa: E731
    sharpness = lambda x: TF.adjust_sharpness(x, float(rng.uniform(0.0, 2.0)))  # noqa: E731
    hue_sat = lambda x: TF.adjust_saturation(TF.adjust_hue(x, float(rng.uniform(-0.14, 0.14))),  # noqa: E731
                                             float(rng.uniform(0.5, 1.5)))
    posterize = lambda x: TF.posterize(x, int(rng.integers(4, 8)))  # noqa: E731
    rotate = lambda x: TF.rotate(x, float(rng.uniform(-45, 45)))  # noqa: E731
    if kind == "validation":
        return [gamma, lambda x: TF.adjust_brightness(x, float(rng.uniform(0.8, 1.2))),
                lambda x: _add(x, int(rng.integers(-30, 31))), sharpness, hue_sat,
                lambda x: TF.solarize(x, int(rng.integers(32, 128))), posterize, TF.invert, TF.autocontrast,
                TF.equalize, rotate]
    if kind != "aand":
        raise ValueError(f"operations must be 'aand' or 'validation', got {kind!r}")
    return [gamma,
            lambda x: _add(TF.adjust_brightness(x, float(rng.uniform(0.8, 1.2))), int(rng.integers(-30, 31))),
            sharpness, hue_sat,
            lambda x: TF.solarize(x, int(rng.integers(32, 128))) if rng.random() < 0.5 else x,
            posterize, TF.invert, TF.autocontrast, TF.equalize, rotate]


def _augment(src: torch.Tensor, rng: np.random.Generator, kind: str = "aand") -> torch.Tensor:
    """Three of the ``kind`` operations (:func:`_operations`), drawn without replacement, on a (3, S, S) uint8 tensor."""
    ops = _operations(rng, kind)
    for i in rng.choice(len(ops), size=3, replace=False):
        src = ops[i](src)
    return src


class PseudoAnomalySynthesizer:
    """Turns a batch of normal images into pseudo-anomalous ones with pixel masks.

    Args:
        clean_prob: fraction of images left unchanged (AAND: 0.2).
        beta_max: the blend keeps β ~ U(0, beta_max) of the original inside the mask (AAND: 0.8).
        threshold: Perlin-noise threshold (AAND/DRAEM: 0.5).
        procedural_prob: chance a source is a procedural texture instead of a photograph.
        max_tries: redraws of a mask that misses the foreground before the image is left clean (AAND: 10).
        operations: ``"aand"``, AAND's ten colour and geometry operations, or ``"validation"``, the eleven that the
            stored validation curves' held-out sets were drawn with (:func:`_operations`).

    Random draws use torch's global generator (one seed per call), so ``adcore.fit``'s seeding and resume cover them.
    """

    def __init__(self, clean_prob: float = 0.2, beta_max: float = 0.8, threshold: float = 0.5,
                 procedural_prob: float = 0.3, max_tries: int = 10, operations: str = "aand"):
        for name, value in [("clean_prob", clean_prob), ("beta_max", beta_max), ("procedural_prob", procedural_prob)]:
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        self.clean_prob, self.beta_max, self.threshold = clean_prob, beta_max, threshold
        self.procedural_prob, self.max_tries = procedural_prob, max_tries
        _operations(np.random.default_rng(0), operations)  # raises on an unknown kind
        self.operations = operations

    def source(self, size: int, rng: np.random.Generator) -> torch.Tensor:
        """One augmented foreign texture: (3, S, S) float in [0, 1]."""
        if rng.random() < self.procedural_prob:
            src = _procedural(PROCEDURAL_SOURCES[int(rng.integers(len(PROCEDURAL_SOURCES)))], size, rng)
        else:
            photo = _photographs()[int(rng.integers(len(FOREIGN_SOURCES)))]
            h, w = photo.shape[-2:]
            side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            src = TF.resize(photo[:, top:top + side, left:left + side], [size, size], antialias=True)
        return _augment(src, rng, self.operations).float() / 255

    def __call__(self, images: torch.Tensor, foreground: torch.Tensor | None = None):
        """Pseudo-anomalous copies of ``images``.

        Args:
            images: (B, 3, S, S) float in [0, 1].
            foreground: (B, S, S) bool; the masks stay inside it (default: everywhere).

        Returns:
            ``(images, masks)``: (B, 3, S, S) float and (B, S, S) float {0, 1}.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        b, _, s, _ = images.shape
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        out, masks = images.clone(), torch.zeros(b, s, s, device=images.device)
        fg = None if foreground is None else foreground.bool().cpu().numpy()
        for i in range(b):
            if rng.random() < self.clean_prob:
                continue
            for _ in range(self.max_tries):
                m = perlin_mask(s, rng, self.threshold)
                if fg is not None:
                    m &= fg[i]
                if m.any():
                    break
            else:
                continue
            mask = torch.from_numpy(m.astype(np.float32)).to(images.device)
            src = self.source(s, rng).to(images.device)
            beta = float(rng.uniform(0, self.beta_max))
            out[i] = images[i] * (1 - mask) + ((1 - beta) * src + beta * images[i]) * mask
            masks[i] = mask
        return out.clamp(0, 1), masks
