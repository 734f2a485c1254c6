"""Slides -> one TRIDENT-layout ``.h5`` feature file per slide.

Per slide: open (one handle in this process) -> tissue mask -> patch grid -> block reads in
background threads -> encoder on device batches -> ``features`` [N, D] float32 + ``coords`` [N, 2]
int64 written to a temporary file and renamed. Reruns skip slides whose output is valid for the
same encoder and weights. A bad slide is recorded with its reason and the job goes on.

Scale-out: batches are sharded over this process's devices with ``jax.jit`` and a named
sharding on a one-axis mesh ("data"); in a multi-host job (``jax.distributed`` initialised) each
process takes every ``process_count``-th slide of the sorted list and only uses its local
devices, so processes never wait on each other.

Output layout (readable by TRIDENT/CLAM tools and :func:`sparsewsi.features.readers.read_feature_bag`):
datasets ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 top-left (x, y); attributes
on ``coords``: ``patch_size``, ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``, ``name``, plus ours:
``target_mpp``, ``mpp``, ``mpp_source``, ``read_level``, ``read_downsample``, ``grid_mode``,
``patch_size_level0_exact``, ``stride_level0``, ``min_tissue``, ``encoder``, ``encoder_config``,
``encoder_weights_sha256``, ``tissue_params``, ``tissue_threshold``, ``code_version``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from typing import Callable, Iterable, Sequence

import numpy as np

from sparsewsi.atomic import atomic_path, write_json_atomic
from sparsewsi.slides.grid import patch_grid
from sparsewsi.slides.tiles import iter_batches
from sparsewsi.slides.tissue import TissueParams, detect_tissue, save_thumbnail
from sparsewsi.slides.wsi import SlideError, open_slide

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the content of a feature file (plus throughput knobs)."""

    encoder: str = "tiny"
    weights: str | None = None  # .safetensors / .pth; None = random init with `seed` (tests, demos)
    seed: int = 0
    patch_size: int = 224
    target_mpp: float = 0.5
    stride: int | None = None
    mode: str = "exact"  # "exact" | "nominal" (TRIDENT-compatible magnification rounding)
    min_tissue: float = 0.25
    mpp_override: float | None = None
    force_mpp: bool = False
    tissue: TissueParams = TissueParams()
    batch_size: int = 64
    num_threads: int = 2
    # Slides extracted at once (threads sharing the one jitted encoder): a slide's own work (opening,
    # tissue mask, grid, writing) is serial Python, so with small slides one slide at a time leaves cores idle.
    slide_workers: int = 1
    block_px: int = 3072
    thumbnails: bool = True


@dataclasses.dataclass
class SlideResult:
    slide: str
    status: str  # "done" | "skipped" | "failed"
    output: str | None = None
    patches: int = 0
    seconds: float = 0.0
    reason: str = ""


def list_slides(inputs: Sequence[str]) -> list[str]:
    """Slide paths from files, folders (non-recursive, by suffix) and ``.txt`` lists (one path a line).

    Paths that do not exist are kept (they fail later with a clear reason) so the summary lists them.
    """
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            out += [os.path.join(item, n) for n in sorted(os.listdir(item)) if n.lower().endswith(SLIDE_SUFFIXES)]
        elif item.lower().endswith(".txt") and os.path.isfile(item):
            with open(item) as f:
                out += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        else:
            out.append(item)
    return sorted(dict.fromkeys(os.path.abspath(p) for p in out))


