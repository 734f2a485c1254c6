"""grain input pipeline over a prepared dataset: lazy feature bags, caps, buckets, tokens, state.

    pipe = InputPipeline(builder.data_path, "train", tokenizer, PipelineConfig(batch_size=8))
    it = iter(pipe)
    batch = next(it)              # dict of numpy arrays, shapes below
    state = it.get_state()        # JSON-able; put it in the training checkpoint
    it2 = iter(pipe); it2.set_state(state)   # continues with exactly the next batch

Each batch (B = batch_size, Nb = patch bucket, Lb = token bucket, D = feature width):

=================  ==============  ============================================================
``features``       [B, Nb, D] f32  patch features, zero past ``feature_mask``
``feature_mask``   [B, Nb] bool    True on real patches
``coords``         [B, Nb, 2] i32  level-0 (x, y) when the file has them, else 0
``num_patches``    [B] i32         N in the file before the cap
``input_ids``      [B, Lb] i32     chat-template tokens, ``pad_id`` past ``attention_mask``
``attention_mask`` [B, Lb] bool
``loss_mask``      [B, Lb] bool    True on assistant-reply tokens
``image_position`` [B] i32         index of ``<image>`` in ``input_ids``
``example_valid``  [B] bool        False for a bad item (all its masks are False)
``bad_reason``     [B] i32         index into :data:`BAD_REASONS` (0 = ok)
``record_index``   [B] i32         the example's index in the prepared split
=================  ==============  ============================================================

Nb is the smallest of ``patch_buckets`` holding the batch's longest (capped) bag, Lb likewise for
tokens, so a jitted step sees a handful of shapes. A bag over ``max_patches`` is sub-sampled to
evenly spaced patches (SlideChat's cap). A feature file that is missing or bad at read time
(deleted or changed since the build) never stops the epoch: the item keeps its slot with
``example_valid=False`` and is counted per reason in ``iterator.skipped``.

Order is a pure function of (seed, shard, worker_count): grain's ``IndexSampler`` shuffles
deterministically, ``ShardOptions`` splits the records between hosts (``jax.process_index()``
by default), and ``worker_count`` reader processes each batch a fixed slice of the shuffled
stream (so changing ``worker_count`` changes the order; keep it fixed across a resume).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sparsewsi.features.readers import FeatureFileError, read_feature_bag
from sparsewsi.model.prompts import PromptError, build_messages, tokenize_chat

BAD_REASONS: tuple[str, ...] = (
    "ok",
    "feature_missing",
    "feature_unreadable",
    "feature_wrong_width",
    "feature_non_finite",
    "feature_empty",
    "feature_bad_layout",
    "feature_unsupported",
    "prompt_error",
)
_REASON_CODE = {r: i for i, r in enumerate(BAD_REASONS)}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline does (configs as data).

    Attributes:
      batch_size: examples per host batch.
      max_patches: cap on N (evenly spaced sub-sampling), or None for no cap.
      patch_buckets: allowed padded N; the cap must not exceed the largest.
      token_buckets: allowed padded L; the largest is also the token limit.
      feature_dim / csv_feature_columns: expected D and the CSV feature-column count.
      with_answers: training sequences (prompt + reply, loss on the reply) or, False, evaluation
        prompts ending with the assistant header.
      shuffle, seed, num_epochs: the sampler (None epochs = repeat forever).
      worker_count: reader processes (0 = in the calling process); worker_buffer_size: batches
        each worker keeps ready; read_threads: threads fetching records per process.
      drop_remainder: drop a last partial batch (keeps shapes static).
    """

    batch_size: int = 8
    max_patches: int | None = 10_240
    patch_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 10_240)
    token_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    feature_dim: int = 512
    csv_feature_columns: int = 512
    with_answers: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    drop_remainder: bool = True

    def __post_init__(self):
        if self.max_patches is not None and self.max_patches > max(self.patch_buckets):
            raise ValueError(f"max_patches {self.max_patches} exceeds the largest patch bucket {max(self.patch_buckets)}")


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (n <= max(buckets) is guaranteed by the caller)."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


