"""``sparsewsi eval``: evaluate a model on SlideBench-VQA / WSI-VQA / SlideBench-Caption, sharded and resumable.

Examples::

    # one host, a trained checkpoint (trainer workdir), the learned selector at k = 32
    sparsewsi eval --data SlideBench-VQA-BCNB.csv --features feats/ --checkpoint runs/stage2 \\
        --selector learned --k 32 --out runs/eval-bcnb-learned

    # an exported model (`sparsewsi export`: Hugging Face LLM folder + selector) works the same way
    sparsewsi eval --data SlideBench-VQA-BCNB.csv --features feats/ --checkpoint exports/stage2 --out runs/eval-exp

    # the same budget with a sampling baseline
    sparsewsi eval ... --selector uniform --out runs/eval-bcnb-uniform

    # N hosts: each runs its shard (or --distributed to take them from jax.distributed)
    sparsewsi eval ... --shard $i --num-shards N --out runs/eval-bcnb     # then: sparsewsi score --run ...

Each question's reply is appended to ``<out>/predictions.shardXXXXX-ofYYYYY.jsonl`` as soon as its
batch finishes; rerunning the same command resumes. After its shard, a process merges whatever the
folder holds into ``results.json``, ``results.md`` and ``results.png`` (``complete`` says whether
every question is in).
"""

from __future__ import annotations

import argparse
import json
import sys

SELECTOR_CHOICES = ("learned", "random", "uniform", "spatial", "all", "oracle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="benchmark file: SlideBench-VQA/Caption CSV or WSI-VQA JSON")
    parser.add_argument("--features", required=True, help="folder of per-slide feature files (.h5 / .csv / .pt)")
    parser.add_argument("--out", required=True, help="run folder (created; rerun to resume)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="trained model: a trainer workdir, <workdir>/checkpoints/<step>, or a `sparsewsi export` folder")
    model.add_argument("--tiny", action="store_true",
                       help="a random tiny LLM + projector (pipeline dry runs and benchmarks; answers are noise)")
    parser.add_argument("--selector", default="learned", choices=SELECTOR_CHOICES,
                        help="token selector at the same budget k (oracle needs 'evidence' in the .h5 bags)")
    parser.add_argument("--k", type=int, default=32, help="visual-token budget (the cap for --selector all)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per compiled call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-patches", type=int, default=38400, help="evenly sub-sample larger bags (SlideChat: 38400)")
    parser.add_argument("--csv-feature-columns", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=None, help="this process's shard (default 0 or jax process index)")
    parser.add_argument("--num-shards", type=int, default=None, help="number of shards (default 1 or jax process count)")
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() and shard by process")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many new questions, then stop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selectors")
    parser.add_argument("--no-merge", action="store_true", help="do not write results after this shard")


def build_predictor(args, feature_dim: int):
    """The predictor the flags ask for (``--checkpoint`` through ``sparsewsi.model``, or ``--tiny``)."""
    from sparsewsi.evaluation.predictor import CheckpointPredictor, build_tiny_predictor

    if args.tiny:
        return build_tiny_predictor(feature_dim, selector=args.selector, k=args.k, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    from sparsewsi.model import SparseWSIPredictor, load_checkpoint

    model, tokenizer, spec = load_checkpoint(args.checkpoint)
    if model.config.feature_dim != feature_dim:
        raise ValueError(f"{args.checkpoint}: the model expects {model.config.feature_dim}-wide features, "
                         f"the bags under {args.features} are {feature_dim}-wide")
    inner = SparseWSIPredictor(model, tokenizer, k=args.k, max_new_tokens=args.max_new_tokens, all_tokens_cap=args.k)
    return CheckpointPredictor(inner, selector=args.selector, batch_size=args.batch_size, seed=args.seed,
                               describe={"name": f"checkpoint:{args.checkpoint}", "spec": json.loads(spec.to_json())})


def run(args) -> int:
    import jax

    from sparsewsi.datasets import DatasetFileError
    from sparsewsi.evaluation.items import load_eval_set
    from sparsewsi.evaluation.report import merge_run
    from sparsewsi.evaluation.runner import BagSource, RunError, SkipItem, ensure_manifest, manifest_for, run_shard

    if args.distributed:
        jax.distributed.initialize()
    shard = args.shard if args.shard is not None else jax.process_index()
    num_shards = args.num_shards if args.num_shards is not None else jax.process_count()
    try:
        eval_set = load_eval_set(args.data)
    except DatasetFileError as e:
        print(f"sparsewsi eval: {e}", file=sys.stderr)
        return 2
    print(f"{eval_set.path.name}: {eval_set.layout}, {len(eval_set.items)} questions, sha256 {eval_set.sha256[:12]}, "
          f"{len(eval_set.problems)} malformed row(s)" + "".join(f"\n  {p}" for p in eval_set.problems[:20]))
    source = BagSource(args.features, prefix=eval_set.layout == "wsi-vqa-json", max_patches=args.max_patches)

    def prepare(item):
        q = source.prepare(item)
        if args.selector == "spatial" and q.coords is None:
            raise SkipItem("no_coords", f"slide {item.slide_id}: the feature file has no coordinates (spatial selector)")
        if args.selector == "oracle" and q.evidence is None:
            raise SkipItem("no_evidence", f"slide {item.slide_id}: no ground-truth 'evidence' in the bag (oracle)")
        return q

    feature_dim = None
    for item in eval_set.items:  # the feature width, from the first slide that has a file
        try:
            feature_dim = source.load(item)[0].shape[1]
            break
        except SkipItem:
            continue
    if feature_dim is None:
        print(f"sparsewsi eval: no question of {args.data} has a readable feature file under {args.features}",
              file=sys.stderr)
        return 2
    predictor = build_predictor(args, feature_dim)
    config = {k: getattr(args, k) for k in ("batch_size", "max_new_tokens", "max_patches", "seed")}
    try:
        ensure_manifest(args.out, manifest_for(eval_set, predictor.describe(), num_shards, config))
        stats = run_shard(eval_set.items, predictor, prepare, args.out, shard=shard, num_shards=num_shards,
                          batch_size=args.batch_size, limit=args.limit, log=lambda m: print(m, flush=True))
    except RunError as e:
        print(f"sparsewsi eval: {e}", file=sys.stderr)
        return 2
    print(f"shard {shard}/{num_shards}: {stats.assigned} assigned, {stats.already_done} already done, "
          f"{stats.evaluated} evaluated, {stats.skipped} skipped, {stats.questions_per_second:.2f} questions/s")
    if not args.no_merge:
        results = merge_run(args.out, eval_set)
        print(f"results: {args.out}/results.md (complete: {results['complete']})")
    return 0
