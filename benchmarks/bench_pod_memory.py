"""The pod on paper: per-device memory and collective traffic of large-batch train steps, by XLA.

Each configuration (model x mesh x global batch x accumulation) is the project's own train step
(train/state.build_task + train/steps.jit_train_step on the config's state shardings) lowered
with jax.ShapeDtypeStruct arguments and compiled for a mesh of simulated CPU devices; nothing of
that size is ever allocated. Recorded per device:
  params        parameters + EMA teacher, as sharded (the state's shard shapes)
  optimizer     optimizer state, as sharded
  batch         the step's input rows on one device
  arguments / outputs / aliased / temporaries   XLA's memory analysis of the compiled step
                (compiled.memory_analysis(); outputs alias the donated state)
  peak          arguments + outputs - aliased + temporaries
  collectives   bytes per step of all-gather / all-reduce / reduce-scatter / all-to-all /
                collective-permute, read from the compiled HLO: for each op the larger of its
                operands' and its result's sizes (the whole array the collective works on), times
                the trip counts of the while loops around it (scanned layers, micro-batches)
Models (bf16 compute, fp32 params, scan_layers=True):
  joint_vitb16  configs/joint_vitb16_alive.py: CLIP ViT-B/16 (224 px, InfoNCE, sharded loss) and
                DINO ViT-S/16 (2x224 + 8x96 crops, K=65536) in one step
  clip_vitl14   configs/clip_vitb16_alive.py with clip.variant=ViT-L/14 (224 px)

  python benchmarks/bench_pod_memory.py                      all 24 (2 models, meshes 1x8 and 4x8,
                                                             batches 4k/16k/32k, accumulate 1 and 8)
  python benchmarks/bench_pod_memory.py --models clip_vitl14 --meshes 4x8 --batches 32768
  python benchmarks/bench_pod_memory.py --real --meshes all --batches 512 --execute
                                                             on real chips (benchmarks/gpu.sh):
                                                             the mesh of the machine's devices;
                                                             --execute also runs one step and
                                                             reads the devices' peak memory
Options: --accumulate 1,8  --remat  --out FILE.json (every figure)  --markdown (the table).
Caveat: XLA:CPU's program is not the TPU's or GPU's: it fuses less, keeps some bf16 work in fp32
and turns gradient reductions into all-reduce + slice rather than reduce-scatter, so these
figures are estimates of what the accelerator compilers would need (compare with --real).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

SIMULATED_DEVICES = 32
if "--real" not in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={SIMULATED_DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from agriclip_jax.train import config as config_lib  # noqa: E402
from agriclip_jax.train import state as state_lib  # noqa: E402
from agriclip_jax.train import steps as steps_lib  # noqa: E402
from agriclip_jax.train.checkpoint import abstract_with_shardings  # noqa: E402
from agriclip_jax.train.sharding import batch_sharding, make_mesh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# Memory per chip: TPU v5e, TPU v4, NVIDIA H200.
BUDGETS = (("v5e 16 GiB", 16 * GIB), ("v4 32 GiB", 32 * GIB), ("H200 141 GiB", 141 * GIB))
MODELS = ("joint_vitb16", "clip_vitl14")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
ALIVE_IMAGES = 600_000


# ----------------------------------------------------------------------------------------------
# The configurations
# ----------------------------------------------------------------------------------------------

def model_config(model: str, batch_size: int, accumulate_steps: int, remat: bool) -> Any:
  if model == "joint_vitb16":
    config = config_lib.load_config_file(str(REPO / "configs/joint_vitb16_alive.py"), lock=False)
  elif model == "clip_vitl14":
    config = config_lib.load_config_file(str(REPO / "configs/clip_vitb16_alive.py"), lock=False)
    config.clip.variant = "ViT-L/14"
  else:
    raise ValueError(f"model {model!r}; expected one of {MODELS}")
  config.dtype = "bfloat16"
  config.scan_layers = True
  config.remat = remat
  config.batch_size = batch_size
  config.accumulate_steps = accumulate_steps
  return config


def batch_shapes(config: Any, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's input arrays (REQUIRED_KEYS of its kind) as shapes on the batch sharding."""
  b, d = config.batch_size, config.data
  shapes = {"images": ((b, d.image_size, d.image_size, 3), jnp.float32),
            "tokens": ((b, d.context_length), jnp.int32),
            "global_crops": ((b, 2, d.global_crop_size, d.global_crop_size, 3), jnp.float32),
            "local_crops": ((b, d.n_local_crops, d.local_crop_size, d.local_crop_size, 3),
                            jnp.float32)}
  return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=sharding)
          for key in steps_lib.REQUIRED_KEYS[config.kind]}


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