class PreparedSource:
    """A random-access view of one split of a prepared TFDS dataset (picklable for workers).

    Records are dicts of ``str``/``int``/``list[str]`` plus ``record_index``. The TFDS reader is
    opened lazily in each process, so pickling sends only the path.
    """

    def __init__(self, data_path: os.PathLike | str, split: str):
        import tensorflow_datasets as tfds

        self.data_path = str(data_path)
        self.split = split
        info = tfds.builder_from_directory(self.data_path).info
        if split not in info.splits:
            raise KeyError(f"{self.data_path} has no split {split!r} (splits: {', '.join(info.splits)})")
        self._len = int(info.splits[split].num_examples)
        self.metadata = dict(info.metadata or {})
        self._src = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._src is None:
            import tensorflow_datasets as tfds

            self._src = tfds.builder_from_directory(self.data_path).as_data_source()[self.split]
        raw = self._src[int(index)]
        rec = {k: _decode(v) for k, v in raw.items()}
        rec["record_index"] = int(index)
        return rec

    def __getstate__(self):
        return {**self.__dict__, "_src": None}

    def __repr__(self) -> str:  # grain puts the source's repr in its iterator state
        return f"PreparedSource({self.data_path!r}, {self.split!r})"


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, np.ndarray)) and len(value) and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class LoadAndTokenize(grain.transforms.Map):
    """Record -> unpadded example: the (capped) bag and the tokenised chat; bad items flagged."""

    def __init__(self, features_root: os.PathLike | str, tokenizer, config: PipelineConfig):
        self.features_root = pathlib.Path(features_root)
        self.tokenizer = tokenizer
        self.config = config

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        out = {"record_index": record["record_index"], "bad_reason": 0}
        try:
            bag = read_feature_bag(
                self.features_root / record["feature_file"], expected_dim=cfg.feature_dim,
                csv_feature_columns=cfg.csv_feature_columns, with_attrs=False,
            )
            out["num_patches"] = bag.num_patches
            bag = bag.subsample(cfg.max_patches)
            if bag.num_patches > max(cfg.patch_buckets):
                raise FeatureFileError(bag.source, "bad_layout", f"{bag.num_patches} patches exceed the largest bucket")
            out["features"] = bag.features
            out["coords"] = bag.coords.astype(np.int32) if bag.coords is not None else None
            messages = build_messages(record["user_turns"], record["assistant_turns"] if cfg.with_answers else None)
            chat = tokenize_chat(self.tokenizer, messages, max_tokens=max(cfg.token_buckets),
                                 add_generation_prompt=not cfg.with_answers)
            out.update(input_ids=chat.input_ids, loss_mask=chat.loss_mask, image_position=chat.image_position)
        except FeatureFileError as e:
            out["bad_reason"] = _REASON_CODE.get(f"feature_{e.reason}", _REASON_CODE["feature_unreadable"])
        except PromptError:
            out["bad_reason"] = _REASON_CODE["prompt_error"]
        if out["bad_reason"]:
            out.update(features=np.zeros((0, cfg.feature_dim), np.float32), coords=None, num_patches=0,
                       input_ids=np.zeros((0,), np.int32), loss_mask=np.zeros((0,), bool), image_position=0)
        return out


def collate(examples: Sequence[dict[str, Any]], *, config: PipelineConfig, pad_id: int) -> dict[str, np.ndarray]:
    """Pad a list of :class:`LoadAndTokenize` outputs to the batch's buckets and stack them."""
    n_b = bucket(max([e["features"].shape[0] for e in examples] + [1]), config.patch_buckets)
    l_b = bucket(max([e["input_ids"].shape[0] for e in examples] + [1]), config.token_buckets)
    b, d = len(examples), config.feature_dim
    batch = {
        "features": np.zeros((b, n_b, d), np.float32),
        "feature_mask": np.zeros((b, n_b), bool),
        "coords": np.zeros((b, n_b, 2), np.int32),
        "num_patches": np.zeros((b,), np.int32),
        "input_ids": np.full((b, l_b), pad_id, np.int32),
        "attention_mask": np.zeros((b, l_b), bool),
        "loss_mask": np.zeros((b, l_b), bool),
        "image_position": np.zeros((b,), np.int32),
        "example_valid": np.zeros((b,), bool),
        "bad_reason": np.zeros((b,), np.int32),
        "record_index": np.zeros((b,), np.int32),
    }
    for i, e in enumerate(examples):
        n, ln = e["features"].shape[0], e["input_ids"].shape[0]
        batch["features"][i, :n] = e["features"]
        batch["feature_mask"][i, :n] = True
        if e["coords"] is not None:
            batch["coords"][i, :n] = e["coords"]
        batch["input_ids"][i, :ln] = e["input_ids"]
        batch["attention_mask"][i, :ln] = True
        batch["loss_mask"][i, :ln] = e["loss_mask"]
        batch["num_patches"][i] = e["num_patches"]
        batch["image_position"][i] = e["image_position"]
        batch["example_valid"][i] = e["bad_reason"] == 0
        batch["bad_reason"][i] = e["bad_reason"]
        batch["record_index"][i] = e["record_index"]
    return batch


