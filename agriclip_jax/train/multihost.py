"""Multi-process start-up and agreement between processes.

One process per host (TPU VM, GPU node or SLURM task). `initialize` calls
`jax.distributed.initialize` when the run has several processes:
  - explicit: --coordinator HOST:PORT --num-processes N --process-id I (or the env variables
    AGRICLIP_COORDINATOR / AGRICLIP_NUM_PROCESSES / AGRICLIP_PROCESS_ID);
  - SLURM (SLURM_NTASKS > 1) and Cloud TPU pod slices: JAX detects the cluster by itself.
Each process then reads its own slice of the data; the global batch is assembled from the
per-process rows (`sharding.to_global_batch`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as err:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def _is_tpu_pod() -> bool:
  # Cloud TPU VMs of a multi-host slice list their workers here.
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hostnames.split(",") if h]) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300,
               heartbeat_timeout_seconds: int = 100, cpu_collectives: str | None = None) -> bool:
  """Starts jax.distributed when several processes take part; returns whether it did."""
  coordinator = coordinator or os.environ.get("AGRICLIP_COORDINATOR")
  num_processes = num_processes if num_processes is not None else _env_int("AGRICLIP_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("AGRICLIP_PROCESS_ID")
  timeouts = dict(initialization_timeout=initialization_timeout,
                  heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  if coordinator or (num_processes or 1) > 1:
    missing = [name for name, value in (("--coordinator", coordinator),
                                        ("--num-processes", num_processes),
                                        ("--process-id", process_id)) if value is None]
    if missing:
      raise ValueError(f"a multi-process run needs {', '.join(missing)} as well")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    if cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    return True
  if (_env_int("SLURM_NTASKS") or 1) > 1 or _is_tpu_pod():
    jax.distributed.initialize(**timeouts)
    return True
  return False


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on some process (e.g. one got SIGTERM)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.asarray(flags).any())


def preemption_service_running() -> bool:
  """Whether JAX's preemption sync manager runs in this process: started by
  `jax.distributed.initialize` when several processes take part and the
  `jax_enable_preemption_service` option is on (the default). It catches SIGTERM itself (its own
  C handler), tells the coordination service, and every process then agrees in the background
  on the step at which to save (`reached_preemption_step`)."""
  if jax.process_count() == 1:
    return False
  # Not part of JAX's public API: a JAX that moves it gets the fallback (a collective at log steps).
  from jax._src import distributed
  return getattr(getattr(distributed, "global_state", None), "preemption_sync_manager",
                 None) is not None


def reached_preemption_step(step: int) -> bool:
  """True, on every process at the same step, from the step all processes agreed to save at
  after one of them got a preemption notice. A host-local check, no collective: it must be
  called once at every step, by every process."""
  from jax.experimental import multihost_utils
  return bool(multihost_utils.reached_preemption_sync_point(step))


def host_value(x: Any) -> Any:
  """A replicated global array as a host value, on every process."""
  return jax.device_get(x)


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (a collective: every process calls it;
  with one process, [value])."""
  import json
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, lengths.ravel())]
