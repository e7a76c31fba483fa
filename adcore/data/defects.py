"""The TEST-defect synthesiser of the embedded ``textures`` benchmark: four defect families with pixel-exact masks.

This module makes the *ground-truth anomalies that methods are evaluated on*. It is deliberately separate from any
pseudo-anomaly generator a method trains with (AAND's Stage I, DRAEM-style Perlin pasting of foreign textures,
lives with that model). The two differ in purpose and must stay disjoint in content:

- here, defects are drawn once, with a fixed seed, into the benchmark's ``test/`` folder; no training code may import
  the family functions below;
- foreign textures here come only from :data:`TEST_DEFECT_SOURCES` (the three benchmark photographs themselves plus
  ``moon`` and ``text``); a training-time generator must draw its textures from other images (for example
  ``skimage.data.camera``, ``coins``, ``astronaut``, ``coffee``, ``chelsea``, ``rocket``), so that no method has seen
  the test defects' textures during training;
- three of the four families (scratch, hole, blotch) are not texture pastes at all, so a method trained on pasted
  textures is also tested on defect types it never synthesised.

Every family returns the defective image and a boolean mask; pixels outside the mask are left bit-identical, and the
mask covers :data:`COVERAGE_RANGE` of the image (checked by :func:`synthesise`). Strength ranges, chosen so that a
defect is clearly visible to a person at 128² but sits inside the texture's own intensity range (not trivial):

- ``foreign_texture``: a crop of another photo, re-normalised to the host's mean and std (so only the *texture*
  differs, not the brightness), blended with weight β ∈ [0.6, 0.95] through a thresholded Perlin-noise mask.
- ``scratch``: a curved (cubic Bézier) line 2–3 px thick, blended towards near-white or near-black with weight
  a ∈ [0.6, 0.9].
- ``hole``: a smooth-edged ellipse perturbed by low-frequency Perlin noise, darkened towards 0.02–0.12 with weight
  0.5–0.85 in the interior, ramping to half that at the rim over 3 px.
- ``blotch``: a Perlin-shaped smooth blob whose intensity is moved by a fraction γ ∈ [0.25, 0.45] of the available
  range (brighter or darker), ramping to half strength at the rim over 6 px. Intensity only: the photographs are
  grey, and a colour tint would be detectable from channel inequality alone, which would make the family trivial.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import morphology

DEFECT_FAMILIES = ("foreign_texture", "scratch", "hole", "blotch")
#: skimage.data images the test defects draw foreign textures from; a training-time pseudo-anomaly generator must not.
TEST_DEFECT_SOURCES = ("brick", "grass", "gravel", "moon", "text")
#: Fraction of the image a defect mask may cover (inclusive bounds).
COVERAGE_RANGE = (0.005, 0.15)
MIN_ISLAND = 20  # px: foreign-texture mask components this small or smaller are dropped before blending


def load_sources(names=TEST_DEFECT_SOURCES) -> dict[str, np.ndarray]:
    """The foreign-texture photos as float (H, W) grey arrays in [0, 1] (all bundled with scikit-image)."""
    from skimage import data

    return {n: np.asarray(getattr(data, n)(), dtype=np.float64) / 255.0 for n in names}


def perlin(shape: tuple[int, int], cells: int, rng: np.random.Generator, octaves: int = 1) -> np.ndarray:
    """Fractal Perlin gradient noise, (H, W) roughly in [-1, 1]; ``cells`` lattice cells per side at octave 0."""
    h, w = shape
    out = np.zeros(shape)
    amplitude = 1.0
    for o in range(octaves):
        c = cells * 2**o
        angles = rng.uniform(0, 2 * np.pi, (c + 1, c + 1))
        grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (c+1, c+1, 2) unit gradients at lattice points
        y = (np.arange(h) + 0.5) / h * c
        x = (np.arange(w) + 0.5) / w * c
        yi, xi = np.floor(y).astype(int)[:, None], np.floor(x).astype(int)[None, :]
        yf, xf = (y - np.floor(y))[:, None], (x - np.floor(x))[None, :]

        def corner(dy, dx):  # dot(gradient at lattice corner, offset from that corner), (H, W)
            g = grad[yi + dy, xi + dx]
            return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

        fy, fx = (6 * t**5 - 15 * t**4 + 10 * t**3 for t in (yf, xf))  # Perlin's quintic fade
        top = corner(0, 0) * (1 - fx) + corner(0, 1) * fx
        bottom = corner(1, 0) * (1 - fx) + corner(1, 1) * fx
        out += amplitude * np.sqrt(2) * (top * (1 - fy) + bottom * fy)
        amplitude /= 2
    return out


def _blob(shape, rng, area: float, cells: int, roughness: float) -> np.ndarray:
    """A localised blob of about ``area`` pixels: a Gaussian bump at a random centre, perturbed by Perlin noise."""
    h, w = shape
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    yy, xx = np.mgrid[:h, :w]
    bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.18 * h) ** 2))
    field = bump + roughness * perlin(shape, cells, rng, octaves=2)
    return field > np.quantile(field, 1 - area / (h * w))


def _rim_profile(mask: np.ndarray, ramp: float) -> np.ndarray:
    """1 in the interior, 0.5 on the mask's edge, smooth in between (``ramp`` px), 0 outside."""
    t = np.clip(ndimage.distance_transform_edt(mask) / ramp, 0, 1)
    return np.where(mask, 0.5 + 0.5 * t * t * (3 - 2 * t), 0.0)


