"""The flags that make a command one of several processes (one per host), shared by every command
that runs on the mesh: `--coordinator HOST:PORT --num-processes N --process-id I` (or the
environment: AGRICLIP_COORDINATOR / AGRICLIP_NUM_PROCESSES / AGRICLIP_PROCESS_ID, SLURM, Cloud
TPU pod slices; see `agriclip_jax.train.multihost`). Each process encodes its own slice of the
images (`features.encode_source`); process 0 writes the results.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("several processes (one per host)")
  group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
  group.add_argument("--num-processes", type=int, default=None)
  group.add_argument("--process-id", type=int, default=None)
  group.add_argument("--cpu-collectives", default=None, choices=("gloo", "mpi"),
                     help="collectives for multi-process CPU runs (tests)")


def initialize(args: argparse.Namespace, **timeouts) -> bool:
  """Joins the other processes when the flags or the environment say there are any."""
  from agriclip_jax.train import multihost
  return multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                              cpu_collectives=args.cpu_collectives, **timeouts)


def writes_outputs() -> bool:
  """Whether this process writes the command's result files (process 0 of a multi-process run)."""
  import jax
  return jax.process_index() == 0