class _Collate:
    """Picklable batch function for grain's Batch (workers receive it by pickling)."""

    def __init__(self, config: PipelineConfig, pad_id: int):
        self.config, self.pad_id = config, pad_id

    def __call__(self, examples):
        return collate(examples, config=self.config, pad_id=self.pad_id)


class InputPipeline:
    """A prepared split + tokenizer + config -> iterators of padded, sharded batches.

    Args:
      data_path: ``builder.data_path`` of a prepared dataset.
      split: e.g. ``"train"``.
      tokenizer: a transformers tokenizer with a chat template and an ``<image>`` token.
      config: :class:`PipelineConfig`.
      features_root: where the feature files are now (default: the root recorded at build time).
      shard_index, shard_count: this host's shard (default ``jax.process_index()/process_count()``).
    """

    def __init__(self, data_path, split: str, tokenizer, config: PipelineConfig, *,
                 features_root: os.PathLike | str | None = None,
                 shard_index: int | None = None, shard_count: int | None = None):
        self.source = PreparedSource(data_path, split)
        self.config = config
        build = self.source.metadata.get("build", {})
        self.features_root = pathlib.Path(features_root or build.get("features_root", ""))
        if not str(self.features_root):
            raise ValueError(f"{data_path} records no features_root; pass features_root=")
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        self.shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                                         drop_remainder=False)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.operations = [
            LoadAndTokenize(self.features_root, tokenizer, config),
            grain.transforms.Batch(config.batch_size, drop_remainder=config.drop_remainder,
                                   batch_fn=_Collate(config, int(pad_id))),
        ]

    def loader(self) -> grain.DataLoader:
        """The underlying grain DataLoader."""
        cfg = self.config
        if cfg.worker_count > 0:
            from absl import flags

            # grain's worker processes read absl flags; outside an absl app they are never parsed.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
        sampler = grain.samplers.IndexSampler(
            num_records=len(self.source), shard_options=self.shard_options, shuffle=cfg.shuffle,
            num_epochs=cfg.num_epochs, seed=cfg.seed,
        )
        return grain.DataLoader(
            data_source=self.source, sampler=sampler, operations=self.operations, worker_count=cfg.worker_count,
            worker_buffer_size=cfg.worker_buffer_size,
            read_options=grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(2 * cfg.batch_size, 16)),
        )

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self.loader())


class PipelineIterator:
    """Batches from the grain loader, with per-reason counts of bad items and exact-resume state."""

    def __init__(self, loader: grain.DataLoader):
        self._it = iter(loader)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        for code in batch["bad_reason"][~batch["example_valid"]]:
            self.skipped[BAD_REASONS[int(code)]] += 1
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: grain's position plus the counters."""
        raw = self._it.get_state()
        return {"grain": raw.decode("utf-8") if isinstance(raw, bytes) else raw,
                "skipped": dict(self.skipped), "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which ``state`` was taken."""
        raw = state["grain"]
        self._it.set_state(raw.encode("utf-8") if isinstance(raw, str) else raw)
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.batches = int(state.get("batches", 0))

    def __repr__(self) -> str:
        return f"PipelineIterator(batches={self.batches}, skipped={json.dumps(dict(self.skipped))})"
