"""Pixel content of the synthetic sparse-evidence slides: H&E-like tissue, evidence foci, look-alikes.

Colours come from a Beer-Lambert stain model (why: mixing stain concentrations, not RGB values,
gives the hues and the darkening of real H&E, and stain variation between slides is one small
change of the stain vectors): ``rgb = 255 * exp(-(h * OD_H + e * OD_E + r * OD_R))`` with per-pixel
haematoxylin ``h`` (nuclei, purple-blue), eosin ``e`` (cytoplasm/stroma, pink) and a red-cell
component ``r`` (erythrocytes, red-orange) concentrations.

Scale: texture sizes are level-0 pixels designed for 0.5 um/px (a nucleus is ~10 px, 5 um);
a structure's overall size is the caller's ``diameter`` (a fraction of the design patch).

Evidence kinds are chosen so each has a *look-alike* of the same colour but a different
patch-scale texture (the pairs below), so colour alone does not tell evidence from background:

=====================  ===========================  =============================================
evidence kind          look-alike distractor        shared colour / differing texture
=====================  ===========================  =============================================
keratin pearl          haemorrhage                  red-orange; concentric lamellae vs packed red cells
psammoma body          lymphoid aggregate           dark blue-purple; laminated spheres vs dense dots
signet-ring cells      adipocytes                   pale vacuoles (fat whiter, as it is); small cells
                                                    with crescent nuclei vs large empty fat cells
giant cell             vessel                       pink with peripheral nuclei; solid vs hollow ring
=====================  ===========================  =============================================
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Optical-density vectors (R, G, B): Ruifrok & Johnston's haematoxylin; an eosin with a little more
# blue absorption (scanned eosin is pink, blue below red: keeps tissue clear of pen-mark rules); red cells.
OD_H = np.array([0.65, 0.70, 0.29], np.float32)
OD_E = np.array([0.10, 0.95, 0.32], np.float32)
OD_R = np.array([0.05, 0.85, 0.75], np.float32)

EVIDENCE_KINDS: tuple[str, ...] = ("keratin_pearl", "psammoma_body", "signet_ring", "giant_cell")
DISTRACTOR_KINDS: tuple[str, ...] = ("haemorrhage", "lymphoid_aggregate", "adipocytes", "vessel")
# Human names (singular, plural) used in the questions.
KIND_NAMES: dict[str, tuple[str, str]] = {
    "keratin_pearl": ("keratin pearl", "keratin pearls"),
    "psammoma_body": ("psammoma body", "psammoma bodies"),
    "signet_ring": ("signet-ring cell cluster", "signet-ring cell clusters"),
    "giant_cell": ("multinucleated giant cell", "multinucleated giant cells"),
    "haemorrhage": ("haemorrhage", "haemorrhages"),
    "lymphoid_aggregate": ("lymphoid aggregate", "lymphoid aggregates"),
    "adipocytes": ("adipocyte cluster", "adipocyte clusters"),
    "vessel": ("vessel", "vessels"),
}
LOOK_ALIKE: dict[str, str] = dict(zip(EVIDENCE_KINDS, DISTRACTOR_KINDS))


@dataclasses.dataclass(frozen=True)
class Stain:
    """One slide's stain: OD vectors and concentration scales (varied per slide like real batches)."""

    od_h: np.ndarray
    od_e: np.ndarray
    od_r: np.ndarray
    h_scale: float
    e_scale: float

    @staticmethod
    def random(rng: np.random.Generator) -> "Stain":
        def jitter(v, s):  # a small hue change of one stain, its strength kept
            j = np.clip(v + rng.normal(0, s, 3).astype(np.float32), 0.02, None)
            return (j * (np.linalg.norm(v) / np.linalg.norm(j))).astype(np.float32)

        for _ in range(100):
            st = Stain(jitter(OD_H, 0.04), jitter(OD_E, 0.04), jitter(OD_R, 0.03),
                       float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.2)))
            # Redraw stains whose nuclei-rich tissue would look blue (blue > red + 12 at low
            # resolution): real H&E stays purple-pink, and tissue detection treats blue as pen.
            ref = st.to_rgb(np.float32(0.75), np.float32(0.45))
            if ref[2] - ref[0] <= 12:
                return st
        return Stain(OD_H, OD_E, OD_R, 1.0, 1.0)

    def to_rgb(self, h: np.ndarray, e: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
        """Concentrations (..., ) float32 -> (..., 3) float32 RGB in [0, 255]."""
        od = (h[..., None] * (self.h_scale * self.od_h) + e[..., None] * (self.e_scale * self.od_e))
        if r is not None:
            od = od + r[..., None] * self.od_r
        return 255.0 * np.exp(-od)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, *, aniso: float = 1.0) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse lattice, bilinearly upsampled (PIL, fast).

    ``cell`` is the lattice step in pixels; ``aniso`` > 1 stretches it along x (fibres).
    """
    from PIL import Image

    h, w = shape
    gh = max(2, int(np.ceil(h / cell)) + 1)
    gw = max(2, int(np.ceil(w / (cell * aniso))) + 1)
    coarse = rng.random((gh, gw), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, np.float32)


def _jittered_nuclei(rng: np.random.Generator, shape: tuple[int, int], spacing: int, presence: float,
                     radius: tuple[float, float], elong: tuple[float, float] = (1.0, 1.0),
                     angle: float | None = 0.0, margin: float = 1.0) -> np.ndarray:
    """Nucleus occupancy in [0, 1] (soft-edged ellipses), one candidate per ``spacing`` x ``spacing``
    cell at a jittered position (why: vectorised over the whole image, no Python loop per nucleus;
    a nucleus never crosses its cell, so ``radius * elong`` must stay below ``spacing / 2``).

    ``angle``: the long-axis angle (radians), or None for a random angle per nucleus.
    """
    h, w = shape
    gh, gw = -(-h // spacing), -(-w // spacing)
    n = (gh, gw)
    rmaj = rng.uniform(*radius, n).astype(np.float32) * rng.uniform(*elong, n).astype(np.float32)
    rmin = rng.uniform(*radius, n).astype(np.float32)
    lim = spacing / 2 - margin
    rmaj = np.minimum(rmaj, lim)
    rmin = np.minimum(rmin, lim)
    cy = spacing / 2 + rng.uniform(-1, 1, n).astype(np.float32) * np.maximum(lim - rmaj, 0)
    cx = spacing / 2 + rng.uniform(-1, 1, n).astype(np.float32) * np.maximum(lim - rmaj, 0)
    th = rng.uniform(0, np.pi, n).astype(np.float32) if angle is None else np.full(n, angle, np.float32)
    present = rng.random(n) < presence
    yy = np.arange(gh * spacing, dtype=np.float32) % spacing
    xx = np.arange(gw * spacing, dtype=np.float32) % spacing

    def up(a):  # per-cell value -> per-pixel
        return np.repeat(np.repeat(a, spacing, 0), spacing, 1)

    dy = yy[:, None] - up(cy)
    dx = xx[None, :] - up(cx)
    c, s = np.cos(up(th)), np.sin(up(th))
    u = (dx * c + dy * s) / up(rmaj)
    v = (-dx * s + dy * c) / up(rmin)
    d = np.sqrt(u * u + v * v)
    occ = np.clip((1.0 - d) * 3.0, 0.0, 1.0) * up(present)
    return occ[:h, :w]


def texture_bank(rng: np.random.Generator, size: int = 768) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Background tissue textures as (h, e) concentration maps, each (size, size) float32.

    * ``stroma``: pink fibrous collagen with sparse spindle nuclei along the fibres.
    * ``cellular``: epithelial/tumour-like sheet, dense round nuclei with chromatin speckle.
    """
    shape = (size, size)
    # Wavy collagen fibres: anisotropic noise sampled along rows displaced by a smooth field.
    warp = (_smooth_noise(rng, shape, 48.0) - 0.5) * 40.0
    fine = _smooth_noise(rng, (size + 48, size), 2.5, aniso=10.0)
    rows = np.clip(np.arange(size)[:, None] + warp + 24, 0, size + 47).astype(np.int32)
    fib = np.take_along_axis(fine, rows, 0) * 0.6 + _smooth_noise(rng, shape, 24.0) * 0.4
    e_str = 0.45 + 0.5 * fib ** 1.5
    spindle = np.maximum(_jittered_nuclei(rng, shape, 26, 0.30, (2.0, 2.8), (2.5, 3.5), angle=None),
                         _jittered_nuclei(rng, shape, 37, 0.30, (2.0, 2.8), (2.5, 3.5), angle=None))
    h_str = 0.06 + 0.95 * spindle + 0.04 * _smooth_noise(rng, shape, 4.0)
    # Two lattices of different pitch overlaid: irregular, crowded nuclei without a visible grid.
    nuc = np.maximum(_jittered_nuclei(rng, shape, 19, 0.75, (3.6, 5.2), (1.0, 1.4), angle=None),
                     _jittered_nuclei(rng, shape, 23, 0.55, (3.6, 5.2), (1.0, 1.4), angle=None))
    chrom = 0.75 + 0.5 * rng.random(shape, dtype=np.float32)
    h_cel = 0.18 + 0.95 * nuc * chrom + 0.08 * _smooth_noise(rng, shape, 6.0)
    e_cel = 0.42 + 0.2 * _smooth_noise(rng, shape, 10.0) * (1 - nuc)
    return {"stroma": (h_str, e_str), "cellular": (h_cel, e_cel)}


