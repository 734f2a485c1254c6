"""``sparsewsi info``: versions of the stack and the devices JAX sees (first thing to paste in a bug report)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    import jax

    import sparsewsi

    print(f"sparsewsi {sparsewsi.__version__} (python {platform.python_version()})")
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
                 "transformers", "tiffslide", "tifffile", "torch"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {dist:20s} {version}")
    print(f"jax backend: {jax.default_backend()}, process {jax.process_index()} of {jax.process_count()}")
    for device in jax.devices():
        print(f"  {device}")
    return 0
