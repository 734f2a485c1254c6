"""The demo's model stages over several seeds on one benchmark: how much of a result is the seed?

    python -m sparsewsi.demo.seeds --base runs/demo --seeds 0,1,2 --out runs/demo_seeds
    python -m sparsewsi.demo.seeds --base runs/demo --seeds 0,1,2 --out runs/noise0 \\
        --set train.model.score_noise=0.0

One demo run tests 120 questions with one seed of the model's initialisation and data order: on this
benchmark seeds of the same config have differed by more than 20 points, so a config change is only
worth keeping when it holds over several seeds. This runs them, on the same slides, features and
questions.

``--base`` is a demo run folder whose data stages (slides, extract, annotate, dataset) are done (any
finished ``sparsewsi demo`` run). Each seed gets ``<out>/seed<s>/``, a demo run folder that links the
base's ``bench/``, ``features/``, ``dataset/`` and ``regions/`` and runs align, train, polish, eval and
report there with ``train.seed``, ``train.model.seed`` and ``train.model.llm_seed`` set to ``s`` (its
own ``report/summary.md``, heatmaps included). A seed folder resumes like any demo run folder; a
seed whose config is exactly the base's (same digest, base evaluated) is read from the base.

``--set KEY=VALUE`` (repeatable) changes the model stages' settings (``align.steps``, ``align.lr``,
``train.*``, ``polish.*``, ``eval.*``...); a setting that decides the data (the slides, features,
questions or region bags) must equal the base's, since they are the base's files: make a base with it
first (``sparsewsi demo --until dataset --out runs/base2 --config.<key>=<value>``).

Writes ``<out>/seeds.json`` and ``<out>/seeds.md`` (atomic): per seed and selector the accuracy and
evidence recall@k, and their mean, min and max over the seeds; ``wall_s`` is the seconds this call spent
per seed (~0 for a seed read from the base, its report for a finished seed folder). A seed whose run
fails with a ``DemoError`` (e.g. a diverged training stage, a damaged file in its own folder) is
reported, listed under ``failed`` with the reason and left out of the statistics; the other seeds run
on. Exit status: 0, 1 when a seed failed (the table of the others is written), 2 when nothing could
run (a bad base, settings or arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsewsi import atomic
from sparsewsi.demo import run as demo

DATA_STAGES = ("slides", "extract", "annotate", "dataset")
LINKED = ("bench", "features", "dataset", "regions")
# Settings of the stages after the data: they may differ from the base's (everything else decides the files).
MODEL_PREFIXES = ("train.", "polish.", "eval.", "report.")
MODEL_KEYS = ("align.steps", "align.batch_size", "align.lr", "align.noise_slots", "align.short_steps")
DATA_KEYS_UNDER_TRAIN = ("train.model.feature_norm",)  # the region bags are written normalised with it
SEED_KEYS = ("train.seed", "train.model.seed", "train.model.llm_seed")


def is_model_key(key: str) -> bool:
    """Whether a flattened config key only affects the stages after the dataset."""
    if key in DATA_KEYS_UNDER_TRAIN:
        return False
    return key in MODEL_KEYS or key.startswith(MODEL_PREFIXES) or key in demo.VOLATILE_KEYS


def seed_config(config, seed: int):
    """``config`` with every model seed (``SEED_KEYS``) set to ``seed``."""
    import ml_collections

    c = ml_collections.ConfigDict(config.to_dict())
    c.train.seed = int(seed)
    c.train.model.seed = int(seed)
    c.train.model.llm_seed = int(seed)
    return c


def check_base(base: pathlib.Path, config) -> dict[str, Any]:
    """The base run's ``stages.json`` after checking that its data stages are done and that ``config``
    decides the same data. Raises :class:`demo.DemoError` naming the folder or the differing settings."""
    paths = demo.Paths(base)
    cfg_path = base / demo.CONFIG_FILE
    if not cfg_path.is_file():
        raise demo.DemoError(f"{base}: not a demo run folder (no {demo.CONFIG_FILE}); run `sparsewsi demo "
                             f"--until dataset --out {base}` first")
    stages = demo.read_stages(paths)
    missing = [s for s in DATA_STAGES if not (stages.get(s) or {}).get("done")]
    if missing:
        raise demo.DemoError(f"{base}: the data stages {', '.join(missing)} are not done; run `sparsewsi demo "
                             f"--until dataset --out {base}` first")
    for name in LINKED:
        if not (base / name).is_dir():
            raise demo.DemoError(f"{base / name}: missing; the base run folder is incomplete")
    a = demo.flatten(json.loads(cfg_path.read_text()))
    b = demo.flatten(demo.config_dict(config))
    diff = sorted(k for k in set(a) | set(b) if not is_model_key(k) and a.get(k) != b.get(k))
    if diff:
        detail = "; ".join(f"{k}: {a.get(k)!r} in the base, {b.get(k)!r} here" for k in diff[:8])
        raise demo.DemoError(f"{base}: the data were made with other settings ({detail}); seeds share the base's "
                             "slides, features and questions, so make a base with these settings first")
    # The alignment's sets exist only when the base's alignment (and its first phase) ran.
    info = stages["dataset"].get("info") or {}
    needed = [("align.steps", int(config.align.steps), "align_data_path"),
              ("align.short_steps", int(config.align.get("short_steps", 0)), "align_short_data_path")]
    for key, value, field in needed:
        if value > 0 and field not in info:
            raise demo.DemoError(f"{base}: {key} = {value} needs the alignment set that the base's dataset stage "
                                 f"did not build ({field} missing from its {demo.STAGES_FILE}); make a base with it")
    return stages


def prepare_seed_folder(base: pathlib.Path, folder: pathlib.Path, base_stages: dict[str, Any]) -> None:
    """Link the base's data folders into ``folder`` and record its data stages there as done (in the base)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if link.is_symlink() or link.exists():
            if not (link.is_symlink() and link.resolve() == (base / name).resolve()):
                raise demo.DemoError(f"{link}: exists and is not a link to {base / name}; use another --out")
            continue
        os.symlink((base / name).resolve(), link, target_is_directory=True)
    stages = demo.read_stages(demo.Paths(folder))
    for s in DATA_STAGES:
        if s not in stages:
            stages[s] = dict(base_stages[s], done_in=os.fspath(base))
    demo.write_json_atomic(folder / demo.STAGES_FILE, stages)