# ----------------------------------------------------------------------------------------------
# Collective bytes from the compiled HLO text
# ----------------------------------------------------------------------------------------------

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.+?) ([a-z][\w-]*)\((.*)$")


def _shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a tuple counts all its elements)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    count = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
    total += count * _BYTES[dtype]
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{op kind: bytes per step} over the ENTRY computation and everything it calls; the body of a
  while loop counts its known trip count times (1 when XLA does not know it: "unknown_trip": n)."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)  # a header starts at column 0; instructions are indented
    if match and not line.startswith("HloModule"):
      current = match.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      if line.strip() == "}":
        current = None
      else:
        computations[current].append(line)
  sizes: dict[str, int] = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        sizes[match.group(1)] = _shape_bytes(match.group(2))

  unknown = 0
  memo: dict[str, dict[str, int]] = {}

  def total(name: str) -> dict[str, int]:
    nonlocal unknown
    if name in memo:
      return memo[name]
    counts = {kind: 0 for kind in COLLECTIVES}
    memo[name] = counts  # recursion guard
    for line in computations.get(name, ()):
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      _, result, op, rest = match.groups()
      kind = op.removesuffix("-start")
      if kind in COLLECTIVES and not op.endswith("-done"):
        operands = re.findall(r"%([\w.-]+)", rest.split(")")[0])
        operand_bytes = sum(sizes.get(o, 0) for o in operands)
        counts[kind] += max(operand_bytes, _shape_bytes(result))
      callees: list[tuple[str, int]] = []
      if op == "while":
        body = re.search(r"body=%?([\w.-]+)", rest).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
        if trips is None:
          unknown += 1
        callees.append((body, int(trips.group(1)) if trips else 1))
      elif op in ("call", "async-start"):
        callees += [(c, 1) for c in re.findall(r"(?:to_apply|calls)=%?([\w.-]+)", rest)]
      elif op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = re.findall(r"%?([\w.-]+)", branches.group(1)) if branches else re.findall(
            r"(?:true_computation|false_computation)=%?([\w.-]+)", rest)
        callees += [(c, 1) for c in names]  # each branch once: an upper bound
      for callee, times in callees:
        for key, value in total(callee).items():
          counts[key] += times * value
    return counts

  result = dict(total(entry)) if entry else {kind: 0 for kind in COLLECTIVES}
  result["unknown_trip"] = unknown
  return result


# ----------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------

def measure(model: str, mesh_spec: str, batch_size: int, accumulate_steps: int, remat: bool,
            real: bool, execute: bool) -> dict[str, Any]:
  config = model_config(model, batch_size, accumulate_steps, remat)
  devices = jax.devices()
  if mesh_spec == "all":
    data, fsdp = 1, len(devices)
  else:
    data, fsdp = (int(n) for n in mesh_spec.split("x"))
  if data * fsdp > len(devices):
    raise ValueError(f"mesh {mesh_spec} needs {data * fsdp} devices; {len(devices)} exist")
  mesh = make_mesh(data, fsdp, devices[:data * fsdp])
  config.mesh.data, config.mesh.fsdp = data, fsdp
  task = state_lib.build_task(config, steps_per_epoch=max(ALIVE_IMAGES // batch_size, 1))
  shardings = state_lib.state_shardings_for(task, mesh, config)
  state = abstract_with_shardings(state_lib.abstract_state(task, config.seed), shardings)
  batch = batch_shapes(config, batch_sharding(mesh))
  step = steps_lib.jit_train_step(task, mesh, shardings, fast_compile=not real)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  arguments, outputs = int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes)
  aliased, temporaries = int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes)
  row = {"model": model, "mesh": f"{data}x{fsdp}", "devices": data * fsdp,
         "global_batch": batch_size, "accumulate_steps": accumulate_steps, "remat": remat,
         "per_device_micro_batch": batch_size // (data * fsdp * accumulate_steps),
         "params": _shard_bytes(state["params"]) + _shard_bytes(state["teacher"]),
         "optimizer": _shard_bytes(state["opt_state"]), "batch": _shard_bytes(batch),
         "arguments": arguments, "outputs": outputs, "aliased": aliased,
         "temporaries": temporaries, "peak": arguments + outputs - aliased + temporaries,
         "collectives": collective_bytes(compiled.as_text()), "compile_s": round(seconds, 1),
         "platform": f"{jax.default_backend()} {devices[0].device_kind}"}
  if execute:
    row["measured_peak"] = _run_once(task, mesh, config, shardings, step, batch, row["peak"])
  return row


