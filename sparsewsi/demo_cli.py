"""``sparsewsi demo``: the main job end to end on synthetic slides, with a visual report.

    sparsewsi demo                                   # runs/demo: slides -> features -> train -> eval -> report
    sparsewsi demo --out runs/demo_s1 --config.seed=1
    sparsewsi demo --config configs/demo.py:small --out /tmp/demo_small   # a shrunken run (plumbing only)
    bash launch/local.sh demo                        # the same on a fresh machine (sets up .venv first)

Every field of the config can be overridden as ``--config.<field>=<value>`` (Python literals:
``--config.train.total_steps=300``, ``--config.slides.tissue_patches=(300,360)``); ``--help`` lists
them with their defaults. Rerunning the same command resumes: finished stages are skipped.
Exit status: 0 on success, 2 for a bad config or run folder.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

DEFAULT_OUT = "runs/demo"


def default_config_path() -> pathlib.Path:
    """``configs/demo.py`` of this checkout (the package is installed in editable mode beside it)."""
    import sparsewsi

    return pathlib.Path(sparsewsi.__file__).resolve().parents[1] / "configs" / "demo.py"


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE[:ARG]",
                        help=f"demo config file, optionally with an argument (default {default_config_path()})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT}; rerun to resume)")
    parser.add_argument("--until", default=None, help="stop after this stage (slides, extract, annotate, dataset, "
                                                      "align, train, polish, eval, report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (stage logs only)")
    group = parser.add_argument_group("config overrides (--config.FIELD=VALUE)")
    path = default_config_path()
    if path.is_file():
        from sparsewsi.train_cli import load_config

        for key, value in _leaves(load_config(str(path)).to_dict()).items():
            group.add_argument(f"--config.{key}", dest=f"override:{key}", default=None, metavar="VALUE",
                               help=f"(default {value!r})")


def run(args: argparse.Namespace) -> int:
    from sparsewsi.demo.run import DemoError, run_demo
    from sparsewsi.train_cli import apply_overrides, load_config

    spec = args.config or str(default_config_path())
    overrides = [f"{k.split(':', 1)[1]}={v}" for k, v in vars(args).items() if k.startswith("override:") and v is not None]
    try:
        config = apply_overrides(load_config(spec), overrides)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"sparsewsi demo: {e}", file=sys.stderr)
        return 2
    if args.no_progress:
        config.progress = False
    command = "sparsewsi demo " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else "sparsewsi demo"
    try:
        run_demo(config, args.out, command=command.strip(), log=lambda m: print(m, flush=True), until=args.until)
    except DemoError as e:
        print(f"sparsewsi demo: {e}", file=sys.stderr)
        return 2
    return 0
