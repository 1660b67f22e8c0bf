"""Mesh, partition rules and host <-> global array helpers.

The mesh has two axes: `data` (pure data parallel) and `fsdp` (the batch is split over it too, and
large parameters -- with their optimizer moments and the EMA teacher -- are split along one
dimension). Which parameters are split is decided by the same ordered regex rules as everything
else (`param_rules`), over the '/'-joined names of the whole train state.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agriclip_jax import param_rules

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Logical activation axes (the models' names) -> mesh axes, active while a train step is traced.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (("batch", BATCH_AXES),)
# Rule values: "fsdp" -> split the largest dimension divisible by the fsdp axis; "replicate".
DEFAULT_SHARDING_RULES: tuple[tuple[str, str], ...] = ((r".*", "fsdp"),)


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """Resolve -1 (fill) and check the mesh fits the devices; errors name the config field."""
  if fsdp == -1 and data == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if fsdp < 1 and fsdp != -1:
    raise ValueError(f"mesh.fsdp={fsdp} must be positive or -1")
  if data < 1 and data != -1:
    raise ValueError(f"mesh.data={data} must be positive or -1")
  if fsdp == -1:
    if n_devices % data:
      raise ValueError(f"mesh.data={data} does not divide the {n_devices} devices")
    fsdp = n_devices // data
  if data == -1:
    if n_devices % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n_devices} devices")
    data = n_devices // fsdp
  if data * fsdp > n_devices:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but only "
                     f"{n_devices} exist (config field mesh)")
  if data * fsdp != n_devices and jax.process_count() > 1:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} uses {data * fsdp} of the {n_devices} "
                     "devices; a multi-process run must use all of them (config field mesh)")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; devices in process order so each host owns contiguous batch rows."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(data, fsdp, len(devices))
  # A single process may run on the first data x fsdp devices (e.g. 1 device for a quick check).
  return Mesh(np.array(devices[:data * fsdp]).reshape(data, fsdp), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """Split the largest dimension divisible by the fsdp axis, for arrays of >= min_size elements."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_specs(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] | None = None,
                min_size: int = 2 ** 14) -> Any:
  """PartitionSpecs for every leaf of the train state from ordered (regex, 'fsdp'|'replicate')."""
  rules = tuple(rules or DEFAULT_SHARDING_RULES)
  fsdp_size = mesh.shape["fsdp"]

  def spec(name: str, leaf: Any, value: str) -> P:
    if value == "replicate":
      return P()
    if value == "fsdp":
      return fsdp_spec(getattr(leaf, "shape", ()), fsdp_size, min_size)
    raise ValueError(f"sharding rule value {value!r} for {name!r}; expected 'fsdp' or 'replicate'")
  return param_rules.tree_from_rules(abstract_state, rules, default="replicate", transform=spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=None, min_size: int = 2 ** 14) -> Any:
  specs = state_specs(abstract_state, mesh, rules, min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Each process's rows -> global arrays split over the batch axes (process-major order)."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