def slides_for_process(slides: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This process's share of the sorted slide list (round robin: balanced, deterministic)."""
    return list(sorted(slides))[process_index::process_count]


def slide_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ome.tiff", ".ome.tif") + SLIDE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


class DeviceEncoder:
    """The encoder as a jitted function over this process's devices, batch axis sharded on "data".

    ``encode(patches)``: (b, P, P, 3) uint8 with b <= batch_size -> (b, D) float32 numpy.
    ``submit`` / ``result`` split dispatch from the host copy so the next batch can be read while
    the device computes (JAX dispatch is asynchronous).
    """

    def __init__(self, cfg: ExtractConfig):
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P

        from sparsewsi.features import encoders, weights

        self.model_cfg = encoders.get_config(cfg.encoder)
        model = encoders.create_encoder(self.model_cfg, seed=cfg.seed)
        if cfg.weights:
            model, self.weights_sha256 = weights.load_weights(model, cfg.weights)
        else:
            self.weights_sha256 = f"random-init-seed-{cfg.seed}"
        devices = jax.local_devices()
        self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                  devices=devices)
        n = len(devices)
        self.batch_size = -(-max(cfg.batch_size, 1) // n) * n  # a multiple of the device count
        self.data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, replicated)
        mcfg = self.model_cfg

        def forward(state, images):
            m = nnx.merge(graphdef, state)
            return m(encoders.preprocess(images, mcfg))

        self._fn = jax.jit(forward, in_shardings=(replicated, self.data), out_shardings=self.data)
        self.output_dim = mcfg.output_dim
        self._jax = jax

    def submit(self, patches: np.ndarray):
        b = patches.shape[0]
        if b < self.batch_size:  # pad: one compiled shape for every batch
            pad = np.zeros((self.batch_size - b,) + patches.shape[1:], patches.dtype)
            patches = np.concatenate([patches, pad])
        x = self._jax.device_put(patches, self.data)
        return self._fn(self.state, x), b

    @staticmethod
    def result(handle) -> np.ndarray:
        out, b = handle
        return np.asarray(out)[:b].astype(np.float32)

    def encode(self, patches: np.ndarray) -> np.ndarray:
        return self.result(self.submit(patches))


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def output_is_valid(path: str, encoder: str, weights_sha256: str) -> bool:
    """True when ``path`` is a complete feature file from the same encoder and weights."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            feats, coords = f["features"], f["coords"]
            a = coords.attrs
            return (feats.ndim == 2 and coords.shape == (feats.shape[0], 2) and feats.shape[0] > 0
                    and str(a.get("encoder", "")) == encoder
                    and str(a.get("encoder_weights_sha256", "")) == weights_sha256)
    except (OSError, KeyError, ValueError):
        return False


def write_features_h5(path: str, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    """Write the TRIDENT layout atomically: a temporary file in the same folder, then rename."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v
        f["features"].attrs["encoder"] = attrs.get("encoder", "")


def extract_slide(path: str, out_dir: str, encoder: DeviceEncoder, cfg: ExtractConfig, *,
                  progress: bool = False) -> SlideResult:
    """Extract one slide into ``out_dir/<name>.h5``; never raises for a bad slide (status "failed")."""
    from sparsewsi import __version__

    t0 = time.perf_counter()
    name = slide_name(path)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{name}.h5")
    res = SlideResult(slide=path, status="failed", output=out)
    if output_is_valid(out, encoder.model_cfg.name, encoder.weights_sha256):
        res.status, res.reason = "skipped", "valid output exists"
        return res
    slide = None
    try:
        slide = open_slide(path, cfg.mpp_override, force_override=cfg.force_mpp)
        tissue = detect_tissue(slide, cfg.tissue)
        if not tissue.mask.any():
            raise SlideError(f"{path}: no tissue found (saturation threshold {tissue.threshold}, "
                             f"mask at {tissue.mpp:.1f} um/px)")
        grid = patch_grid(slide, tissue, patch_size=cfg.patch_size, target_mpp=cfg.target_mpp, stride=cfg.stride,
                          min_tissue=cfg.min_tissue, mode=cfg.mode)
        if len(grid) == 0:
            raise SlideError(f"{path}: tissue found ({tissue.tissue_fraction:.1%} of the slide) but no patch "
                             f"reaches the tissue fraction {cfg.min_tissue}")
        feats = np.empty((len(grid), encoder.output_dim), np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid), unit="patch", desc=name, leave=False, dynamic_ncols=True)
        pending = None  # one batch in flight on the device while the next is read
        for idx, px in iter_batches(slide, grid, encoder.batch_size, block_px=cfg.block_px,
                                    num_threads=cfg.num_threads):
            handle = encoder.submit(px)
            if pending is not None:
                feats[pending[0]] = encoder.result(pending[1])
                if bar is not None:
                    bar.update(len(pending[0]))
            pending = (idx, handle)
        if pending is not None:
            feats[pending[0]] = encoder.result(pending[1])
            if bar is not None:
                bar.update(len(pending[0]))
        if bar is not None:
            bar.close()
        if not np.isfinite(feats).all():
            raise SlideError(f"{path}: the encoder produced non-finite features")
        W, H = slide.dimensions
        attrs = {
            "patch_size": int(cfg.patch_size),
            "patch_size_level0": int(round(grid.patch_size_level0)),
            "level0_magnification": float(grid.level0_magnification),
            "target_magnification": float(grid.target_magnification),
            "overlap": int(grid.overlap),
            "level0_width": int(W),
            "level0_height": int(H),
            "name": name,
            "target_mpp": float(grid.target_mpp),
            "mpp": float(slide.mpp),
            "mpp_source": slide.mpp_info.source,
            "mpp_notes": "; ".join(slide.mpp_info.notes),
            "read_level": int(grid.level.level),
            "read_downsample": float(grid.level.downsample),
            "grid_mode": grid.mode,
            "patch_size_level0_exact": float(grid.patch_size_level0),
            "stride_level0": float(grid.stride_level0),
            "min_tissue": float(cfg.min_tissue),
            "encoder": encoder.model_cfg.name,
            "encoder_config": _json(dataclasses.asdict(encoder.model_cfg)),
            "encoder_weights_sha256": encoder.weights_sha256,
            "tissue_params": _json(dataclasses.asdict(cfg.tissue)),
            "tissue_threshold": int(tissue.threshold),
            "code_version": __version__,
            "source_path": os.path.abspath(path),
        }
        write_features_h5(out, feats, grid.coords, attrs)
        if cfg.thumbnails:
            os.makedirs(os.path.join(out_dir, "thumbnails"), exist_ok=True)
            save_thumbnail(os.path.join(out_dir, "thumbnails", f"{name}.png"), tissue, grid.coords,
                           grid.patch_size_level0)
        res.status, res.patches = "done", len(grid)
    except SlideError as err:
        res.reason = str(err)
    except Exception as err:  # keep the batch going; report what happened
        where = traceback.extract_tb(err.__traceback__)[-1]
        res.reason = f"{path}: {type(err).__name__}: {err} (at {os.path.basename(where.filename)}:{where.lineno})"
    finally:
        if slide is not None:
            slide.close()
    if res.status == "failed":
        res.output = None  # nothing was written for this slide
    res.seconds = time.perf_counter() - t0
    return res


