"""The ``sparsewsi`` command line: one sub-command per job, each a thin wrapper over the library.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``
and is imported only when it is invoked, so ``sparsewsi --help`` stays fast and a broken optional
dependency of one command never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add a line here to add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("sparsewsi.info", "print versions, devices and where things are installed"),
    "train": ("sparsewsi.train_cli", "train SparseWSI from a config file (resumes; multi-host with jax.distributed)"),
    "export": ("sparsewsi.export_cli", "export a checkpoint: Hugging Face LLM folder + PyTorch scorer/projector"),
    "eval": ("sparsewsi.eval_cli", "evaluate on SlideBench-VQA/Caption or WSI-VQA: sharded, resumable, with baselines"),
    "score": ("sparsewsi.evaluation.score_cli", "score existing predictions (CSV output column / JSON lines) or merge a run"),
    "generate": ("sparsewsi.llm.generate_cli", "chat with a local Hugging Face Qwen2/Llama checkpoint (JAX decoder)"),
    "extract": ("sparsewsi.features.extract_cli", "slides -> TRIDENT-layout .h5 patch features (tissue, grid, encoder)"),
    "convert-features": ("sparsewsi.features.convert_cli", "SlideChat/DSMIL CSV (or .pt) features -> .h5, once, for fast reading"),
    "demo": ("sparsewsi.demo_cli", "the main job end to end: synthetic slides -> features -> SparseLearn -> eval -> report"),
}


def config_overrides_to_set(argv: list[str]) -> list[str]:
    """big_vision-style ``--config.a.b=value`` (or ``--config.a.b value``) -> ``--set a.b=value``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and len(arg) > len("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise SystemExit(f"sparsewsi: {arg} needs a value")
                value, i = argv[i + 1], i + 1
            out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsewsi",
        description="Learnable token sparsification for whole-slide image reasoning (JAX/Flax).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"sparsewsi: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    if getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
        rest = config_overrides_to_set(rest)
    sub_parser = argparse.ArgumentParser(prog=f"sparsewsi {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
