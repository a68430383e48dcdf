"""Multi-process search on JAX's distributed runtime: two processes on localhost (CPU, 2 devices each, JAX's
gloo CPU collectives) search together, survive the loss of one process by resuming, and end exactly like the
same search in one process with 4 devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxnas.search.__main__ import main

TINY = [
    "data.name=digits", "mode=train", "search.strategy=evolution", "space.families=[mlp]", "space.max_stages=1",
    "space.max_depth=1", "space.units=[16,32]", "space.activations=[relu,gelu]", "space.dropouts=[0.0]",
    "search.population=4", "search.budget=12", "train.epochs=1", "train.batch_size=64", "train.learning_rate=0.01",
    "final.top_k=1", "final.epochs=1", "final.seeds=1", "final.control=0", "final.baselines=[]", "progress=false",
    # Several processes train and score through the masked programs only; the one-process reference must too
    # (auto would take the sized backend for its one-candidate final retraining, equal only to float tolerance).
    "population.backend=masked",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args: list[str], pid: int, port: int, log) -> subprocess.Popen:
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=4", "")
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxnas.search", *args, f"distributed.coordinator=localhost:{port}",
               "distributed.num_processes=2", f"distributed.process_id={pid}", "distributed.heartbeat_timeout=5"]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _best(out):
    best = json.loads((out / "best.json").read_text())
    best["final"].pop("seconds")
    return best


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same search in this process: one process, 4 devices (tests/conftest.py)."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    assert main([f"output={out}", *TINY]) == 0
    return out


def test_two_processes_killed_and_resumed_end_like_one_process(reference, tmp_path):
    out = tmp_path / "run"
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    port = _free_port()
    first = [_start([f"output={out}", *TINY], i, port, logs[i]) for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "1").is_dir():  # generation 0 is checkpointed (Orbax renames when done)
            assert first[0].poll() is None and time.monotonic() < deadline, "the two-process run did not checkpoint"
            time.sleep(0.1)
        first[1].send_signal(signal.SIGKILL)
        # the survivor fails loudly (the coordination service's heartbeat), it does not hang
        assert first[0].wait(timeout=120) != 0
    finally:
        for p in first:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs[0].seek(0)
    assert "distributed: 2 processes, 4 devices (2 per process)" in logs[0].read()
    assert not (out / "summary.json").exists()

    port = _free_port()
    resumed = [_start(["--resume", str(out)], i, port, logs[i]) for i in range(2)]
    codes = [p.wait(timeout=600) for p in resumed]
    for log in logs:
        log.seek(0)
    assert codes == [0, 0], [log.read()[-3000:] for log in logs]
    assert (out / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert _best(out) == _best(reference)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    model = json.loads((out / "model" / "arch.json").read_text())
    assert model == json.loads((reference / "model" / "arch.json").read_text())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distributed.coordinator=localhost", "expected host:port"),
        ("distributed.num_processes=2", "needs distributed.coordinator=host:port"),
        ("distributed.process_id=3", "expected 0 .. 0"),
    ],
)
def test_bad_distributed_settings_are_refused(override, message, tmp_path, capsys):
    assert main([f"output={tmp_path / 'run'}", *TINY, override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cluster_detection_reads_only_multi_process_hints(monkeypatch):
    from jaxnas.distributed import detected_cluster

    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job runs as one process
    assert detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detected_cluster() == "SLURM_NTASKS"
