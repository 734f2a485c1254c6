"""``sparsewsi generate``: chat with a local Hugging Face Qwen2 / Llama checkpoint through the JAX decoder.

    sparsewsi generate --model /models/Qwen2.5-7B-Instruct --dtype bfloat16 --fsdp 8 \\
        --prompt "Describe a well-differentiated adenocarcinoma." --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--system", default=None, help="system message (chat mode)")
    parser.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--fsdp", type=int, default=1, help="shard weights over this many devices (fsdp axis)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")


def run(args: argparse.Namespace) -> int:
    from sparsewsi import llm

    try:
        mesh = llm.make_mesh(fsdp=args.fsdp, tensor=args.tensor) if args.fsdp * args.tensor > 1 else None
        model = llm.load_hf(args.model, dtype=args.dtype, mesh=mesh)
        tokenizer = llm.load_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError / UnsupportedModelError are ValueErrors
        print(f"sparsewsi generate: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt
    if args.system and not args.no_chat:
        prompts = [[{"role": "system", "content": args.system}, {"role": "user", "content": p}] for p in prompts]
    _, texts = llm.generate_text(model, tokenizer, prompts, chat=not args.no_chat, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(f">>> {prompt}\n{text}\n")
    return 0
