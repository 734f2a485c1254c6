"""Evaluator throughput: questions/s batched vs one question at a time, same tiny model, side by side.

    .venv/bin/python benchmarks/eval_throughput.py [--questions 64] [--batch 8] [--k 32] [--devices 1]

One process, the same generated benchmark (real SlideBench-VQA-BCNB questions when
``../shared/data`` is there, else generated ones; TRIDENT-layout .h5 bags of 500-3000 patches x
D = 512, a few questions per slide), the same tiny random LLM + projector + learned hard top-k at
budget k, greedy decoding of ``--new-tokens`` tokens. Both rows go through the whole evaluator
(``run_shard``: bag reading, prompt building, generation, JSON lines with fsync) into fresh run
folders:

* ``one at a time``: batch size 1 (each question is its own compiled call);
* ``batched``: ``--batch`` questions per call, split over the local devices.

Compilation is excluded from both (a warm-up run on the same shapes first) and reported apart.
Also checks the two runs produced the same replies. Writes ``benchmarks/results/eval_throughput.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--devices", type=int, default=1, help="simulated CPU devices (XLA host platform count)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput"))
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import h5py
    import jax
    import numpy as np

    from sparsewsi.evaluation.items import load_eval_set
    from sparsewsi.evaluation.predictor import build_tiny_predictor
    from sparsewsi.evaluation.runner import BagSource, collect, run_shard, shard_files

    d = 512
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="eval_bench_"))
    shared = REPO.parent / "shared" / "data" / "SlideBench-VQA-BCNB.csv"
    if shared.is_file():
        lines = shared.read_text(encoding="utf-8").splitlines()
        # 4 questions per slide (slide-sorted runs reuse the cached bag, as on the real benchmark)
        header, body = lines[0], lines[1:]
        body = sorted(body, key=lambda l: l.split(",")[1])[: args.questions]
        source_name = f"{shared.name} (first {args.questions} rows by slide)"
    else:
        header = "ID,Slide,Task,Question,A,B,C,D,Answer"
        body = [f"{i},{i // 4},ER,What is the ER status of this tumour?,Positive,Negative,,,A" for i in range(args.questions)]
        source_name = "generated questions"
    data = tmp / "bench.csv"
    data.write_text("\n".join([header] + body) + "\n", encoding="utf-8")
    items = load_eval_set(data).items
    feats = tmp / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    sizes = []
    for s in sorted({it.slide_id for it in items}):
        n = int(rng.integers(500, 3000))
        sizes.append(n)
        with h5py.File(feats / f"{s}.h5", "w") as f:
            f["features"] = rng.normal(size=(n, d)).astype(np.float32)
            f["coords"] = (rng.integers(0, 200, size=(n, 2)) * 256).astype(np.int64)

    def timed(batch: int, name: str, selector: str):
        # one at a time = one question on one device; batched = the batch split over all local devices
        devices = jax.local_devices()[:1] if batch == 1 else None
        predictor = build_tiny_predictor(d, selector=selector, k=args.k, batch_size=batch,
                                         max_new_tokens=args.new_tokens, devices=devices)
        source = BagSource(feats)
        t0 = time.perf_counter()
        run_shard(items, predictor, source.prepare, tmp / f"warm-{selector}-{batch}", batch_size=batch)  # compiles every shape
        compile_and_first = time.perf_counter() - t0
        stats = run_shard(items, predictor, source.prepare, tmp / f"run-{selector}-{batch}", batch_size=batch)
        preds, _, _ = collect(shard_files(tmp / f"run-{selector}-{batch}"))
        return {"name": name, "selector": selector, "batch_size": predictor.batch_size, "questions": stats.evaluated,
                "seconds": stats.seconds, "questions_per_s": stats.questions_per_second,
                "first_pass_s_incl_compile": compile_and_first}, preds

    rows, speedup, identical = [], {}, {}
    for selector in ("learned", "uniform"):
        single, p1 = timed(1, "one at a time", selector)
        batched, pb = timed(args.batch, "batched", selector)
        rows += [single, batched]
        speedup[selector] = batched["questions_per_s"] / single["questions_per_s"]
        identical[selector] = f"{sum(p1[i] == pb[i] for i in p1)}/{len(p1)}"
    result = {
        "benchmark": "evaluator throughput (questions/s), tiny random LLM, learned hard top-k and uniform selection",
        "data": source_name, "questions": len(items), "slides": len(sizes), "patches_per_slide": [min(sizes), max(sizes)],
        "feature_dim": d, "k": args.k, "max_new_tokens": args.new_tokens, "devices": len(jax.local_devices()),
        "rows": rows, "speedup": speedup, "identical_replies": identical,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.default_backend()}",
        "load_average_at_end": os.getloadavg(),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Evaluator throughput: batched vs one question at a time", "",
        f"`benchmarks/eval_throughput.py --questions {args.questions} --batch {args.batch} --k {args.k} "
        f"--devices {args.devices}`; {result['machine']}.", "",
        f"{len(items)} questions ({source_name}) on {len(sizes)} slides of {min(sizes)}-{max(sizes)} patches x {d}; "
        f"tiny random Qwen2-style LLM, k={args.k} tokens chosen by the learned path (whole padded bag sent to the "
        f"device, scored, hard top-k) or uniform (host picks, only k rows sent), greedy {args.new_tokens} new tokens; "
        "whole evaluator (bag reading, prompts, generation, JSONL with fsync); compilation excluded.", "",
        "| selector | evaluator | batch | questions/s | seconds | first pass incl. compile (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        md.append(f"| {r['selector']} | {r['name']} | {r['batch_size']} | {r['questions_per_s']:.2f} | {r['seconds']:.2f} | "
                  f"{r['first_pass_s_incl_compile']:.1f} |")
    md += ["", f"Load average of the (shared) machine at the end: {', '.join(f'{x:.1f}' for x in result['load_average_at_end'])}."]
    md += ["", "Speedup of batching: " + ", ".join(f"{s} {v:.2f}x" for s, v in speedup.items())
           + ". Identical replies, batched vs one at a time: " + ", ".join(f"{s} {v}" for s, v in identical.items()) + ".",
           "", "Reading: on XLA:CPU the tiny model's per-question cost grows linearly with the batch (no idle compute "
           "units for a batch to fill), so batching cannot pay here; the learned path also pads each batch to the "
           "bucket of its largest bag and ships whole bags, where one question at a time pads only its own. "
           "Batching is for accelerators, where a batch of one leaves the device idle; no accelerator was "
           "available to this measurement.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
