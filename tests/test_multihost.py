"""Two processes on 127.0.0.1 (gloo CPU collectives, 4 simulated devices each) train with the
same losses as one process with 8 devices and the same global batch; a SIGTERM to one of them
stops both at one agreed step (JAX's preemption service) with a checkpoint that resumes bit for
bit; a dead process stops the other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 30  # long enough for a signal to land mid-run


def _args(kind: str, workdir: Path) -> list[str]:
  return [sys.executable, "-m", "agriclip_jax", "train", "--workdir", str(workdir),
          "--config", str(REPO / f"configs/tiny.py:{kind}"), f"--config.total_steps={STEPS}",
          "--config.log_every_steps=1", f"--config.checkpoint_every_steps={STEPS}",
          "--config.batch_size=8", "--config.mesh.data=4", "--config.mesh.fsdp=2",
          "--config.clip.layers=1", "--config.dino.layers=1", "--config.tensorboard=False",
          "--config.async_checkpoints=False"]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir: Path) -> list[float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["loss"] for line in lines]


def _start_two(args: list[str], devices: int = 4) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(args + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i), "--cpu-collectives", "gloo"],
                           cwd=REPO, env=_env(devices), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish_all(processes: list[subprocess.Popen]) -> list[str]:
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=600)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  return outputs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, list[str]]:
  """An uninterrupted two-process run of STEPS steps: (workdir, each process's output)."""
  workdir = tmp_path_factory.mktemp("two") / "multi"
  processes = _start_two(_args("contrastive", workdir))
  outputs = _finish_all(processes)
  for process, out in zip(processes, outputs):
    assert process.returncode == 0, out[-3000:]
  return workdir, outputs


def test_two_processes_equal_one_process(two_processes, tmp_path):
  kind = "contrastive"  # the sharded InfoNCE gathers across the two processes
  single = subprocess.run(_args(kind, tmp_path / "single"), cwd=REPO, env=_env(8),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
  workdir, outputs = two_processes
  assert "2 process(es)" in outputs[0]

  single_losses, multi_losses = _losses(tmp_path / "single"), _losses(workdir)
  assert len(single_losses) == len(multi_losses) == STEPS
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5, atol=1e-6)
  # Both processes took part in the checkpoint.
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def test_a_dead_process_stops_the_other_within_the_heartbeat_timeout(tmp_path):
  import time
  heartbeat = 10
  port = _free_port()
  args = _args("contrastive", tmp_path) + [
      "--config.total_steps=100000", "--config.mesh.data=-1", "--config.mesh.fsdp=1",
      f"--config.distributed.heartbeat_timeout_seconds={heartbeat}",
      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--cpu-collectives", "gloo"]
  processes = [subprocess.Popen(args + ["--process-id", str(i)], cwd=REPO, env=_env(2),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  try:
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
      assert time.time() < deadline and processes[0].poll() is None, "the run did not start"
      time.sleep(0.05)
    processes[1].kill()
    killed_at = time.time()
    out, _ = processes[0].communicate(timeout=heartbeat + 60)
    waited = time.time() - killed_at
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  # A clear error instead of a hang: JAX's coordination service names the dead task.
  assert processes[0].returncode != 0
  assert waited < heartbeat + 60
  assert "another task died" in out or "unhealthy" in out, out[-2000:]


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_run_resumes_exactly(
    two_processes, tmp_path):
  import signal
  import time
  workdir = tmp_path / "multi"
  processes = _start_two(_args("contrastive", workdir))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
    assert time.time() < deadline and all(p.poll() is None for p in processes), "no step 3"
    time.sleep(0.02)
  processes[1].send_signal(signal.SIGTERM)  # a preemption notice for one host only
  outputs = _finish_all(processes)
  for process, out in zip(processes, outputs):
    assert process.returncode == 0, out[-3000:]
  [saved] = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved < STEPS
  # Process 0 got no signal: it heard of the SIGTERM through JAX's preemption service (the
  # fallback, a collective of the local flags, would name "a signal on another process").
  assert (f"stopped by SIGTERM: checkpoint saved at step {saved} in "
          f"{workdir / 'checkpoints'}") in outputs[0], outputs[0][-3000:]

  outputs = _finish_all(_start_two(_args("contrastive", workdir)))
  assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in outputs[0], outputs[0][-3000:]
  # The same losses, bit for bit, as the uninterrupted two-process run.
  resumed, uninterrupted = _losses(workdir), _losses(two_processes[0])
  assert len(resumed) == len(uninterrupted) == STEPS
  np.testing.assert_array_equal(resumed, uninterrupted)
