"""Two real CPU processes joined by jax.distributed on localhost run sharded training steps through
the ``sparsewsi train`` entry point, and match the same run in one process on as many devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = ["total_steps=3", "batch_size=4", "model.feature_dim=16", "model.scorer_hidden=32",
             "model.projector_hidden=32", "model.k=4", "data.num_examples=8", "data.num_tokens=32",
             "llm.tiny={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1}",
             "optim.warmup_steps=1", "checkpoint.every=3", "progress=False", "tensorboard=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(REPO))
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "sparsewsi.cli", "train", "--config", str(REPO / "configs" / "tiny.py"),
               "--workdir", str(tmp_path / "multi"), "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(pid), *sets]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"
    assert "process 1 of 2" in outs[1] and "4 global devices" in outs[0]
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # process 0 alone writes metrics
    assert (tmp_path / "multi" / "checkpoints" / "3").is_dir()

    # The same run in this process on 4 simulated devices.
    from sparsewsi.train_cli import apply_overrides, load_config, make_batches
    from sparsewsi.training import spec_from_config, train

    config = apply_overrides(load_config(str(REPO / "configs" / "tiny.py")), OVERRIDES)
    spec = spec_from_config(config)
    single = train(config, make_batches(config, spec), tmp_path / "single", spec=spec, devices=jax.devices()[:4])
    np.testing.assert_allclose([r["loss"] for r in rows], [h["loss"] for h in single["history"]], rtol=1e-5)
