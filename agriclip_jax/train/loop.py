"""The training loop: config -> mesh -> data -> state (fresh or restored) -> jitted steps ->
metrics, checkpoints, final model directories.

Reads top to bottom: validation (before anything compiles), mesh, input, task and state,
checkpoint restore, the loop with logging / checkpointing / preemption, and the export.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from agriclip_jax.train import checkpoint as ckpt_lib
from agriclip_jax.train import multihost
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.train.config import validate_config
from agriclip_jax.train.metrics_writer import MetricsWriter
from agriclip_jax.train.sharding import make_mesh, to_global_batch


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------

def make_dataset(config: Any, process_index: int, process_count: int) -> tuple[Any, int]:
  """(Grain IterDataset of per-process batches, steps per epoch)."""
  d = config.data
  if d.source == "toy":
    from agriclip_jax.train.toy_data import make_toy_dataset
    dataset = make_toy_dataset(config.kind, global_batch_size=config.batch_size, seed=config.seed,
                               n_records=d.toy_records, image_size=d.image_size,
                               global_crop_size=d.global_crop_size,
                               local_crop_size=d.local_crop_size, n_local_crops=d.n_local_crops,
                               global_crop_scale=tuple(d.global_crop_scale),
                               local_crop_scale=tuple(d.local_crop_scale),
                               process_index=process_index, process_count=process_count)
    return dataset, max(d.toy_records // config.batch_size, 1)
  # Real data goes through the project's input pipeline (imported only here).
  from input_pipeline import pipeline, sources, transforms
  specs = list(d.source) if isinstance(d.source, (list, tuple)) else [d.source]
  opened = [sources.open_source(spec) for spec in specs]
  tokenize = None
  if config.kind in ("contrastive", "joint"):
    tokenizer_path = d.get("tokenizer") or config.clip.get("init_from")
    if not tokenizer_path:
      raise ValueError("config.data.tokenizer (or clip.init_from with tokenizer files) is needed "
                       "to tokenize captions")
    from agriclip_jax.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    length = d.context_length
    tokenize = lambda texts: tokenizer.encode(list(texts), context_length=length)
  multicrop = transforms.MultiCropConfig(global_size=d.global_crop_size,
                                         local_size=d.local_crop_size, num_local=d.n_local_crops,
                                         global_scale=tuple(d.global_crop_scale),
                                         local_scale=tuple(d.local_crop_scale))
  dataset = pipeline.make_train_dataset(
      opened if len(opened) > 1 else opened[0], kind=config.kind,
      global_batch_size=config.batch_size, seed=config.seed, tokenize=tokenize,
      image_size=d.image_size, multicrop=multicrop, weights=d.get("weights"),
      num_workers=d.num_workers, process_index=process_index, process_count=process_count)
  records = sum(len(s) for s in opened)
  return dataset, max(records // config.batch_size, 1)


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------

class PreemptionFlag:
  """Set by SIGTERM; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _host_tree(tree: Any) -> Any:
  """Full host copies of (possibly cross-process sharded) arrays; every process must call it."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def export_models(task: state_lib.TrainTask, state: dict, workdir: Path, config: Any) -> None:
  """Trained models as model directories (config.json + safetensors) under W/models/.

  Called on every process (the gather is collective); process 0 writes.
  """
  from agriclip_jax import model_io
  params = _host_tree(state["params"])
  teacher = _host_tree(state["teacher"])
  teacher_batch_stats = _host_tree(state.get("teacher_batch_stats", {}))
  if jax.process_index() != 0:
    return
  models = workdir / "models"
  models.mkdir(exist_ok=True)
  if task.clip_model is not None:
    tokenizer_dir = config.data.get("tokenizer") or config.clip.get("init_from")
    if tokenizer_dir and not model_io.has_tokenizer(tokenizer_dir):
      tokenizer_dir = None
    model_io.save_model_dir(models / "clip", "clip", task.clip_model.config.to_dict(),
                            {"params": params["clip"]}, tokenizer_dir=tokenizer_dir)
  if task.dino_model is not None:
    # The teacher is the model DINO evaluates and releases (with its own BatchNorm statistics).
    variables = {"params": teacher["dino"]}
    if "dino" in teacher_batch_stats:
      variables["batch_stats"] = teacher_batch_stats["dino"]
    model_io.save_model_dir(models / "dino", "dino", task.dino_model.config.to_dict(), variables)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(config: Any, workdir: str | Path, stop_after_steps: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the configured training; returns the last logged metrics.

  `stop_after_steps`: leave the loop after this many steps of this invocation (tests).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  validate_config(config, jax.device_count(), process_count)

  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  dataset, steps_per_epoch = make_dataset(config, process_index, process_count)
  task = state_lib.build_task(config, steps_per_epoch)
  shardings = state_lib.state_shardings_for(task, mesh, config)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                       config.async_checkpoints)
  data_iterator = iter(dataset)
  target = ckpt_lib.abstract_with_shardings(state_lib.abstract_state(task, config.seed), shardings)
  restored = checkpointer.restore_latest(target, data_iterator)
  if restored is not None:
    state, start_step = restored
    if is_main:
      print(f"resumed from {checkpointer.directory} at step {start_step}", flush=True)
  else:
    state, _ = state_lib.create_sharded_state(task, mesh, config, state_lib.load_pretrained(task))
    start_step = 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    print(f"training {config.kind}: {state_lib.parameter_count(state['params']):,} parameters, "
          f"mesh {dict(mesh.shape)}, {process_count} process(es), global batch "
          f"{config.batch_size}", flush=True)

  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step,
                         tensorboard=config.tensorboard)
  step_fn = steps_lib.jit_train_step(task, mesh, shardings, config.fast_compile)
  total = config.total_steps
  last: dict[str, Any] = {}
  window_start, window_steps = time.perf_counter(), 0
  run_start, steps_done_here = time.perf_counter(), 0

  with PreemptionFlag() as preemption:
    step = start_step
    while step < total:
      batch = to_global_batch(next(data_iterator), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      window_steps += 1
      steps_done_here += 1

      if config.nonfinite == "stop" and int(metrics["nonfinite"]):
        checkpointer.close()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step}; the state was not updated and the last "
            f"good checkpoint ({checkpointer.latest_step()}) is intact in {checkpointer.directory}")

      if step % config.log_every_steps == 0 or step == total:
        host = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        host["images_per_sec"] = config.batch_size * window_steps / max(elapsed, 1e-9)
        writer.write(step, host)
        last = {"step": step, **host}
        window_start, window_steps = time.perf_counter(), 0
        if is_main:
          rate = (time.perf_counter() - run_start) / steps_done_here
          print(f"step {step}/{total}  loss {host['loss']:.4f}  "
                f"{host['images_per_sec']:.1f} img/s  ETA {_format_eta(rate * (total - step))}",
                flush=True)

      preempted = multihost.any_process(preemption.requested)
      if step % config.checkpoint_every_steps == 0 or step == total or preempted:
        checkpointer.save(step, state, data_iterator)
      if preempted:
        checkpointer.close()
        if is_main:
          print(f"preempted: checkpoint saved at step {step}; exiting", flush=True)
        writer.close()
        return last
      if stop_after_steps is not None and steps_done_here >= stop_after_steps:
        break

  checkpointer.close()
  writer.close()
  if step == total:
    export_models(task, state, workdir, config)
  return last
