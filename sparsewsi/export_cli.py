"""``sparsewsi export``: a trained checkpoint -> Hugging Face LLM folder (LoRA merged) + PyTorch selector.

    sparsewsi export --checkpoint runs/stage2 --out exports/stage2
    sparsewsi export --checkpoint runs/stage2/checkpoints/4000 --out exports/s2_4000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a trainer workdir (newest valid step) or <workdir>/checkpoints/<step>")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="storage dtype of the LLM tensors (default: the model's parameter dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from sparsewsi.model import load_checkpoint
    from sparsewsi.model.export import export

    try:
        model, tokenizer, spec = load_checkpoint(args.checkpoint)
        out = export(model, args.out, tokenizer=tokenizer, llm_source=spec.llm_path, dtype=args.dtype,
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"sparsewsi export: {e}")
        return 1
    print(f"exported {args.checkpoint} -> {out} (llm/, selector.safetensors, selector.json, sparsewsi_torch.py)")
    return 0
