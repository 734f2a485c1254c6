"""Input-pipeline throughput: bags/s for 4k-patch bags from .h5 and CSV, side by side.

    .venv/bin/python benchmarks/input_pipeline.py [--slides 12] [--batch 4]

Runs in one process, on the same generated files (N = 4096 patches x D = 512, CONCH-sized):

* ``plain loop``: what a user writes without a pipeline: ``h5py`` -> numpy for .h5, ``csv`` +
  ``float`` for CSV, one bag after another, no tokenisation.
* ``pipeline w=0`` / ``w=2``: the grain pipeline of ``data_pipelines.pipeline`` (read, cap,
  pad to buckets, chat-template tokenisation, collate) in-process and with 2 reader processes.
* ``train step``: a jitted CPU proxy step (projection of every patch, softmax attention pooling,
  gradient) on the same batch shape, to show whether loading keeps up with a step.

Writes ``benchmarks/results/input_pipeline.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import h5py
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

N, D = 4096, 512


def write_bags(root: pathlib.Path, slides: int) -> list[str]:
    rng = np.random.default_rng(0)
    ids = [f"TCGA-BM-{k:04d}" for k in range(slides)]
    (root / "h5").mkdir(parents=True)
    (root / "csv").mkdir()
    for pid in ids:
        feats = rng.normal(size=(N, D)).astype(np.float32)
        coords = rng.integers(0, 100_000, size=(N, 2))
        with h5py.File(root / "h5" / f"{pid}-01Z-00-DX1.h5", "w") as f:
            f["features"] = feats
            f["coords"] = coords
        with open(root / "csv" / f"{pid}-01Z-00-DX1.csv", "w") as f:
            f.write(",".join([str(i) for i in range(D)] + ["name"]) + "\n")
            for (x, y), row in zip(coords, feats):
                f.write(",".join(f"{v:.6f}" for v in row) + f",{x}_{y}.jpg\n")
    return ids


def plain_loop(files: list[pathlib.Path]) -> float:
    t = time.perf_counter()
    for p in files:
        if p.suffix == ".h5":
            with h5py.File(p, "r") as f:
                feats = np.asarray(f["features"][()], np.float32)
        else:
            with open(p, newline="") as f:
                rows = list(csv.reader(f))[1:]
            feats = np.array([[float(v) for v in r[:D]] for r in rows], np.float32)
        assert feats.shape == (N, D)
    return len(files) / (time.perf_counter() - t)


def pipeline_rate(data_path, features_root, tok, workers: int, batch: int, bags: int) -> float:
    from data_pipelines.pipeline import InputPipeline, PipelineConfig

    cfg = PipelineConfig(batch_size=batch, max_patches=N, patch_buckets=(N,), token_buckets=(256, 512),
                         feature_dim=D, csv_feature_columns=D, num_epochs=None, worker_count=workers,
                         worker_buffer_size=2, read_threads=4)
    it = iter(InputPipeline(data_path, "train", tok, cfg, features_root=features_root, shard_index=0, shard_count=1))
    next(it)  # start-up (worker processes, first reads) is not throughput
    steps = max(2, bags // batch)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        assert b["features"].shape == (batch, N, D) and b["example_valid"].all()
    return steps * batch / (time.perf_counter() - t)


def train_step_rate(batch: int) -> float:
    import jax
    import jax.numpy as jnp

    def loss(params, x, m):
        h = jnp.tanh(x @ params["w"])                    # [B, N, D] -> [B, N, D]
        s = jnp.where(m, h @ params["q"], -1e9)          # [B, N]
        pooled = jnp.einsum("bn,bnd->bd", jax.nn.softmax(s, -1), h)
        return jnp.mean(pooled**2)

    step = jax.jit(jax.value_and_grad(loss))
    params = {"w": jnp.ones((D, D)) * 0.01, "q": jnp.ones((D,)) * 0.01}
    x, m = jnp.ones((batch, N, D)), jnp.ones((batch, N), bool)
    jax.block_until_ready(step(params, x, m))
    t, reps = time.perf_counter(), 5
    for _ in range(reps):
        jax.block_until_ready(step(params, x, m))
    return reps * batch / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    from data_pipelines.build import build
    from test_data_pipelines import tiny_tokenizer

    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        t0 = time.perf_counter()
        ids = write_bags(root, args.slides)
        print(f"wrote {args.slides} bags per format in {time.perf_counter() - t0:.1f}s", flush=True)
        records = [{"Id": pid, "Question": f"what is shown in slide {k}?", "Answer": "invasive ductal carcinoma"}
                   for k, pid in enumerate(ids)]
        (root / "q.json").write_text(json.dumps(records))
        rows = []
        step = train_step_rate(args.batch)
        for fmt in ("h5", "csv"):
            builder = build("wsi_vqa", {"train": root / "q.json"}, features_root=root / fmt,
                            data_dir=root / f"tfds_{fmt}", feature_dim=D, csv_feature_columns=D, validate_features=False)
            files = sorted((root / fmt).iterdir())
            row = {"format": fmt, "bag": f"{N}x{D}",
                   "plain_loop_bags_per_s": plain_loop(files),
                   "pipeline_w0_bags_per_s": pipeline_rate(builder.data_path, root / fmt, tok, 0, args.batch, 2 * len(files)),
                   "pipeline_w2_bags_per_s": pipeline_rate(builder.data_path, root / fmt, tok, 2, args.batch, 2 * len(files)),
                   "train_step_bags_per_s": step}
            row["keeps_step_fed"] = max(row["pipeline_w0_bags_per_s"], row["pipeline_w2_bags_per_s"]) >= step
            rows.append(row)
            print(row, flush=True)
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "batch": args.batch, "slides": args.slides}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_pipeline.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    md = ["# Input pipeline: bags/s (4096 x 512 bags)", "",
          f"{env['cpus']} CPU cores, batch {args.batch}, {args.slides} bags per format; "
          "train step = jitted CPU proxy (patch projection + attention pooling + gradient).", "",
          "| format | plain loop | pipeline w=0 | pipeline w=2 | train step needs | fed? |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['format']} | {r['plain_loop_bags_per_s']:.1f} | {r['pipeline_w0_bags_per_s']:.1f} | "
                  f"{r['pipeline_w2_bags_per_s']:.1f} | {r['train_step_bags_per_s']:.1f} | {'yes' if r['keeps_step_fed'] else 'no'} |")
    (out / "input_pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
