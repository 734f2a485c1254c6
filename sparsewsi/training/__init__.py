"""Training: the pure train step, optimizer from regex groups, mesh/shardings, orbax checkpoints,
metric writers and the trainer main loop (``train(config, batches, workdir)``)."""

from sparsewsi.training.checkpoint import Checkpointer
from sparsewsi.training.data import ArrayIterator, stack, synthetic_examples
from sparsewsi.training.metrics import MetricsWriter
from sparsewsi.training.optimizer import group_of, lr_schedule, make_optimizer
from sparsewsi.training.sharding import batch_shardings, mesh_from_config, opt_state_shardings, to_global
from sparsewsi.training.step import init_state, make_train_step, memory_report
from sparsewsi.training.trainer import NonFiniteLossError, spec_from_config, train

__all__ = [
    "Checkpointer", "ArrayIterator", "stack", "synthetic_examples", "MetricsWriter", "group_of", "lr_schedule",
    "make_optimizer", "batch_shardings", "mesh_from_config", "opt_state_shardings", "to_global", "init_state",
    "make_train_step", "memory_report", "NonFiniteLossError", "spec_from_config", "train",
]
