"""Orbax checkpoints of the train state and the data iterator: async saves, keep-N, resume with fallback.

Layout: ``<workdir>/checkpoints/<step>/{state,data}`` (see ``sparsewsi.model.checkpoint``). Orbax
writes each step under a temporary name and renames it when complete, so an interrupted save is
never listed; a listed step that fails to restore (corrupt files) falls back to the previous one.
"""

from __future__ import annotations

import base64
import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from sparsewsi.model.checkpoint import CHECKPOINT_DIR

log = logging.getLogger(__name__)


def _encode_iter_state(state):
    # grain's DataLoader iterators return bytes; JSON needs text.
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return state


def _decode_iter_state(state):
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class Checkpointer:
    """Saves ``{"params", "opt_state", "step"}`` + the iterator state every ``every`` steps, keeps ``keep``."""

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict, iterator_state=None, *, force: bool = False) -> None:
        if step in self.manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state)}
        if iterator_state is not None:
            items["data"] = ocp.args.JsonSave(_encode_iter_state(iterator_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state):
        """(state, iterator_state or None, step) of the newest readable checkpoint, or None if there is none.

        ``abstract_state``: ShapeDtypeStructs with shardings: arrays come back already sharded.
        """
        self.manager.reload()
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if (self.directory / str(step) / "data").exists():
                    items["data"] = ocp.args.JsonRestore()
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                data = _decode_iter_state(restored.data) if "data" in items else None
                return restored.state, data, step
            except Exception as e:  # corrupt or partial: fall back to the previous step
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, e)
                if jax.process_count() == 1:
                    continue
                raise  # hosts must agree on the step; a per-host fallback could diverge
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