def foreign_texture(image: np.ndarray, rng: np.random.Generator, sources: dict[str, np.ndarray],
                    exclude: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blend a crop of another photo into ``image`` through a thresholded Perlin mask."""
    h, w = image.shape
    mask = _blob((h, w), rng, rng.uniform(0.02, 0.12) * h * w, cells=int(rng.choice([2, 4])), roughness=0.6)
    mask = morphology.remove_small_objects(mask, max_size=MIN_ISLAND)  # specks below the backbones' resolution
    name = rng.choice([n for n in sorted(sources) if n != exclude])
    src = sources[name]
    side = int(rng.integers(min(96, *src.shape), min(256, *src.shape) + 1))
    y0, x0 = int(rng.integers(0, src.shape[0] - side + 1)), int(rng.integers(0, src.shape[1] - side + 1))
    crop = Image.fromarray(np.round(src[y0:y0 + side, x0:x0 + side] * 255).astype(np.uint8))
    crop = crop.resize((w, h), Image.Resampling.BILINEAR)
    patch = np.rot90(np.asarray(crop, dtype=np.float64) / 255.0, int(rng.integers(4)))
    patch = (patch - patch.mean()) / (patch.std() + 1e-6) * image.std() + image.mean()  # texture, not brightness
    beta = rng.uniform(0.6, 0.95)
    out = np.where(mask, np.clip((1 - beta) * image + beta * patch, 0, 1), image)
    return out, mask


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved bright or dark line (cubic Bézier, 2–3 px thick)."""
    h, w = image.shape
    length = rng.uniform(0.45, 0.95) * min(h, w)
    p0 = rng.uniform(0.1, 0.9, 2) * (h, w)
    to_centre = np.arctan2(h / 2 - p0[0], w / 2 - p0[1])  # head roughly inwards so most of the line stays inside
    theta = to_centre + rng.uniform(-np.pi / 3, np.pi / 3)
    d = np.array([np.sin(theta), np.cos(theta)])
    normal = np.array([-d[1], d[0]])
    p3 = p0 + length * d
    p1 = p0 + length / 3 * d + rng.uniform(-0.35, 0.35) * length * normal
    p2 = p0 + 2 * length / 3 * d + rng.uniform(-0.35, 0.35) * length * normal
    t = np.linspace(0, 1, int(4 * length))[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3  # (T, 2) row, col
    pts = np.round(pts).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)]
    line = np.zeros((h, w), bool)
    line[pts[:, 0], pts[:, 1]] = True
    structure = np.ones((2, 2), bool) if rng.random() < 0.5 else ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_dilation(line, structure=structure)
    tone = rng.uniform(0.88, 0.98) if rng.random() < 0.5 else rng.uniform(0.02, 0.12)
    a = rng.uniform(0.6, 0.9)
    return np.where(mask, (1 - a) * image + a * tone, image), mask


def hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, smooth-edged cut-out: a Perlin-perturbed rotated ellipse."""
    h, w = image.shape
    area = rng.uniform(0.015, 0.1) * h * w
    aspect = rng.uniform(0.5, 2.0)
    ra, rb = np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    phi = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:h, :w]
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    mask = (u / ra) ** 2 + (v / rb) ** 2 + 0.3 * perlin((h, w), 3, rng) < 1
    a = rng.uniform(0.5, 0.85) * _rim_profile(mask, 3.0)
    dark = rng.uniform(0.02, 0.12)
    return np.where(mask, image * (1 - a) + dark * a, image), mask


def blotch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth irregular region made brighter or darker by a fraction of the available intensity range."""
    h, w = image.shape
    mask = _blob((h, w), rng, rng.uniform(0.03, 0.12) * h * w, cells=2, roughness=0.35)
    g = rng.uniform(0.25, 0.45) * _rim_profile(mask, 6.0)
    out = image + g * (1 - image) if rng.random() < 0.5 else image * (1 - g)
    return np.where(mask, out, image), mask


def synthesise(family: str, image: np.ndarray, rng: np.random.Generator, sources: dict[str, np.ndarray] | None = None,
               exclude: str | None = None, max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect family to a grey (H, W) float image in [0, 1]; redraw until the coverage is in range.

    Args:
        family: one of :data:`DEFECT_FAMILIES`.
        image: the defect-free image.
        rng: the generator all randomness comes from.
        sources: foreign-texture photos (``foreign_texture`` only), default :func:`load_sources`.
        exclude: a source name not to paste (the image's own photo).

    Returns:
        (defective image as float (H, W) in [0, 1], mask as bool (H, W)).
    """
    if family not in DEFECT_FAMILIES:
        raise ValueError(f"defect family must be one of {DEFECT_FAMILIES}, got {family!r}")
    if image.ndim != 2 or image.min() < 0 or image.max() > 1:
        raise ValueError(f"image must be a grey (H, W) array in [0, 1], got shape {image.shape}")
    lo, hi = COVERAGE_RANGE
    for _ in range(max_tries):
        if family == "foreign_texture":
            out, mask = foreign_texture(image, rng, sources if sources is not None else load_sources(), exclude)
        else:
            out, mask = {"scratch": scratch, "hole": hole, "blotch": blotch}[family](image, rng)
        if lo <= mask.mean() <= hi:
            assert np.array_equal(out[~mask], image[~mask]), "a defect changed pixels outside its mask"
            return np.clip(out, 0, 1), mask
    raise RuntimeError(f"{family}: no mask within coverage {COVERAGE_RANGE} after {max_tries} draws")