def run_seeds(base: os.PathLike | str, out: os.PathLike | str, seeds: Sequence[int], config,
              log=print) -> dict[str, Any]:
    """Run the model stages for every seed (resumable); returns what ``seeds.json`` holds."""
    base, out = pathlib.Path(base).absolute(), pathlib.Path(out).absolute()
    base_stages = check_base(base, config)
    base_digest = demo.config_digest(_load_config_json(base))
    per_seed: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    wall: dict[int, float] = {}
    for s in seeds:
        cfg = seed_config(config, s)
        t0 = time.perf_counter()
        if demo.config_digest(cfg) == base_digest and (base_stages.get("eval") or {}).get("done"):
            log(f"seeds: seed {s} is the base run's own config; its results are read from {base}")
            per_seed[s] = {"folder": os.fspath(base), "eval": base_stages["eval"]["info"]}
        else:
            folder = out / f"seed{s}"
            log(f"seeds: seed {s} -> {folder}")
            prepare_seed_folder(base, folder, base_stages)
            try:
                stages = demo.run_demo(cfg, folder, command=f"python -m sparsewsi.demo.seeds (seed {s})", log=log)
            except demo.DemoError as e:
                # A seed that fails (a diverged stage, a broken file in its own folder) is reported and left
                # out of the table; the other seeds still run. Its finished stages stay in its folder.
                failed[s] = str(e)
                log(f"seeds: seed {s} FAILED, left out of the table: {e}")
            else:
                per_seed[s] = {"folder": os.fspath(folder), "eval": stages["eval"]["info"]}
        wall[s] = round(time.perf_counter() - t0, 1)
    result = summarize(per_seed, base=os.fspath(base), config=config)
    result["failed"] = {str(s): m for s, m in failed.items()}
    result["wall_s"] = {str(s): w for s, w in wall.items()}
    out.mkdir(parents=True, exist_ok=True)
    demo.write_json_atomic(out / "seeds.json", result)
    atomic.write_text_atomic(out / "seeds.md", markdown(result))
    log(f"seeds: {out / 'seeds.md'}" + (f" ({len(failed)} of {len(seeds)} seeds failed: "
                                         f"{', '.join(map(str, failed))})" if failed else ""))
    return result


