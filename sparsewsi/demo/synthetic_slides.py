"""A seeded synthetic sparse-evidence slide benchmark: real pyramidal SVS/TIFF slides + questions.

Every slide is H&E-like tissue (irregular fragments of stroma and cellular sheets on white glass)
with a few small *evidence* foci of one kind (``kinds``: keratin pearls, psammoma bodies, signet-ring
cell clusters, multinucleated giant cells; 1 to ``max_foci`` of them, each inside one patch of the
design grid, so at most ``max_evidence_fraction`` of the tissue patches) and several *look-alike*
distractors whose colour matches some evidence kind but whose texture does not
(:mod:`sparsewsi.demo.render`). Multiple-choice questions per slide (``questions``) are answered
by the evidence only: which structure is present and/or how many foci there are.

With ``none_option`` the identification question also offers "none of these", the answer of
evidence-free slides (look-alikes only), which are as frequent as each kind. Why: when every slide
holds exactly one of the kinds, a reader that recognises all kinds but one answers the last by
elimination, so finding its evidence never pays and a learned selector leaves it out (measured on
the demo: the signet-ring slides, answered by elimination, got evidence recall@32 0.17-0.46). With
evidence-free slides, "nothing seen" means "none of these", and every kind must be seen to be named,
as for a rare finding on real slides.

Layout written under ``out_dir`` (all files written atomically; a rerun skips finished slides)::

    slides/SYN-0000.svs ...        pyramidal Aperio-style SVS or generic pyramidal TIFF
    evidence/SYN-0000.json ...     level-0 boxes of the evidence foci and distractors, the grid
    questions/train.csv, test.csv  SlideBench-VQA TCGA layout (read_slidebench_vqa reads them)
    questions/all.csv
    manifest.json                  config, per-slide records, splits, timings, failures

The *design grid* is the patch grid the slides are drawn for: patches of ``patch_size`` px at
``target_mpp`` (level-0 side ``patch_px = patch_size * target_mpp / mpp``, an integer), starting at
(0, 0) like :func:`sparsewsi.slides.grid.patch_grid`, so each focus lies inside exactly one grid
patch. Extract features with the same ``--patch-size`` / ``--target-mpp`` and use
:func:`annotate_features` to add the per-patch ``evidence`` flags (the oracle selector and
evidence recall@k read them) to each ``.h5`` bag.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsewsi import atomic

from sparsewsi.demo import render
from sparsewsi.demo.render import DISTRACTOR_KINDS, EVIDENCE_KINDS, KIND_NAMES

BENCHMARK_NAME = "SyntheticSlideBench"
FORMAT_VERSION = 1
TUMOR = "SYN"  # the CSV's Tumor column (SlideChat-style feature layouts may use it as a folder)
NONE_KIND = "none"  # the kind of an evidence-free slide (``none_option``)
NONE_OPTION = "none of these"  # its answer
CSV_COLUMNS = ("ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer")
NARROW_KIND = "Structure identification"
NARROW_COUNT = "Focus counting"
KIND_TEMPLATES = (
    "Which atypical structure is present in this slide?",
    "Which of the following structures can be found in this tissue?",
    "What distinctive structure does this slide contain?",
)
COUNT_TEMPLATES = (
    "How many {plural} are present in this slide?",
    "How many separate {plural} can be counted in this tissue?",
    "What is the number of {plural} in this slide?",
)
COUNT_WORDS = ("zero", "one", "two", "three", "four")


class BenchmarkConfigError(ValueError):
    """A benchmark configuration that cannot produce valid slides; the message names the field."""


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that decides the benchmark's content (its digest names a finished slide).

    Attributes:
      num_slides: slides to generate.
      seed: the only source of randomness; the same config gives byte-identical files.
      test_fraction: fraction of each answer's slides (each kind's, the evidence-free ones) in the test
        split.
      mpp: level-0 um/px written into the slides (0.5 = "20x").
      patch_size / target_mpp: the design grid (see the module docstring).
      tissue_patches: (min, max) design-grid patches of tissue per slide.
      max_foci: evidence foci per slide are 1..max_foci (balanced with the kinds).
      kinds: the evidence kinds drawn (from :data:`EVIDENCE_KINDS`), in their fixed option order.
      none_option: the identification question also offers "none of these", the answer of the
        evidence-free slides (as many as of each kind; see the module docstring).
      distractors: (min, max) look-alike structures per slide.
      max_evidence_fraction: evidence patches / tissue patches never exceeds this.
      focus_size: (min, max) focus diameter as a fraction of the grid patch side.
      svs_every: every n-th slide is a generic pyramidal TIFF, the rest Aperio SVS (0: all SVS).
      tile: TIFF tile side; jpeg_quality: JPEG quality of the tiles.
      questions: which question types each slide gets: ``"kind"`` (identification) and/or
        ``"count"`` (focus counting).
      option_order: identification options ``"shuffled"`` per question, or ``"fixed"`` (the same
        order on every slide, as SlideBench-BCNB lists each task's options).
    """

    num_slides: int = 120
    seed: int = 0
    test_fraction: float = 0.25
    mpp: float = 0.5
    patch_size: int = 112
    target_mpp: float = 0.5
    tissue_patches: tuple[int, int] = (300, 360)
    max_foci: int = 3
    distractors: tuple[int, int] = (3, 6)
    max_evidence_fraction: float = 0.01
    focus_size: tuple[float, float] = (0.55, 0.72)
    svs_every: int = 4
    tile: int = 256
    jpeg_quality: int = 85
    option_order: str = "shuffled"
    questions: tuple[str, ...] = ("kind", "count")
    kinds: tuple[str, ...] = EVIDENCE_KINDS
    none_option: bool = False

    @property
    def answers(self) -> tuple[str, ...]:
        """The slide kinds a benchmark holds: ``kinds``, then :data:`NONE_KIND` with ``none_option``."""
        return tuple(self.kinds) + ((NONE_KIND,) if self.none_option else ())

    @property
    def patch_px(self) -> int:
        """Design-grid patch side in level-0 pixels."""
        return int(round(self.patch_size * self.target_mpp / self.mpp))

    def validate(self) -> None:
        """Raise :class:`BenchmarkConfigError` naming the first bad field."""
        def bad(field, why):
            raise BenchmarkConfigError(f"BenchmarkConfig.{field}={getattr(self, field)!r}: {why}")

        if self.num_slides < 1:
            bad("num_slides", "must be at least 1")
        if not 0.0 <= self.test_fraction < 1.0:
            bad("test_fraction", "must be in [0, 1)")
        if not 0.1 <= self.mpp <= 2.0:
            bad("mpp", "must be a plausible microscope resolution in [0.1, 2.0] um/px")
        if self.patch_size < 32 or self.target_mpp <= 0:
            bad("patch_size", "patch_size must be >= 32 px and target_mpp > 0")
        exact = self.patch_size * self.target_mpp / self.mpp
        if abs(exact - round(exact)) > 1e-6:
            bad("target_mpp", f"patch_size * target_mpp / mpp = {exact:g} level-0 px is not an integer, so foci "
                              "cannot be aligned with the extraction grid")
        if self.patch_px < 48:
            bad("patch_size", f"the design patch is {self.patch_px} level-0 px; foci need at least 48 px")
        if not self.questions or set(self.questions) - {"kind", "count"}:
            bad("questions", "must name at least one of 'kind', 'count'")
        if self.option_order not in ("shuffled", "fixed"):
            bad("option_order", "must be 'shuffled' or 'fixed'")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds) or set(self.kinds) - set(EVIDENCE_KINDS):
            bad("kinds", f"must be distinct evidence kinds from {', '.join(EVIDENCE_KINDS)}")
        if self.none_option and "kind" not in self.questions:
            bad("none_option", "evidence-free slides are asked only the identification question: add 'kind' to questions")
        if len(self.kinds) + bool(self.none_option) > 4:
            bad("kinds", f"{len(self.kinds)} kinds{' + none of these' if self.none_option else ''} make more than "
                         "four options (SlideBench questions have at most four)")
        lo, hi = self.tissue_patches
        if not 1 <= lo <= hi:
            bad("tissue_patches", "must be (min, max) with 1 <= min <= max")
        if not 1 <= self.max_foci <= 4:
            bad("max_foci", "must be 1..4 (the count question has at most four options)")
        if not 0 < self.max_evidence_fraction <= 0.5:
            bad("max_evidence_fraction", "must be in (0, 0.5]")
        if self.max_foci > self.max_evidence_fraction * lo:
            bad("tissue_patches", f"min {lo} tissue patches cannot hold {self.max_foci} foci at <= "
                                  f"{self.max_evidence_fraction:.1%} evidence; raise min to "
                                  f"{math.ceil(self.max_foci / self.max_evidence_fraction)}")
        dlo, dhi = self.distractors
        if not 0 <= dlo <= dhi:
            bad("distractors", "must be (min, max) with 0 <= min <= max")
        flo, fhi = self.focus_size
        if not 0.2 <= flo <= fhi <= 0.85:
            bad("focus_size", "must be (min, max) fractions with 0.2 <= min <= max <= 0.85")
        if self.tile % 16 or self.tile < 64:
            bad("tile", "must be a multiple of 16, at least 64")
        if not 1 <= self.jpeg_quality <= 100:
            bad("jpeg_quality", "must be 1..100")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "BenchmarkConfig":
        fields = {f.name: f for f in dataclasses.fields(BenchmarkConfig)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise BenchmarkConfigError(f"unknown BenchmarkConfig field(s): {', '.join(unknown)}")
        return BenchmarkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def digest(self) -> str:
        """SHA-256 (first 16 hex) of the content-deciding config and the format version."""
        blob = json.dumps({"config": self.to_json(), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Small presets: "demo" fits the end-to-end demo budget, "test" makes seconds-long test slides.
PRESETS: dict[str, BenchmarkConfig] = {
    "demo": BenchmarkConfig(),
    "test": BenchmarkConfig(num_slides=8, tissue_patches=(100, 130), max_foci=1, distractors=(2, 3), tile=128,
                            svs_every=2),
}


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """What one slide will contain, decided before any pixel is drawn (pure function of the config)."""

    index: int
    slide_id: str
    kind: str
    count: int
    split: str
    fmt: str  # "svs" | "tiff"
    seed: tuple[int, int]

    @property
    def filename(self) -> str:
        return f"{self.slide_id}.{'svs' if self.fmt == 'svs' else 'tif'}"


def num_test_slides(fraction: float, n: int) -> int:
    """Test slides among ``n`` of one kind: ``fraction * n`` rounded half up, at least one when
    ``fraction > 0`` and ``n >= 2`` (so small benchmarks still test every kind)."""
    k = int(math.floor(fraction * n + 0.5))
    return max(k, 1) if fraction > 0 and n >= 2 else k


def plan_slides(cfg: BenchmarkConfig) -> list[SlidePlan]:
    """Kinds and counts balanced jointly (every (kind, count) pair as often as possible; evidence-free
    slides, count 0, as often as each kind), test split stratified by kind, formats alternating;
    all from ``cfg.seed``."""
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, 0xB0A4D])
    combos = [(k, c) for k in cfg.kinds for c in range(1, cfg.max_foci + 1)]
    combos += [(NONE_KIND, 0)] * (cfg.max_foci if cfg.none_option else 0)
    reps = -(-cfg.num_slides // len(combos))
    pairs = []
    for _ in range(reps):  # each round holds every pair once: balanced for any prefix of rounds
        order = rng.permutation(len(combos))
        pairs += [combos[i] for i in order]
    pairs = pairs[: cfg.num_slides]
    split = ["train"] * cfg.num_slides
    for kind in cfg.answers:
        idx = [i for i, (k, _) in enumerate(pairs) if k == kind]
        n_test = num_test_slides(cfg.test_fraction, len(idx))
        for i in rng.permutation(idx)[:n_test]:
            split[int(i)] = "test"
    width = max(4, len(str(cfg.num_slides - 1)))
    return [
        SlidePlan(i, f"SYN-{i:0{width}d}", k, c, split[i],
                  "tiff" if cfg.svs_every and i % cfg.svs_every == cfg.svs_every - 1 else "svs", (cfg.seed, i))
        for i, (k, c) in enumerate(pairs)
    ]


# --------------------------------------------------------------------------------------------
# Geometry: tissue shape on the design grid
# --------------------------------------------------------------------------------------------

_SUB = 8  # coarse mask pixels per design-grid patch side


def _tissue_field(rng: np.random.Generator, target_cells: int) -> tuple[np.ndarray, int, int]:
    """Coarse signed field (> 0 on tissue) of 1-3 irregular fragments with ~``target_cells`` grid cells.

    Returns (field (gh*_SUB, gw*_SUB) float32, gh, gw), the grid including a blank margin.
    """
    n = int(rng.choice([1, 2, 2, 3]))
    blobs = []
    for j in range(n):
        ry, rx = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
        harm = [(k, rng.uniform(0.04, 0.16), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 6)]
        if j == 0:
            cy = cx = 0.0
        else:  # next fragment beside a previous one: touching, overlapping or apart
            py, px, pry, prx, _, _ = blobs[int(rng.integers(len(blobs)))]
            a = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.8, 1.4) * (max(pry, prx) + max(ry, rx))
            cy, cx = py + dist * np.sin(a), px + dist * np.cos(a)
        blobs.append((cy, cx, ry, rx, rng.uniform(0, np.pi), harm))
    holes = [(int(rng.integers(n)), rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.6), rng.uniform(0.05, 0.12))
             for _ in range(int(rng.integers(0, 4)))]
    wobble = rng.random((64, 64), dtype=np.float32)

    def render_field(scale: float) -> tuple[np.ndarray, int, int]:
        ys = [b[0] for b in blobs]
        xs = [b[1] for b in blobs]
        reach = max(max(b[2], b[3]) for b in blobs) * 1.5
        y0, y1 = (min(ys) - reach) * scale, (max(ys) + reach) * scale
        x0, x1 = (min(xs) - reach) * scale, (max(xs) + reach) * scale
        gh, gw = int(np.ceil(y1 - y0)) + 2, int(np.ceil(x1 - x0)) + 2  # one blank cell each side
        yy, xx = np.mgrid[0:gh * _SUB, 0:gw * _SUB].astype(np.float32)
        yy = (yy + 0.5) / _SUB + y0 - 1
        xx = (xx + 0.5) / _SUB + x0 - 1
        field = np.full(yy.shape, -1.0, np.float32)
        for cy, cx, ry, rx, rot, harm in blobs:
            dy, dx = yy - cy * scale, xx - cx * scale
            c, s = np.cos(rot), np.sin(rot)
            u, v = (dx * c + dy * s) / (rx * scale), (-dx * s + dy * c) / (ry * scale)
            th = np.arctan2(v, u)
            rad = 1.0 + sum(a * np.cos(k * th + p) for k, a, p in harm)
            field = np.maximum(field, 1.0 - np.sqrt(u * u + v * v) / rad)
        for bi, a, rr, hr in holes:  # small lumina / tears inside a fragment
            cy, cx, ry, rx = blobs[bi][:4]
            hy, hx = (cy + rr * ry * np.sin(a)) * scale, (cx + rr * rx * np.cos(a)) * scale
            d = np.sqrt((yy - hy) ** 2 + (xx - hx) ** 2) / (hr * scale * max(ry, rx))
            field = np.minimum(field, d - 1.0)
        # Ragged edge: low-amplitude noise so outlines are not smooth ellipses.
        from PIL import Image

        noise = np.asarray(Image.fromarray(wobble, mode="F").resize((gw * _SUB, gh * _SUB), Image.BILINEAR))
        field = field + 0.06 * (noise - 0.5)
        # Crop to the tissue's bounding box plus a one-cell glass border (so background is a
        # sizeable part of the slide, as on real slides: tissue detection's Otsu needs both modes).
        rows, cols = np.nonzero((field > 0).reshape(gh, _SUB, gw, _SUB).any((1, 3)))
        if len(rows):
            r0, r1 = rows.min() - 1, rows.max() + 2
            c0, c1 = cols.min() - 1, cols.max() + 2
            field = _padded_crop(field, r0 * _SUB, r1 * _SUB, c0 * _SUB, c1 * _SUB)
            gh, gw = r1 - r0, c1 - c0
        return np.ascontiguousarray(field), gh, gw

    scale = math.sqrt(target_cells / (np.pi * sum(b[2] * b[3] for b in blobs)))
    for _ in range(6):
        field, gh, gw = render_field(scale)
        cells = _cell_coverage(field > 0, gh, gw)
        got = int((cells >= 0.5).sum())
        if abs(got - target_cells) <= max(2, 0.03 * target_cells):
            break
        scale *= math.sqrt(target_cells / max(got, 1))
    return field, gh, gw


