"""Import timm and open_clip without torchvision, to use their real model code as parity references.

PyPI's torchvision does not import beside the pinned CPU torch 2.13.0, and both timm and open_clip
import it at module load for things our references never run (timm: ``FrozenBatchNorm2d`` and the
data transforms; open_clip: image transforms). ``launch/local.sh`` installs timm and open_clip with
``--no-deps``; this module installs an import hook that serves a stand-in ``torchvision`` *only if*
the real one cannot be imported. The stand-in's classes are empty ``nn.Module`` subclasses: any code
path that actually used torchvision would fail loudly, so a passing parity test cannot be fooled.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types


def _real_torchvision_works() -> bool:
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install() -> None:
    """Makes ``import timm`` / ``import open_clip`` work without a usable torchvision."""
    if _real_torchvision_works() or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


class _EnumLike(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        import torch

        if name[:1].isupper():
            value = _EnumLike(name, (torch.nn.Module,), {"__module__": self.__name__})
        else:
            value = _StubModule(f"{self.__name__}.{name}")
            value.__path__ = []
        setattr(self, name, value)
        return value


class _Finder:
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass
