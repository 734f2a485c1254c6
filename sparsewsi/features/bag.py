"""The in-memory form of one slide's patch features: a :class:`FeatureBag`."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import numpy as np

# A patch name that ends in two integers, e.g. ``1024_2048.jpg`` or ``TCGA-XX_12_34.png``.
_PATCH_NAME_XY = re.compile(r"(\d+)[_\-](\d+)(?:\.[A-Za-z0-9]+)?$")


@dataclasses.dataclass
class FeatureBag:
    """The patch features of one slide.

    Attributes:
      features: ``[N, D]`` float32, one row per patch.
      coords: ``[N, 2]`` int64 level-0 top-left ``(x, y)`` of each patch, or ``None`` when the
        file carries no numeric coordinates.
      locations: ``[N]`` patch names (``str``) for files whose location column is a name such as
        ``x_y.jpg`` (DSMIL/SlideChat CSVs), else ``None``. Names are kept verbatim because their
        integers may be grid indices rather than pixels; see :func:`patch_name_xy`.
      slide_id: the slide identifier (by default the file name without its suffix).
      source: the file the bag was read from, or ``None`` for an in-memory bag.
      attrs: metadata (``patch_size``, ``patch_size_level0``, ``level0_magnification``, ...) as
        plain Python values.
    """

    features: np.ndarray
    coords: np.ndarray | None = None
    locations: np.ndarray | None = None
    slide_id: str = ""
    source: pathlib.Path | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise ValueError(f"FeatureBag features must be [N, D], got shape {self.features.shape}")
        n = self.features.shape[0]
        if self.coords is not None:
            self.coords = np.asarray(self.coords, dtype=np.int64)
            if self.coords.shape != (n, 2):
                raise ValueError(f"FeatureBag coords must be [{n}, 2], got shape {self.coords.shape}")
        if self.locations is not None:
            self.locations = np.asarray(self.locations, dtype=object)
            if self.locations.shape != (n,):
                raise ValueError(f"FeatureBag locations must be [{n}], got shape {self.locations.shape}")

    @property
    def num_patches(self) -> int:
        """N, the number of patches."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """D, the feature width."""
        return int(self.features.shape[1])

    def take(self, indices: np.ndarray) -> FeatureBag:
        """A bag with the rows ``indices`` (``[M]`` int) of features, coords and locations."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            features=self.features[indices],
            coords=None if self.coords is None else self.coords[indices],
            locations=None if self.locations is None else self.locations[indices],
            attrs=dict(self.attrs),
        )

    def subsample(self, max_patches: int | None) -> FeatureBag:
        """At most ``max_patches`` rows, evenly spaced over the bag (SlideChat's cap), order kept.

        ``None`` or a cap at least N returns the bag unchanged.
        """
        idx = uniform_subsample_indices(self.num_patches, max_patches)
        return self if idx is None else self.take(idx)


def uniform_subsample_indices(n: int, max_patches: int | None) -> np.ndarray | None:
    """``[max_patches]`` int64 evenly spaced indices into ``range(n)``, or ``None`` if no cap applies.

    The first and last rows are always kept; indices are strictly increasing.
    """
    if max_patches is None or n <= max_patches:
        return None
    if max_patches <= 0:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    # floor(i * n / m) is strictly increasing for m <= n and spreads picks evenly.
    return (np.arange(max_patches, dtype=np.int64) * n) // max_patches


def patch_name_xy(name: str) -> tuple[int, int] | None:
    """The two trailing integers of a patch name (``"12_34.jpg"`` -> ``(12, 34)``), else ``None``.

    Whether they are pixels or grid indices depends on the tool that wrote the name.
    """
    m = _PATCH_NAME_XY.search(pathlib.PurePath(str(name)).name)
    return None if m is None else (int(m.group(1)), int(m.group(2)))
