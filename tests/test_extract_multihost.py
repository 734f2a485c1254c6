"""Multi-host extraction: two real CPU processes joined by jax.distributed on localhost split the slides."""

import json
import os
import socket
import subprocess
import sys

import h5py
import pytest

from sparsewsi.slides import synthetic as S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_share_the_slides(tmp_path):
    slides = tmp_path / "in"
    slides.mkdir()
    for name in ("svs_20x", "svs_mag_only", "tiff_odd", "svs_no_mpp"):
        S.write_fixture(slides, name)
    out = tmp_path / "out"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sparsewsi.cli", "extract", str(slides), "--out", str(out), "--batch-size", "8",
             "--mpp", "0.5", "--no-progress", "--no-thumbnails", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, log
        assert f"[process {i}/2] 4 slides in total" in log and "2 local devices" in log, log
    shares = [{os.path.basename(r["slide"]) for r in json.load(open(out / f"extract_summary.process{i}.json"))}
              for i in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2 and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {"svs_20x.svs", "svs_mag_only.svs", "tiff_odd.tif", "svs_no_mpp.svs"}
    for name in ("svs_20x", "svs_mag_only", "tiff_odd", "svs_no_mpp"):
        with h5py.File(out / f"{name}.h5") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