def run_extraction(slides: Iterable[str], out_dir: str, cfg: ExtractConfig, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> list[SlideResult]:
    """Extract this process's share of ``slides`` (all of them in a single-process job)."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    pi, pc = jax.process_index(), jax.process_count()
    mine = slides_for_process(list(slides), pi, pc)
    results: list[SlideResult] = []
    seen: dict[str, str] = {}
    todo = []
    for path in mine:
        name = slide_name(path)
        if name in seen:  # two inputs would write the same output file
            results.append(SlideResult(path, "failed", None, reason=f"{path}: output name {name!r} is already "
                                       f"used by {seen[name]}"))
            continue
        seen[name] = path
        todo.append(path)
    encoder = DeviceEncoder(cfg) if todo else None
    workers = max(1, int(cfg.slide_workers))

    def report(i: int, path: str, r: SlideResult) -> None:
        # With several slides at once a slide's patches / seconds is its latency while it shared the encoder,
        # not a throughput: the rate is then logged once, over the whole job (below).
        rate = (f", {r.patches / r.seconds:.0f} patches/s" if workers == 1 and r.status == "done" and r.seconds > 0
                else "")
        log(f"[process {pi}/{pc}] {i}/{len(todo)} {r.status}: {slide_name(path)}"
            f" ({r.patches} patches, {r.seconds:.1f} s{rate}){' - ' + r.reason if r.status == 'failed' else ''}")

    if workers == 1:
        for i, path in enumerate(todo):
            r = extract_slide(path, out_dir, encoder, cfg, progress=progress)
            results.append(r)
            report(i + 1, path, r)
        return results
    # Several slides at once: the per-slide bars would interleave, so progress is one bar over slides.
    from concurrent import futures

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="slide", desc="extract", dynamic_ncols=True)
    by_path: dict[str, SlideResult] = {}
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparsewsi-slide") as pool:
        jobs = {pool.submit(extract_slide, path, out_dir, encoder, cfg): path for path in todo}
        for i, job in enumerate(futures.as_completed(jobs)):
            path = jobs[job]
            by_path[path] = r = job.result()  # extract_slide never raises for a bad slide
            report(i + 1, path, r)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    done = sum(r.patches for r in by_path.values() if r.status == "done")
    if done and wall > 0:
        log(f"[process {pi}/{pc}] {workers} slides at once: {done} patches in {wall:.1f} s, {done / wall:.0f} patches/s")
    results.extend(by_path[path] for path in todo)  # input order, whatever order they finished in
    return results


def summarize(results: Sequence[SlideResult]) -> str:
    """A human summary: counts of done / skipped / failed and the reason for each failure."""
    by = {s: [r for r in results if r.status == s] for s in ("done", "skipped", "failed")}
    lines = [f"done {len(by['done'])}, skipped {len(by['skipped'])}, failed {len(by['failed'])}"
             f" ({sum(r.patches for r in by['done'])} patches)"]
    for r in by["failed"]:
        lines.append(f"  FAILED {r.reason if r.reason.startswith(r.slide) else f'{r.slide}: {r.reason}'}")
    return "\n".join(lines)


def write_summary(out_dir: str, results: Sequence[SlideResult], process_index: int = 0) -> str:
    """``extract_summary.process<i>.json`` (atomic); returns its path."""
    path = os.path.join(out_dir, f"extract_summary.process{process_index}.json")
    write_json_atomic(path, [dataclasses.asdict(r) for r in results])
    return path