def _run_once(task, mesh, config, shardings, step, batch, estimate: int) -> int | None:
  """One real step on zeros; the devices' largest peak_bytes_in_use (None: skipped / unknown)."""
  limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
  if limit is None or estimate > limit:
    return None
  state, _ = state_lib.create_sharded_state(task, mesh, config)
  arrays = {k: jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding) for k, s in batch.items()}
  state, metrics = step(state, arrays)
  jax.block_until_ready(metrics)
  return max(int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in mesh.devices.flat)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def line(row: dict[str, Any]) -> str:
  c = row["collectives"]
  fits = ", ".join(f"{name}: {'yes' if row['peak'] <= budget else 'no'}" for name, budget in BUDGETS)
  measured = (f", measured peak {_gib(row['measured_peak'])} GiB" if row.get("measured_peak")
              else "")
  return (f"pod_memory {row['model']} mesh {row['mesh']} batch {row['global_batch']} accumulate "
          f"{row['accumulate_steps']}{' remat' if row['remat'] else ''}: per device params "
          f"{_gib(row['params'])} GiB, optimizer {_gib(row['optimizer'])}, batch "
          f"{_gib(row['batch'])}, temporaries {_gib(row['temporaries'])}, peak {_gib(row['peak'])}"
          f"{measured}; collectives all-gather {_gib(c['all-gather'])} GiB, all-reduce "
          f"{_gib(c['all-reduce'])}, reduce-scatter {_gib(c['reduce-scatter'])} per step; fits "
          f"{fits} (compile {row['compile_s']} s, {row['platform']})")


def markdown(rows: list[dict[str, Any]]) -> str:
  head = ("| model | mesh | global batch | accum. (micro/device) | params | optimizer | batch | "
          "temporaries | **peak** | collectives/step (AG / AR / RS) | "
          + " | ".join(name for name, _ in BUDGETS) + " |")
  out = [head, "|" + "---|" * (10 + len(BUDGETS))]
  for r in rows:
    c = r["collectives"]
    out.append(f"| {r['model']} | {r['mesh']} | {r['global_batch']:,} | {r['accumulate_steps']} "
               f"({r['per_device_micro_batch']}) | {_gib(r['params'])} | {_gib(r['optimizer'])} | "
               f"{_gib(r['batch'])} | {_gib(r['temporaries'])} | **{_gib(r['peak'])}** | "
               f"{_gib(c['all-gather'])} / {_gib(c['all-reduce'])} / {_gib(c['reduce-scatter'])} | "
               + " | ".join("yes" if r["peak"] <= budget else "no" for _, budget in BUDGETS) + " |")
  return "\n".join(out)


QUICK = ["--models", "clip_vitl14", "--meshes", "4x8", "--batches", "4096", "--accumulate", "8",
         "--remat"]


def main(quick: bool = False, argv: list[str] | None = None) -> list[dict[str, Any]]:
  """`python -m benchmarks --only pod_memory [--quick]` calls main(quick); the script passes argv.
  Quick: one configuration (ViT-L/14, 4x8, 4k, accumulate 8 + remat; ~10 s of compilation)."""
  if argv is None:
    argv = QUICK if quick else []
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--meshes", default="1x8,4x8", help="DATAxFSDP list, or 'all' (--real)")
  parser.add_argument("--batches", default="4096,16384,32768")
  parser.add_argument("--accumulate", default="1,8")
  parser.add_argument("--remat", action="store_true", help="rematerialise each block")
  parser.add_argument("--real", action="store_true", help="the machine's own devices")
  parser.add_argument("--execute", action="store_true", help="also run one step (--real)")
  parser.add_argument("--out", default=None, help="write every figure as JSON here")
  parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
  args = parser.parse_args(argv)
  rows = []
  for model in args.models.split(","):
    for mesh_spec in args.meshes.split(","):
      for batch_size in (int(b) for b in args.batches.split(",")):
        for k in (int(k) for k in args.accumulate.split(",")):
          try:
            row = measure(model, mesh_spec, batch_size, k, args.remat, args.real, args.execute)
          except Exception as error:  # noqa: BLE001 -- one configuration's failure is reported
            print(f"pod_memory {model} mesh {mesh_spec} batch {batch_size} accumulate {k}: "
                  f"failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
          rows.append(row)
          print(line(row), flush=True)
          if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
  if args.markdown:
    print(markdown(rows))
  return rows


if __name__ == "__main__":
  main(argv=sys.argv[1:])