def _disc(d: int, radius: float, cy: float | None = None, cx: float | None = None, soft: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    cy = (d - 1) / 2 if cy is None else cy
    cx = (d - 1) / 2 if cx is None else cx
    rho = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.clip((radius - rho) / soft + 0.5, 0, 1)


def _blob_alpha(rng: np.random.Generator, d: int, roughness: float = 0.12) -> np.ndarray:
    """An irregular round region filling most of a d x d square (soft edge)."""
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    c = (d - 1) / 2
    th = np.arctan2(yy - c, xx - c)
    rad = np.ones_like(th)
    for k in (2, 3, 5):
        rad += roughness * rng.uniform(-1, 1) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    rho = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / (0.5 * d * (1 - roughness))
    return np.clip((rad - rho) * d / 6, 0, 1)


def _place_round(rng: np.random.Generator, d: int, n: int, radii: tuple[float, float], spread: float,
                 min_gap: float = 1.0, tries: int = 400) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping circles (cy, cx, r) inside a disc of radius ``spread * d / 2``."""
    c = (d - 1) / 2
    out: list[tuple[float, float, float]] = []
    for _ in range(tries):
        if len(out) >= n:
            break
        r = rng.uniform(*radii)
        a, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.random()) * max(spread * d / 2 - r, 0)
        y, x = c + rr * np.sin(a), c + rr * np.cos(a)
        if all((y - oy) ** 2 + (x - ox) ** 2 >= (r + orr + min_gap) ** 2 for oy, ox, orr in out):
            out.append((y, x, r))
    return out


def render_stamp(kind: str, rng: np.random.Generator, diameter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One evidence focus or look-alike, ``diameter`` x ``diameter`` px.

    Returns:
      (h, e, r, alpha): stain concentrations and opacity, each (diameter, diameter) float32;
      alpha is 1 inside the structure (it replaces the tissue there) and 0 outside.
    """
    d = int(diameter)
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    c = (d - 1) / 2
    rho = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    th = np.arctan2(yy - c, xx - c)
    z = np.zeros((d, d), np.float32)
    h, e, r = z.copy(), z.copy(), z.copy()
    R = 0.46 * d
    if kind == "keratin_pearl":
        # Concentric eosinophilic (orange-pink) lamellae, wobbling, with a rim of flattened nuclei.
        lam = rng.uniform(6.0, 8.0)
        wob = 1.5 * np.sin(3 * th + rng.uniform(0, 6.3))
        e = 0.9 + 0.55 * np.sin(2 * np.pi * (rho + wob) / lam)
        r = 0.35 + 0.2 * np.sin(2 * np.pi * (rho + wob) / lam + 1.0)
        rim = np.clip(1 - np.abs(rho - 0.9 * R) / 3.0, 0, 1) * (np.sin(9 * th) > 0.2)
        h = 0.05 + 1.1 * rim
        alpha = _disc(d, R)
    elif kind == "psammoma_body":
        # 2-4 dark laminated calcospherites: alternating dense/pale haematoxylin rings.
        alpha = z.copy()
        for cy, cx, rr in _place_round(rng, d, int(rng.integers(2, 5)), (0.18 * d, 0.26 * d), 0.95, 2.0):
            p = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            m = _disc(d, rr, cy, cx)
            ring = 0.85 + 0.6 * np.sin(2 * np.pi * p / rng.uniform(4.5, 6.0))
            h = np.where(m > 0, ring * m + h * (1 - m), h)
            e = np.where(m > 0, 0.25 * m + e * (1 - m), e)
            alpha = np.maximum(alpha, m)
        alpha = np.maximum(alpha, 0.6 * _disc(d, R))  # the fibrous bed around them
        e = np.where(alpha < 0.99, np.maximum(e, 0.35), e)
        h = np.where(alpha < 0.99, np.maximum(h, 0.08), h)
    elif kind == "signet_ring":
        # Pale mucin vacuoles, each with a dark crescent nucleus pressed against one side.
        e, h = np.full((d, d), 0.28, np.float32), np.full((d, d), 0.10, np.float32)
        for cy, cx, rr in _place_round(rng, d, 14, (0.09 * d, 0.12 * d), 0.95, 1.0):
            p = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            a = np.arctan2(yy - cy, xx - cx)
            inside = p < rr
            h = np.where(inside, 0.12, h)
            e = np.where(inside, 0.06, e)
            face = rng.uniform(0, 2 * np.pi)
            crescent = (p > 0.55 * rr) & (p < rr) & (np.cos(a - face) > 0.35)
            h = np.where(crescent, 1.25, h)
            e = np.where(np.abs(p - rr) < 1.0, 0.5, e)
        alpha = _blob_alpha(rng, d)
    elif kind == "giant_cell":
        # One large eosinophilic cell with a horseshoe of nuclei at its periphery (Langhans type).
        ell = 1 + rng.uniform(0, 0.25)
        p = np.sqrt(((yy - c) * ell) ** 2 + (xx - c) ** 2)
        alpha = np.clip((R - p) / 1.5 + 0.5, 0, 1)
        e = 0.75 + 0.15 * rng.random((d, d), dtype=np.float32)
        h = np.full((d, d), 0.12, np.float32)
        gap = rng.uniform(0, 2 * np.pi)
        n = int(rng.integers(12, 20))
        for i in range(n):
            a = gap + 0.6 + (2 * np.pi - 1.2) * i / max(n - 1, 1)
            ny, nx = c + 0.72 * R * np.sin(a) / ell, c + 0.72 * R * np.cos(a)
            h = np.maximum(h, 1.1 * _disc(d, rng.uniform(0.05, 0.065) * d, ny, nx))
    elif kind == "haemorrhage":
        # Extravasated red cells: packed small biconcave discs, same red-orange as keratin.
        occ = _jittered_nuclei(rng, (d, d), 9, 0.95, (3.2, 4.0))
        pale = _jittered_nuclei(rng, (d, d), 9, 0.95, (1.2, 1.6))  # central pallor
        r = 0.55 + 0.45 * occ - 0.25 * pale
        e = 0.85 + 0.3 * occ
        h = np.full((d, d), 0.04, np.float32)
        alpha = _blob_alpha(rng, d, 0.2)
    elif kind == "lymphoid_aggregate":
        # Densely packed small round lymphocytes: the dark blue of psammoma bodies, no lamination.
        occ = _jittered_nuclei(rng, (d, d), 8, 0.95, (2.8, 3.5))
        h = 0.25 + 1.0 * occ
        e = np.full((d, d), 0.2, np.float32)
        alpha = _blob_alpha(rng, d, 0.15)
    elif kind == "adipocytes":
        # Packed fat cells: large clear polygonal vacuoles (~3 across the structure, several times a
        # signet cell) split by thin pink septa ("chicken wire"), a rare flat nucleus on a septum.
        # Pale like signet-ring cells; the texture differs (few large empty cells, no crescents).
        n = 3
        gy, gx = np.meshgrid((np.arange(n) + 0.5) * d / n, (np.arange(n) + 0.5) * d / n, indexing="ij")
        seeds = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-0.3, 0.3, (n * n, 2)) * d / n
        dist = np.sort(np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2), axis=-1)
        septum = np.clip(1.0 - (dist[..., 1] - dist[..., 0]) / 2.5, 0, 1)
        e = 0.03 + 0.55 * septum
        h = 0.01 + 0.05 * septum
        flat = _jittered_nuclei(rng, (d, d), 14, 0.2, (1.4, 1.8), elong=(1.8, 2.4), angle=None) * (septum > 0.3)
        h = np.maximum(h, 0.9 * flat)
        alpha = _blob_alpha(rng, d, 0.1)
    elif kind == "vessel":
        # A pink muscular wall around a lumen with a few red cells and flat endothelial nuclei.
        ell = 1 + rng.uniform(0, 0.3)
        p = np.sqrt(((yy - c) * ell) ** 2 + (xx - c) ** 2)
        wall = (p > 0.62 * R) & (p < R)
        e = np.where(wall, 0.7 + 0.2 * np.sin(th * 40), 0.04).astype(np.float32)
        h = np.where(wall, 0.1, 0.02).astype(np.float32)
        endo = (np.abs(p - 0.64 * R) < 1.8) & (np.sin(7 * th + rng.uniform(0, 6.3)) > 0.5)
        h = np.where(endo, 1.0, h)
        rbc = _jittered_nuclei(rng, (d, d), 9, 0.3, (3.0, 3.6)) * (p < 0.55 * R)
        r = 0.9 * rbc
        e = e + 0.6 * rbc
        alpha = np.clip((R - p) / 1.5 + 0.5, 0, 1)
    else:
        raise ValueError(f"unknown structure kind {kind!r}; choose from {', '.join(EVIDENCE_KINDS + DISTRACTOR_KINDS)}")
    return h.astype(np.float32), e.astype(np.float32), r.astype(np.float32), alpha.astype(np.float32)