def _padded_crop(a: np.ndarray, y0: int, y1: int, x0: int, x1: int, fill: float = -1.0) -> np.ndarray:
    """``a[y0:y1, x0:x1]`` with out-of-range parts filled with ``fill``."""
    out = np.full((y1 - y0, x1 - x0), fill, a.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, a.shape[0]), max(x0, 0), min(x1, a.shape[1])
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = a[sy0:sy1, sx0:sx1]
    return out


def _cell_coverage(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Fraction of each design-grid cell covered by the coarse mask: (gh, gw) float32."""
    return mask[: gh * _SUB, : gw * _SUB].reshape(gh, _SUB, gw, _SUB).mean((1, 3)).astype(np.float32)


def _pick_cells(rng: np.random.Generator, free: np.ndarray, n: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``n`` cells from ``free`` (bool grid), none within one cell (8-neighbourhood) of another
    or of ``taken``: every structure is its own patch and no patch holds two structures."""
    cand = [tuple(int(v) for v in p) for p in np.argwhere(free)]
    order = rng.permutation(len(cand))
    out: list[tuple[int, int]] = []
    for i in order:
        cy, cx = cand[int(i)]
        if all(max(abs(cy - ty), abs(cx - tx)) >= 2 for ty, tx in taken + out):
            out.append((cy, cx))
            if len(out) == n:
                break
    return out


# --------------------------------------------------------------------------------------------
# One slide
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RenderedSlide:
    """A slide's level-0 pixels and its ground truth (boxes are level-0 [x0, y0, x1, y1), ints)."""

    image: np.ndarray  # (H, W, 3) uint8
    evidence: list[dict[str, Any]]
    distractors: list[dict[str, Any]]
    tissue_patches: int  # design-grid cells with >= 50% tissue
    tissue_mask_cells: np.ndarray  # (gh, gw) float32 coverage of each design cell


def render_slide(plan: SlidePlan, cfg: BenchmarkConfig) -> RenderedSlide:
    """Draw one slide (pure function of ``plan`` and ``cfg``)."""
    from PIL import Image

    rng = np.random.default_rng(list(plan.seed))
    P = cfg.patch_px
    lo, hi = cfg.tissue_patches
    target = int(rng.integers(lo, hi + 1))
    for attempt in range(8):
        field, gh, gw = _tissue_field(rng, target)
        tissue = field > 0
        cov = _cell_coverage(tissue, gh, gw)
        n_tissue = int((cov >= 0.5).sum())
        # Interior cells (the cell and its 8 neighbours fully tissue) can hold a structure.
        full = cov >= 0.999
        pad = np.pad(full, 1)
        interior = np.ones_like(full)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= pad[1 + dy: 1 + dy + gh, 1 + dx: 1 + dx + gw]
        if plan.count > cfg.max_evidence_fraction * n_tissue:
            target = int(target * 1.15) + 1
            continue
        ev_cells = _pick_cells(rng, interior, plan.count, []) if plan.count else []
        n_dis = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
        dis_cells = _pick_cells(rng, interior, n_dis, ev_cells)
        if len(ev_cells) == plan.count:
            break
        target = int(target * 1.15) + 1
    else:
        raise RuntimeError(f"{plan.slide_id}: could not fit {plan.count} foci into the tissue after 8 attempts")

    extra_y, extra_x = int(rng.integers(0, P)), int(rng.integers(0, P))
    H, W = gh * P + extra_y, gw * P + extra_x
    # Full-resolution tissue and tissue-type masks: bilinear upsampling of the coarse fields (as
    # 8-bit images: 4x less memory traffic than float), then a threshold, gives smooth outlines
    # at no per-pixel Python cost.
    def upsample_mask(coarse: np.ndarray, lo: float, hi: float) -> np.ndarray:
        u8 = np.clip((coarse - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(u8, mode="L").resize((gw * P, gh * P), Image.BILINEAR))
        out = np.zeros((H, W), bool)
        out[: gh * P, : gw * P] = big >= 128
        return out

    tmask = upsample_mask(field, -0.5, 0.5)
    mix_coarse = render._smooth_noise(rng, field.shape, _SUB * rng.uniform(1.0, 2.5))
    mix_t = float(np.quantile(mix_coarse[tissue], rng.uniform(0.35, 0.65))) if tissue.any() else 0.5
    cellular = upsample_mask(mix_coarse, mix_t - 0.5, mix_t + 0.5)

    # Textures are stained once per slide (small banks), then tiled as uint8 with random
    # rotations/flips/offsets: composing a slide is then memory copies and selections only.
    stain = render.Stain.random(rng)
    banks = {}
    for name, (h, e) in render.texture_bank(rng).items():
        banks[name] = np.clip(stain.to_rgb(h, e) + 0.5, 0, 255).astype(np.uint8)
    bsize = banks["stroma"].shape[0]
    B = 512
    image = np.empty((H, W, 3), np.uint8)
    bg_level = rng.uniform(238, 246)
    bg = np.clip(bg_level + np.array([0.0, -1.0, 1.5]) + rng.normal(0, 1.0, 3), 0, 255).astype(np.uint8)
    for y in range(0, H, B):
        for x in range(0, W, B):
            bh, bw = min(B, H - y), min(B, W - x)
            tm = tmask[y:y + bh, x:x + bw]
            if not tm.any():
                image[y:y + bh, x:x + bw] = bg
                continue
            views = []
            for name in ("stroma", "cellular"):
                # Stroma turns only by 180 degrees: fibres keep one direction across blocks.
                k = int(rng.integers(4)) if name == "cellular" else 2 * int(rng.integers(2))
                flip = bool(rng.integers(2))
                oy, ox = int(rng.integers(0, bsize - B + 1)), int(rng.integers(0, bsize - B + 1))
                v = np.rot90(banks[name][oy:oy + B, ox:ox + B], k)
                views.append((v[:, ::-1] if flip else v)[:bh, :bw])
            tex = np.where(cellular[y:y + bh, x:x + bw, None], views[1], views[0])
            image[y:y + bh, x:x + bw] = np.where(tm[..., None], tex, bg)

    def stamp(kind: str, cell: tuple[int, int]) -> dict[str, Any]:
        d = int(round(rng.uniform(*cfg.focus_size) * P))
        m = max(2, P // 40)
        cy, cx = cell
        y0 = cy * P + int(rng.integers(m, P - d - m + 1))
        x0 = cx * P + int(rng.integers(m, P - d - m + 1))
        h, e, r, a = render.render_stamp(kind, rng, d)
        rgb = stain.to_rgb(h, e, r)
        region = image[y0:y0 + d, x0:x0 + d].astype(np.float32)
        out = region * (1 - a[..., None]) + rgb * a[..., None]
        image[y0:y0 + d, x0:x0 + d] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(a > 0.5)
        box = [int(x0 + xs.min()), int(y0 + ys.min()), int(x0 + xs.max() + 1), int(y0 + ys.max() + 1)]
        return {"kind": kind, "box": box, "cell": [int(cy), int(cx)]}

    evidence = [stamp(plan.kind, c) for c in ev_cells]
    dis_kinds = [DISTRACTOR_KINDS[int(i)] for i in rng.integers(0, len(DISTRACTOR_KINDS), len(dis_cells))]
    distractors = [stamp(k, c) for k, c in zip(dis_kinds, dis_cells)]
    return RenderedSlide(image, evidence, distractors, n_tissue, cov)


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------

def kind_name(kind: str) -> str:
    """The answer text of a slide kind: the structure's name, or :data:`NONE_OPTION`."""
    return NONE_OPTION if kind == NONE_KIND else KIND_NAMES[kind][0]


def slide_questions(plan: SlidePlan, cfg: BenchmarkConfig) -> list[dict[str, str]]:
    """The slide's questions (``cfg.questions``) as CSV rows (keys :data:`CSV_COLUMNS`); a pure function of the plan.

    * identification: which of the ``kinds`` is present, with ``none_option`` also "none of these"
      (options shuffled per question, or in ``kinds`` order, "none of these" last, with
      ``option_order="fixed"``; empty ``C``/``D`` when fewer than four, as in SlideBench);
    * counting: how many foci of the slide's kind (options ``1..max(3, max_foci)`` in order,
      as words, so the answer letter follows the balanced count); not asked of evidence-free slides.
    """
    rng = np.random.default_rng([cfg.seed, plan.index, 0x9E57])
    names = [KIND_NAMES[k][0] for k in cfg.kinds] + ([NONE_OPTION] if cfg.none_option else [])
    order = rng.permutation(len(names))  # drawn either way: the rest of the slide's draws stay the same
    opts = names if cfg.option_order == "fixed" else [names[i] for i in order]
    letters = "ABCD"
    ans = letters[opts.index(kind_name(plan.kind))]
    q1 = {"ID": f"{plan.slide_id}-kind", "Slide": plan.slide_id, "Tumor": TUMOR, "Broad Category": "Microscopy",
          "Narrow Category": NARROW_KIND, "Question": KIND_TEMPLATES[int(rng.integers(len(KIND_TEMPLATES)))],
          **{letters[i]: (opts[i] if i < len(opts) else "") for i in range(4)}, "Answer": ans}
    if plan.kind == NONE_KIND:
        return [q1] if "kind" in cfg.questions else []
    n_opts = max(3, cfg.max_foci)
    counts = [COUNT_WORDS[i] for i in range(1, n_opts + 1)]
    q2 = {"ID": f"{plan.slide_id}-count", "Slide": plan.slide_id, "Tumor": TUMOR, "Broad Category": "Microscopy",
          "Narrow Category": NARROW_COUNT,
          "Question": COUNT_TEMPLATES[int(rng.integers(len(COUNT_TEMPLATES)))].format(plural=KIND_NAMES[plan.kind][1]),
          **{letters[i]: (counts[i] if i < n_opts else "") for i in range(4)}, "Answer": letters[plan.count - 1]}
    return [q for name, q in (("kind", q1), ("count", q2)) if name in cfg.questions]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def write_json_atomic(path: os.PathLike | str, obj: Any) -> None:
    """JSON to a temporary file in the same folder, then renamed into place."""
    atomic.write_json_atomic(path, obj)


def write_csv_atomic(path: os.PathLike | str, rows: Sequence[dict[str, str]], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Rows as a UTF-8 CSV with ``columns`` (atomic)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text_atomic(path, buf.getvalue())


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pyramid(width: int, height: int) -> tuple[int, ...]:
    """Downsamples 1, 4, 16 ... while the level stays >= 512 px on its long side (like scanners)."""
    ds = [1]
    while max(width, height) // (ds[-1] * 4) >= 512:
        ds.append(ds[-1] * 4)
    if len(ds) == 1:
        ds.append(4)  # tiffslide and tissue detection want at least one lower level
    return tuple(ds)


def evidence_path(out_dir: os.PathLike | str, slide_id: str) -> pathlib.Path:
    return pathlib.Path(out_dir) / "evidence" / f"{slide_id}.json"


def _finished(out_dir: pathlib.Path, plan: SlidePlan, digest: str) -> dict[str, Any] | None:
    """The evidence record of a slide already written for this config (else None)."""
    ev = evidence_path(out_dir, plan.slide_id)
    slide = out_dir / "slides" / plan.filename
    if not (ev.is_file() and slide.is_file()):
        return None
    try:
        rec = json.loads(ev.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("config_digest") != digest or rec.get("file_bytes") != slide.stat().st_size:
        return None
    return rec


def generate_slide(plan: SlidePlan, cfg: BenchmarkConfig, out_dir: os.PathLike | str) -> dict[str, Any]:
    """Render and write one slide and its evidence JSON (slide first, JSON last, both atomic).

    Returns the evidence record (what ``evidence/<id>.json`` holds).
    """
    from sparsewsi.slides.synthetic import write_aperio_svs, write_pyramidal_tiff

    out = pathlib.Path(out_dir)
    t0 = time.perf_counter()
    rs = render_slide(plan, cfg)
    H, W = rs.image.shape[:2]
    t_render = time.perf_counter() - t0
    slide_path = out / "slides" / plan.filename
    slide_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = slide_path.with_name(f".{slide_path.stem}.tmp-{os.getpid()}{slide_path.suffix}")
    ds = _pyramid(W, H)
    try:
        if plan.fmt == "svs":
            write_aperio_svs(tmp, rs.image, mpp=cfg.mpp, app_mag=round(10.0 / cfg.mpp, 3), downsamples=ds,
                             tile=cfg.tile, quality=cfg.jpeg_quality)
        else:
            write_pyramidal_tiff(tmp, rs.image, mpp=cfg.mpp, downsamples=ds, tile=cfg.tile, quality=cfg.jpeg_quality)
        os.replace(tmp, slide_path)
    finally:
        tmp.unlink(missing_ok=True)
    rec = {
        "slide_id": plan.slide_id,
        "file": f"slides/{plan.filename}",
        "file_bytes": slide_path.stat().st_size,
        "sha256": _sha256(slide_path),
        "format": plan.fmt,
        "width": W, "height": H, "mpp": cfg.mpp, "downsamples": list(ds),
        "split": plan.split,
        "kind": plan.kind, "kind_name": kind_name(plan.kind), "count": plan.count,
        "grid": {"patch_size": cfg.patch_size, "target_mpp": cfg.target_mpp, "patch_px_level0": cfg.patch_px},
        "tissue_patches": rs.tissue_patches,
        "evidence_fraction": plan.count / max(rs.tissue_patches, 1),
        "evidence": rs.evidence,
        "distractors": rs.distractors,
        "config_digest": cfg.digest(),
        "seconds": {"render": round(t_render, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    write_json_atomic(evidence_path(out, plan.slide_id), rec)
    return rec


def _generate_or_fail(args) -> tuple[str, dict[str, Any] | None, str]:
    plan, cfg, out_dir = args
    try:
        return plan.slide_id, generate_slide(plan, cfg, out_dir), ""
    except Exception as err:  # keep the batch going; the manifest lists the failure
        where = traceback.extract_tb(err.__traceback__)[-1]
        return plan.slide_id, None, f"{type(err).__name__}: {err} (at {os.path.basename(where.filename)}:{where.lineno})"


def generate_benchmark(out_dir: os.PathLike | str, cfg: BenchmarkConfig = BenchmarkConfig(), *, workers: int = 1,
                       log: Callable[[str], None] | None = print, progress: bool = False) -> dict[str, Any]:
    """Generate (or finish) the benchmark in ``out_dir``; returns the manifest (also written).

    Slides already written for the same config are reused. A slide that fails is listed in the
    manifest's ``failed`` with its reason and left out of the question files; the others go on.
    The result does not depend on ``workers`` (each slide has its own seed).

    Args:
      workers: processes drawing slides in parallel (spawned, so a caller that already imported
        JAX can use it safely).
      log: one line per slide (None: silent); ``progress``: a tqdm bar instead.
    """
    cfg.validate()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = cfg.digest()
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("config_digest") not in (None, digest):
            raise BenchmarkConfigError(
                f"{out} holds a benchmark of another config (digest {old.get('config_digest')}, now {digest}); "
                "use another folder or delete it")
    plans = plan_slides(cfg)
    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    todo = []
    for p in plans:
        rec = _finished(out, p, digest)
        if rec is not None:
            records[p.slide_id] = rec
        else:
            todo.append(p)
    if log and records:
        log(f"{len(records)} of {len(plans)} slides already written for config {digest}; generating {len(todo)}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="slide", desc="synthetic slides", dynamic_ncols=True)

    def done(sid, rec, err, i):
        if rec is None:
            failed[sid] = err
        else:
            records[sid] = rec
        if bar is not None:
            bar.update(1)
        elif log:
            what = (f"{rec['width']}x{rec['height']} px, {rec['tissue_patches']} tissue patches, {rec['count']} "
                    f"{rec['kind']}, {rec['seconds']['total']:.1f} s") if rec else f"FAILED {err}"
            log(f"[{i}/{len(todo)}] {sid}: {what}")

    jobs = [(p, cfg, os.fspath(out)) for p in todo]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            for i, (sid, rec, err) in enumerate(ex.map(_generate_or_fail, jobs, chunksize=1), 1):
                done(sid, rec, err, i)
    else:
        for i, job in enumerate(jobs, 1):
            done(*_generate_or_fail(job), i)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    rows: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for p in plans:
        if p.slide_id in records:
            rows[p.split] += slide_questions(p, cfg)
    qdir = out / "questions"
    for split, r in rows.items():
        write_csv_atomic(qdir / f"{split}.csv", r)
    write_csv_atomic(qdir / "all.csv", [r for p in plans if p.slide_id in records
                                        for r in slide_questions(p, cfg)])
    slides = []
    for p in plans:
        rec = records.get(p.slide_id)
        if rec is None:
            continue
        slides.append({k: rec[k] for k in ("slide_id", "file", "sha256", "format", "width", "height", "split", "kind",
                                           "count", "tissue_patches", "evidence_fraction")}
                      | {"evidence_file": f"evidence/{p.slide_id}.json", "seconds": rec["seconds"]["total"]})
    manifest = {
        "name": BENCHMARK_NAME,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_json(),
        "config_digest": digest,
        "evidence_kinds": {k: KIND_NAMES[k][0] for k in cfg.kinds},
        "none_option": NONE_OPTION if cfg.none_option else None,
        "distractor_kinds": {k: KIND_NAMES[k][0] for k in DISTRACTOR_KINDS},
        "look_alike": render.LOOK_ALIKE,
        "grid": {"patch_size": cfg.patch_size, "target_mpp": cfg.target_mpp, "patch_px_level0": cfg.patch_px},
        "questions": {"train": "questions/train.csv", "test": "questions/test.csv", "all": "questions/all.csv"},
        "num_slides": {"train": sum(s["split"] == "train" for s in slides),
                       "test": sum(s["split"] == "test" for s in slides)},
        "num_questions": {k: len(v) for k, v in rows.items()},
        "slides": slides,
        "failed": [{"slide_id": k, "reason": v} for k, v in sorted(failed.items())],
        "timing": {"this_run_seconds": round(elapsed, 2), "generated_this_run": len(todo) - len(failed),
                   "slide_seconds_sum": round(sum(s["seconds"] for s in slides), 2), "workers": workers},
    }
    write_json_atomic(manifest_path, manifest)
    if log:
        log(f"{BENCHMARK_NAME}: {len(slides)} slides ({manifest['num_slides']}), "
            f"{sum(manifest['num_questions'].values())} questions, {len(failed)} failed, {elapsed:.1f} s -> {out}")
    return manifest


def load_manifest(bench_dir: os.PathLike | str) -> dict[str, Any]:
    """The benchmark's manifest; raises FileNotFoundError / ValueError naming the file."""
    path = pathlib.Path(bench_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no benchmark manifest (generate the benchmark first)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if m.get("name") != BENCHMARK_NAME or "slides" not in m:
        raise ValueError(f"{path}: not a {BENCHMARK_NAME} manifest")
    return m


# --------------------------------------------------------------------------------------------
# Evidence labels on a patch grid
# --------------------------------------------------------------------------------------------

def evidence_labels(coords: np.ndarray, patch_size_level0: float, boxes: Sequence[Sequence[float]],
                    min_box_fraction: float = 0.5) -> np.ndarray:
    """Which patches hold evidence.

    A patch [x, x + s) x [y, y + s) is evidence when it covers at least ``min_box_fraction`` of
    the area of some box (on the design grid every focus lies in one patch: exactly one label per
    focus; on another grid a focus split across patches marks the ones holding most of it).

    Args:
      coords: (N, 2) level-0 top-left (x, y) of the patches.
      patch_size_level0: patch side s in level-0 pixels.
      boxes: (M, 4) level-0 [x0, y0, x1, y1) boxes.

    Returns:
      (N,) bool.
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros(len(coords), bool)
    s = float(patch_size_level0)
    for x0, y0, x1, y1 in boxes:
        area = max((x1 - x0) * (y1 - y0), 1e-9)
        ix = np.clip(np.minimum(coords[:, 0] + s, x1) - np.maximum(coords[:, 0], x0), 0, None)
        iy = np.clip(np.minimum(coords[:, 1] + s, y1) - np.maximum(coords[:, 1], y0), 0, None)
        out |= ix * iy >= min_box_fraction * area
    return out


def annotate_features(h5_path: os.PathLike | str, evidence_json: os.PathLike | str,
                      min_box_fraction: float = 0.5) -> np.ndarray:
    """Add the ``evidence`` dataset ((N,) uint8, 1 on evidence patches) to a TRIDENT-layout bag.

    The patch side comes from the bag's ``coords`` attributes (``patch_size_level0_exact``, else
    ``patch_size_level0``). The file is rewritten atomically (copy, add, rename); the dataset's
    attributes record the kind, count and evidence JSON. Returns the labels.

    Raises:
      ValueError: the bag lacks coords or a patch size, or the evidence JSON is unusable.
    """
    import shutil

    import h5py

    h5_path, evidence_json = pathlib.Path(h5_path), pathlib.Path(evidence_json)
    try:
        rec = json.loads(evidence_json.read_text())
        boxes = [e["box"] for e in rec["evidence"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{evidence_json}: not a synthetic-slide evidence file ({type(err).__name__}: {err})") from err
    with h5py.File(h5_path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{h5_path}: no 'coords' dataset; cannot place evidence on patches")
        coords = np.asarray(f["coords"])
        a = f["coords"].attrs
        ps = a.get("patch_size_level0_exact", a.get("patch_size_level0"))
        if ps is None:
            raise ValueError(f"{h5_path}: coords carry no patch_size_level0(_exact) attribute")
    labels = evidence_labels(coords, float(ps), boxes, min_box_fraction)
    tmp = h5_path.with_name(f".{h5_path.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(h5_path, tmp)
        with h5py.File(tmp, "r+") as f:
            if "evidence" in f:
                del f["evidence"]
            ds = f.create_dataset("evidence", data=labels.astype(np.uint8))
            ds.attrs["kind"] = rec.get("kind", "")
            ds.attrs["count"] = int(rec.get("count", len(boxes)))
            ds.attrs["evidence_json"] = str(evidence_json.resolve())
            ds.attrs["min_box_fraction"] = float(min_box_fraction)
        os.replace(tmp, h5_path)
    finally:
        tmp.unlink(missing_ok=True)
    return labels


def annotate_feature_folder(features_dir: os.PathLike | str, bench_dir: os.PathLike | str,
                            log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """:func:`annotate_features` for every slide of the benchmark with a ``<slide>.h5`` in
    ``features_dir``; missing or bad bags are reported and skipped.

    Returns ``{"annotated": {slide: evidence patches}, "missing": [slide], "failed": {slide: reason},
    "foci_not_found": {slide: (foci, labelled patches)}}`` (the last lists slides where a focus
    fell outside the kept patches or two foci share a patch: they should not happen on the design grid).
    """
    feats, bench = pathlib.Path(features_dir), pathlib.Path(bench_dir)
    man = load_manifest(bench)
    report: dict[str, Any] = {"annotated": {}, "missing": [], "failed": {}, "foci_not_found": {}}
    for s in man["slides"]:
        sid = s["slide_id"]
        h5 = feats / f"{sid}.h5"
        if not h5.is_file():
            report["missing"].append(sid)
            continue
        try:
            labels = annotate_features(h5, bench / s["evidence_file"])
        except (OSError, ValueError, KeyError) as err:
            report["failed"][sid] = str(err)
            continue
        n = int(labels.sum())
        report["annotated"][sid] = n
        if n != s["count"]:
            report["foci_not_found"][sid] = (s["count"], n)
    if log:
        log(f"evidence flags: {len(report['annotated'])} bags annotated, {len(report['missing'])} without a bag, "
            f"{len(report['failed'])} failed, {len(report['foci_not_found'])} with a focus count mismatch")
        for sid, why in report["failed"].items():
            log(f"  FAILED {sid}: {why}")
    return report