def _load_config_json(base: pathlib.Path):
    import ml_collections

    return ml_collections.ConfigDict(json.loads((base / demo.CONFIG_FILE).read_text()))


def summarize(per_seed: dict[int, dict[str, Any]], *, base: str, config) -> dict[str, Any]:
    """Per selector: accuracy and recall per seed, and their mean / min / max over the seeds."""
    selectors = [s for s in config.eval.selectors]  # the config's order (learned first), then any others
    for r in per_seed.values():
        selectors += [s for s in sorted(r["eval"]["selectors"]) if s not in selectors]
    selectors = [s for s in selectors if any(s in r["eval"]["selectors"] for r in per_seed.values())]
    table: dict[str, Any] = {}
    for sel in selectors:
        acc = {s: r["eval"]["selectors"].get(sel, {}).get("accuracy") for s, r in per_seed.items()}
        rec = {s: r["eval"]["selectors"].get(sel, {}).get("evidence_recall") for s, r in per_seed.items()}
        table[sel] = {"accuracy": {str(s): v for s, v in acc.items()},
                      "evidence_recall": {str(s): v for s, v in rec.items()},
                      "accuracy_stats": _stats(acc.values()), "evidence_recall_stats": _stats(rec.values())}
    return {"base": base, "seeds": [int(s) for s in per_seed],
            "folders": {str(s): r["folder"] for s, r in per_seed.items()},
            "config_digest": demo.config_digest(config), "config": demo.flatten(demo.config_dict(config)),
            "selectors": table}


def _stats(values) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def markdown(result: dict[str, Any]) -> str:
    """``seeds.md``: accuracy % (recall@k) per seed and selector, then mean [min, max]."""
    seeds = [str(s) for s in result["seeds"]]
    lines = [f"# Demo over seeds {', '.join(seeds)}", "",
             f"Base run (slides, features, questions): `{result['base']}`; config digest `{result['config_digest']}`.",
             "Each cell: accuracy % (evidence recall@k).", "",
             "| selector | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for sel, row in result["selectors"].items():
        cells = []
        for s in seeds:
            a, r = row["accuracy"].get(s), row["evidence_recall"].get(s)
            cells.append("n/a" if a is None else f"{100 * a:.1f}" + ("" if r is None else f" ({r:.3f})"))
        st = row["accuracy_stats"]
        summary = ("n/a" if st["mean"] is None
                   else f"**{100 * st['mean']:.1f}** [{100 * st['min']:.1f}, {100 * st['max']:.1f}]")
        lines.append(f"| {sel} | " + " | ".join(cells) + f" | {summary} |")
    if result.get("failed"):
        lines += ["", "Failed seeds (not in the table; their folders keep the stages they finished):", ""]
        lines += [f"- seed {s}: {msg}" for s, msg in result["failed"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from sparsewsi.demo_cli import default_config_path
    from sparsewsi.train_cli import apply_overrides, load_config

    p = argparse.ArgumentParser(prog="python -m sparsewsi.demo.seeds", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a demo run folder whose data stages are done")
    p.add_argument("--out", required=True, help="folder for the seed runs, seeds.json and seeds.md")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (default 0,1,2)")
    p.add_argument("--config", default=None, help=f"demo config FILE[:ARG] (default {default_config_path()})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. train.model.score_noise=0.0")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    try:
        config = apply_overrides(load_config(args.config or str(default_config_path())), args.set)
        if args.no_progress:
            config.progress = False
        result = run_seeds(args.base, args.out, seeds, config, log=lambda m: print(m, flush=True))
    except (demo.DemoError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"sparsewsi.demo.seeds: {e}", file=sys.stderr)
        return 2
    for s, msg in result["failed"].items():
        print(f"sparsewsi.demo.seeds: seed {s} failed: {msg}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
