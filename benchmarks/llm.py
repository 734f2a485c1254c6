"""Prefill and decode throughput: our jitted NNX decoder vs transformers PyTorch, side by side, on CPU.

Both run the same random Qwen2 checkpoint (built here, written with ``save_pretrained`` and imported
with ``sparsewsi.llm.load_hf``) in float32 on the same prompts; greedy decoding is checked to give
identical tokens before any timing counts. Prefill = one forward pass over the prompt batch
(logits for every position). Decode rate = B * (N - 1) / (t(generate N tokens) - t(generate 1 token)),
so prompt processing cancels out; generation always runs to N tokens (no stop token).
Compile time (first call minus a steady-state call) is reported separately.

    .venv/bin/python benchmarks/llm.py            # writes benchmarks/results/llm.{json,md}
    .venv/bin/python benchmarks/llm.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _load_stack(threads: int):
    """Import jax / torch / transformers / sparsewsi.llm after setting the thread counts."""
    if threads == 1:
        # Must be set before jax is imported: one intra-op thread, like torch.set_num_threads(1).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from sparsewsi import llm

    return jax, jnp, torch, transformers, llm


def timed_interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
    """First-call seconds and median steady-state seconds of each function.

    The functions are timed in turn within each repetition, so a burst of load from other processes on
    a shared machine hits both sides alike instead of one side's whole measurement.
    """
    first, times = {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return first, {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads per side: torch.set_num_threads, and for 1 a single-threaded XLA CPU "
                         "(0: each library's default). One thread keeps the comparison fair on a shared machine.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (results not written)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 64, 2, 128, 512
        args.prompt, args.new_tokens, args.batches, args.reps = 16, 8, [2], 2
    jax, jnp, torch, transformers, llm = _load_stack(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.1)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = llm.load_hf(tmp)

    load_before = os.getloadavg()
    forward = jax.jit(lambda m, ids: m(ids))
    rows = []
    for b in args.batches:
        ids_np = np.random.RandomState(b).randint(0, args.vocab, (b, args.prompt))
        ids_j, ids_t = jnp.asarray(ids_np), torch.tensor(ids_np)

        # Identical greedy tokens before timing anything.
        ref_tokens = hf.generate(ids_t, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[:, args.prompt:].numpy()
        our_tokens, _ = llm.generate(ours, ids_np, max_new_tokens=args.new_tokens, stop_token_ids=())
        identical = bool((ref_tokens == our_tokens).all())

        def jax_prefill():
            forward(ours, ids_j).block_until_ready()

        def torch_prefill():
            with torch.no_grad():
                hf(ids_t)

        def jax_gen(n):
            return lambda: llm.generate(ours, ids_np, max_new_tokens=n, stop_token_ids=())

        def torch_gen(n):
            def run():
                with torch.no_grad():
                    hf.generate(ids_t, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
            return run

        fns = {("jax", "prefill"): jax_prefill, ("jax", "gen1"): jax_gen(1), ("jax", "genN"): jax_gen(args.new_tokens),
               ("torch", "prefill"): torch_prefill, ("torch", "gen1"): torch_gen(1),
               ("torch", "genN"): torch_gen(args.new_tokens)}
        first, med = timed_interleaved(fns, args.reps)
        r = {"batch": b, "prompt": args.prompt, "new_tokens": args.new_tokens, "greedy_tokens_identical": identical}
        for name in ("jax", "torch"):
            r[name] = {
                "prefill_tokens_per_s": b * args.prompt / med[name, "prefill"],
                "decode_tokens_per_s": b * (args.new_tokens - 1) / max(med[name, "genN"] - med[name, "gen1"], 1e-9),
                "prefill_seconds": med[name, "prefill"],
                "generate_seconds": med[name, "genN"],
            }
        # Compilation happens on JAX's first call only (PyTorch eager has none).
        r["jax"]["compile_seconds"] = {"prefill": first["jax", "prefill"] - med["jax", "prefill"],
                                       "generate": sum(first["jax", k] - med["jax", k] for k in ("gen1", "genN"))}
        rows.append(r)
        print(json.dumps(r))

    if args.quick:
        return 0
    result = {
        "benchmark": "llm prefill/decode, float32, CPU",
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "threads_per_side": args.threads, "torch_threads": torch.get_num_threads(),
                    "load_average_before_after": [load_before[0], os.getloadavg()[0]]},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# LLM throughput: sparsewsi.llm (JAX, jitted) vs transformers PyTorch, CPU float32", "",
        f"Config: {result['config']}; {os.cpu_count()} CPU cores (shared; 1-min load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after), "
        f"threads per side {args.threads or 'default'} (torch {torch.get_num_threads()}).",
        "Decode = B * (N - 1) / (t(N new tokens) - t(1 new token)); medians of interleaved repetitions.", "",
        "| batch | prompt | new | prefill tok/s JAX | prefill tok/s torch | decode tok/s JAX | decode tok/s torch "
        "| decode speed-up | JAX compile s (prefill / generate) | greedy identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        j, t = r["jax"], r["torch"]
        lines.append(
            f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {j['prefill_tokens_per_s']:.0f} | "
            f"{t['prefill_tokens_per_s']:.0f} | {j['decode_tokens_per_s']:.0f} | {t['decode_tokens_per_s']:.0f} | "
            f"{j['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x | {j['compile_seconds']['prefill']:.1f} / "
            f"{j['compile_seconds']['generate']:.1f} | {r['greedy_tokens_identical']} |")
    for name, text in (("llm.json", json.dumps(result, indent=2) + "\n"), ("llm.md", "\n".join(lines) + "\n")):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
