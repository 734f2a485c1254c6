"""``sparsewsi extract``: slides (files, folders, .txt lists) -> one TRIDENT-layout .h5 per slide.

    sparsewsi extract slides/ --out features/ --encoder conch --weights conch.safetensors
    sparsewsi extract a.svs b.tif --out feats/ --encoder tiny --mpp 0.25   # override for slides without mpp

Multi-host: start one process per host with ``--coordinator host:port --num-processes N
--process-id i`` (or ``--distributed-auto`` on SLURM / TPU / k8s); each takes its share of slides.
Exit status: 0 when no slide failed, 1 otherwise (the summary lists each failure's reason).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sparsewsi.features.encoders import PRESETS

    parser.add_argument("inputs", nargs="+", help="slide files, folders of slides, or .txt files listing slides")
    parser.add_argument("--out", required=True, help="output folder for <slide>.h5 (+ thumbnails/)")
    parser.add_argument("--encoder", default="tiny", choices=sorted(PRESETS), help="encoder structure")
    parser.add_argument("--weights", default=None, help=".safetensors or torch file (weights_only); default random init")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed when no --weights")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--target-mpp", type=float, default=0.5, help="um/px of the patches (0.5 = '20x')")
    parser.add_argument("--stride", type=int, default=None, help="grid step in output pixels (default: patch size)")
    parser.add_argument("--mode", choices=("exact", "nominal"), default="exact",
                        help="exact physical size, or TRIDENT-style nominal magnification")
    parser.add_argument("--min-tissue", type=float, default=0.25, help="keep patches with at least this tissue fraction")
    parser.add_argument("--mpp", type=float, default=None, help="level-0 um/px for slides that carry none")
    parser.add_argument("--force-mpp", action="store_true", help="use --mpp even when the slide has its own")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per device batch (all local devices)")
    parser.add_argument("--threads", type=int, default=2, help="tile-decoding threads")
    parser.add_argument("--slide-workers", type=int, default=1,
                        help="slides extracted at once (threads sharing the encoder; pays with many small slides)")
    parser.add_argument("--no-thumbnails", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 for a multi-host job")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--distributed-auto", action="store_true",
                        help="jax.distributed.initialize() with cluster auto-detection")


def run(args: argparse.Namespace) -> int:
    import jax

    from sparsewsi.features import extract

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            print("sparsewsi extract: --coordinator needs --num-processes and --process-id", file=sys.stderr)
            return 2
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed_auto:
        jax.distributed.initialize()
    cfg = extract.ExtractConfig(
        encoder=args.encoder, weights=args.weights, seed=args.seed, patch_size=args.patch_size,
        target_mpp=args.target_mpp, stride=args.stride, mode=args.mode, min_tissue=args.min_tissue,
        mpp_override=args.mpp, force_mpp=args.force_mpp, batch_size=args.batch_size, num_threads=args.threads,
        slide_workers=args.slide_workers, thumbnails=not args.no_thumbnails)
    slides = extract.list_slides(args.inputs)
    if not slides:
        print(f"sparsewsi extract: no slides found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    pi = jax.process_index()
    print(f"[process {pi}/{jax.process_count()}] {len(slides)} slides in total; encoder {cfg.encoder}; "
          f"{len(jax.local_devices())} local devices; config {dataclasses.asdict(cfg)}", flush=True)
    results = extract.run_extraction(slides, args.out, cfg, progress=not args.no_progress,
                                     log=lambda s: print(s, flush=True))
    path = extract.write_summary(args.out, results, pi)
    print(f"[process {pi}] summary ({path}): {extract.summarize(results)}", flush=True)
    return 1 if any(r.status == "failed" for r in results) else 0
