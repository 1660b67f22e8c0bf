"""The training loop: config -> mesh -> data -> state (fresh or restored) -> jitted steps ->
metrics, checkpoints, final model directories.

Reads top to bottom: validation (before anything compiles), mesh, input, task and state,
checkpoint restore, the loop with logging / checkpointing / preemption, and the export.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from agriclip_jax.fileio import atomic_write_text, resolve_path

from agriclip_jax.train import checkpoint as ckpt_lib
from agriclip_jax.train import evals as evals_lib
from agriclip_jax.train import multihost
from agriclip_jax.train import prefetch
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.train import workdir_lock
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
    from agriclip_jax.testing.toy_data import make_toy_dataset
    dataset = make_toy_dataset(config.kind, global_batch_size=config.batch_size, seed=config.seed,
                               n_records=d.toy_records, image_size=d.image_size,
                               global_crop_size=d.global_crop_size,
                               local_crop_size=d.local_crop_size, n_local_crops=d.n_local_crops,
                               global_crop_scale=tuple(d.global_crop_scale),
                               local_crop_scale=tuple(d.local_crop_scale),
                               process_index=process_index, process_count=process_count)
    return dataset, max(d.toy_records // config.batch_size, 1)
  # Real data goes through the project's input pipeline (imported only here).
  from input_pipeline import device_augment, pipeline, sources, transforms
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
    check_tokenizer_fits(tokenizer.vocab_size, tokenizer_path, config)
    length = d.context_length
    tokenize = lambda texts: tokenizer.encode(list(texts), context_length=length)
  clip_view, multicrop = transforms.train_views(d)
  dataset = pipeline.make_train_dataset(
      opened if len(opened) > 1 else opened[0], kind=config.kind,
      global_batch_size=config.batch_size, seed=config.seed, tokenize=tokenize,
      image_size=clip_view.size, clip_scale=clip_view.scale, multicrop=multicrop,
      weights=d.get("weights"),
      num_workers=d.num_workers, process_index=process_index, process_count=process_count,
      augment_on=device_augment.resolve_augment_on(d.get("augment_on", "auto"), d.source,
                                                   jax.default_backend()))
  records = sum(len(s) for s in opened)
  return dataset, max(records // config.batch_size, 1)


def check_tokenizer_fits(tokenizer_size: int, tokenizer_path: str, config: Any) -> None:
  """A tokenizer with more tokens than the text model's embedding table gives ids that have no
  embedding: the loss is NaN from step 1. Checked before anything is compiled."""
  model_size = state_lib.clip_model_config(config).text.vocab_size
  if tokenizer_size <= model_size:
    return
  where = (f"the model in clip.init_from={config.clip.init_from!r}" if config.clip.get("init_from")
           else f"config.clip.vocab_size={model_size}")
  raise ValueError(
      f"tokenizer {tokenizer_path} has {tokenizer_size} tokens but the CLIP text model embeds "
      f"only {model_size} ({where}): token ids from {model_size} up have no embedding and the "
      f"loss would be NaN from step 1; use the model's own tokenizer or set "
      f"--config.clip.vocab_size={tokenizer_size}")


# ----------------------------------------------------------------------------------------------
# Preemption and Ctrl-C
# ----------------------------------------------------------------------------------------------

class PreemptionFlag:
  """Set by SIGTERM or a first SIGINT (Ctrl-C): the loop saves at the next step boundary and
  exits cleanly. A second SIGINT raises KeyboardInterrupt at once; the step being saved then is
  left under Orbax's temporary name, which a restore never reads.

  `signals`: those handled here. A multi-process run with JAX's preemption service leaves
  SIGTERM to the service (`preemption_signals`)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, signals: tuple[int, ...] = SIGNALS):
    self.signals = tuple(signals)
    self.requested = False
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in self.signals:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("Ctrl-C: saving a checkpoint at the end of this step, then stopping (press Ctrl-C "
            "again to stop at once, without that checkpoint)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:  # None: a handler installed outside Python, which stays replaced
        signal.signal(signum, previous)


def preemption_signals(service_running: bool) -> tuple[int, ...]:
  """The signals `PreemptionFlag` handles. JAX's preemption service catches SIGTERM with its own
  handler, which a Python handler would replace (and the service would never hear of the
  preemption), so with the service only Ctrl-C is ours."""
  return (signal.SIGINT,) if service_running else PreemptionFlag.SIGNALS


class PreemptionCheck:
  """After each step: save and stop now? The same answer on every process, without a per-step
  collective (one would make every step wait for the previous one to finish on the device).

  - one process: its own flag (SIGTERM / SIGINT), at every step;
  - several, with JAX's preemption service: `multihost.reached_preemption_step`, a host-local
    check at every step of the step all processes agreed on after a SIGTERM on any of them;
  - several, for what the service does not see (Ctrl-C; SIGTERM when the service is off):
    `multihost.any_process` of the flags, only at log steps, which wait for the device anyway.
    This stops within `log_every_steps` steps of the signal, not at the next step.
  """

  def __init__(self, flag: PreemptionFlag, service_running: bool):
    self.flag = flag
    self.service_running = service_running

  def __call__(self, step: int, log_step: bool) -> bool:
    if jax.process_count() == 1:
      return self.flag.requested
    if self.service_running and multihost.reached_preemption_step(step):
      # The service reacts to SIGTERM (on this process or another one).
      self.flag.signal_name = self.flag.signal_name or "SIGTERM"
      return True
    return log_step and multihost.any_process(self.flag.requested)


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
# Guards: the workdir's run kind, the steps left, the skipped steps
# ----------------------------------------------------------------------------------------------

def check_workdir_kind(workdir: Path, config: Any) -> None:
  """A workdir holds one kind of run: resuming a contrastive run as DINO (or the reverse) would
  find checkpoints of another structure. Checked before anything in the workdir is touched."""
  path = workdir / "config.json"
  if not path.is_file():
    return
  from agriclip_jax.fileio import read_json
  previous = read_json(path, "the workdir's run config")
  kind = previous.get("kind") if isinstance(previous, dict) else None
  if kind is not None and kind != config.kind:
    raise ValueError(f"{path}: workdir {workdir} holds a {kind!r} run but this config is "
                     f"kind={config.kind!r}; use another --workdir for it")


def check_steps_left(start_step: int, config: Any, checkpoint_dir: Path) -> None:
  if start_step > config.total_steps:
    raise ValueError(
        f"config.total_steps={config.total_steps} is below the newest checkpoint (step "
        f"{start_step} in {checkpoint_dir}): this run would train nothing; give "
        f"--config.total_steps above {start_step} to go on, or use another --workdir")


def check_skipped_steps(state: dict, step: int, config: Any,
                        checkpointer: ckpt_lib.Checkpointer) -> None:
  """Stops a run that skipped more than `max_skipped_fraction` of its steps (non-finite loss or
  gradient): its parameters did not learn from those batches, so it is neither saved nor
  exported. The newest checkpoint, saved before the limit was passed, stays as it was."""
  skipped = int(np.asarray(state["skipped"].addressable_data(0))) if isinstance(
      state["skipped"], jax.Array) else int(state["skipped"])
  if step < 1 or skipped <= config.max_skipped_fraction * step:
    return
  checkpointer.close()
  raise NonFiniteLossError(
      f"{skipped} of {step} steps had a non-finite loss or gradient and were skipped, more than "
      f"config.max_skipped_fraction={config.max_skipped_fraction}: stopping without saving or "
      f"exporting a model; the last good checkpoint ({checkpointer.latest_step()}) is intact in "
      f"{checkpointer.directory}")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(config: Any, workdir: str | Path, stop_after_steps: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the configured training; returns the last logged metrics, with
  `stopped_by` ("SIGTERM" / "SIGINT") when a signal ended it early.

  Everything that can be checked without touching the workdir is checked first (the config, the
  data sources, the tokenizer): a bad config leaves no workdir behind. Then the workdir is
  locked for this run (`workdir_lock`).

  `stop_after_steps`: leave the loop after this many steps of this invocation (tests).
  """
  workdir = resolve_path(workdir)  # a local Path, or an epath.Path for gs:// (fileio)
  process_index, process_count = jax.process_index(), jax.process_count()
  validate_config(config, jax.device_count(), process_count)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  dataset, steps_per_epoch = make_dataset(config, process_index, process_count)
  task = state_lib.build_task(config, steps_per_epoch)
  check_workdir_kind(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.quiet_save_tracebacks()
  service = multihost.preemption_service_running()
  with workdir_lock.holding(workdir, enabled=process_index == 0), \
      PreemptionFlag(preemption_signals(service)) as flag:
    return _train_in_workdir(config, workdir, mesh, dataset, task, PreemptionCheck(flag, service),
                             stop_after_steps)


def _train_in_workdir(config: Any, workdir: Path, mesh: Any, dataset: Any,
                      task: state_lib.TrainTask, preemption: PreemptionCheck,
                      stop_after_steps: int | None) -> dict[str, Any]:
  process_count = jax.process_count()
  is_main = jax.process_index() == 0
  shardings = state_lib.state_shardings_for(task, mesh, config)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                       config.async_checkpoints)
  data_iterator = iter(dataset)
  target = ckpt_lib.abstract_with_shardings(state_lib.abstract_state(task, config.seed), shardings)
  restored = checkpointer.restore_latest(target, data_iterator)
  total = config.total_steps
  if restored is not None:
    state, start_step = restored
    if is_main:
      print(f"resumed from {checkpointer.directory} at step {start_step}", flush=True)
    check_steps_left(start_step, config, checkpointer.directory)
    if start_step == total:
      # Nothing to train: export the finished run's models again (an earlier export may have
      # failed), leaving its config.json and metrics as they are.
      check_skipped_steps(state, total, config, checkpointer)
      checkpointer.close()
      export_models(task, state, workdir, config)
      if is_main:
        print(f"already done at step {total} (config.total_steps={total}): exported "
              f"{workdir / 'models'} from that checkpoint", flush=True)
      return {"step": total}
  else:
    if checkpointer.moved_aside:
      data_iterator = iter(dataset)  # it may hold the position of a step that was moved aside
    state, _ = state_lib.create_sharded_state(task, mesh, config, state_lib.load_pretrained(task))
    start_step = 0
  if is_main:
    atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    print(f"training {config.kind}: {state_lib.parameter_count(state['params']):,} parameters, "
          f"mesh {dict(mesh.shape)}, {process_count} process(es), global batch "
          f"{config.batch_size}", flush=True)

  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step,
                         tensorboard=config.tensorboard)
  try:
    last = _run_steps(config, state, start_step, mesh, shardings, task, data_iterator,
                      checkpointer, writer, preemption, stop_after_steps, workdir)
  finally:
    writer.close()
  return last


def first_nonfinite_step(flags: Any, first_step: int) -> int | None:
  """The step of the first non-zero flag, where flags[i] belongs to step first_step + i."""
  bad = np.flatnonzero(np.asarray(flags).reshape(-1))
  return int(first_step + bad[0]) if bad.size else None


def stop_if_nonfinite(flags: list[jax.Array], step: int,
                      checkpointer: ckpt_lib.Checkpointer) -> None:
  """nonfinite="stop": the per-step flags of the steps since the last check (read here, in one
  transfer, at a log or checkpoint step) name the first bad step. Nothing after it is saved: the
  newest checkpoint stays the last good state."""
  bad = first_nonfinite_step(jax.device_get(flags), step - len(flags) + 1)
  if bad is None:
    return
  checkpointer.close()
  seen = "" if bad == step else f" (seen at step {step}: checks run at log and checkpoint steps)"
  latest = checkpointer.latest_step()
  kept = (f"the last good checkpoint ({latest}) is intact in {checkpointer.directory}"
          if latest is not None else f"no checkpoint had been saved in {checkpointer.directory}")
  raise NonFiniteLossError(
      f"non-finite loss or gradient at step {bad}{seen}; nothing after it was saved and {kept}")


def data_counts(data_iterator) -> dict[str, float]:
  """Records read and skipped so far, by reason, over every process (`data/seen`,
  `data/skipped`, `data/skipped/<reason>`; empty for sources that count nothing, e.g. toy data).
  Read at log steps only: with several processes it is a small collective."""
  stats = getattr(data_iterator, "bad_records", None)
  if stats is None:
    return {}
  parts = multihost.allgather_json(stats.metrics())
  keys = sorted({key for part in parts for key in part})
  return {key: float(sum(part.get(key, 0.0) for part in parts)) for key in keys}


def _skipped_text(data: dict[str, float]) -> str:
  if not data.get("data/skipped"):
    return ""
  reasons = ", ".join(f"{key.rsplit('/', 1)[1]} {int(n)}" for key, n in data.items()
                      if key.startswith("data/skipped/"))
  return f"  skipped {int(data['data/skipped'])} of {int(data['data/seen'])} records ({reasons})"


def _run_steps(config, state, start_step, mesh, shardings, task, data_iterator, checkpointer,
               writer, preemption, stop_after_steps, workdir) -> dict[str, Any]:
  """The steps. Between log and checkpoint steps nothing is read back from the devices (no
  metric, no flag, no collective), so the host dispatches step k+1 while step k runs; log steps,
  checkpoint steps and the preemption stop are the only points where the host waits."""
  is_main = jax.process_index() == 0
  step_fn = steps_lib.jit_train_step(task, mesh, shardings, config.fast_compile)
  # Host views pass through; with data.augment_on = device the views are rendered here, jitted
  # beside the step, from the uint8 canvases and crop plans the input pipeline ships.
  from input_pipeline.device_augment import make_batch_augment
  augment = make_batch_augment(config, mesh)
  # The next batches are put on the mesh while the current step runs. Checkpoints save the
  # prefetcher's position: the data iterator itself is ahead by the batches in flight.
  batches = prefetch.DevicePrefetch(data_iterator,
                                    lambda local: augment(to_global_batch(local, mesh)))
  total = config.total_steps
  last: dict[str, Any] = {}
  window_start, window_steps = time.perf_counter(), 0
  run_start, steps_done_here = time.perf_counter(), 0
  nonfinite_flags: list[jax.Array] = []  # nonfinite="stop": each step's flag since the last check
  trained_models = evals_lib.TrainedModels(task, config)  # for config.evals

  step = start_step
  while step < total:
    state, metrics = step_fn(state, next(batches))
    step += 1
    window_steps += 1
    steps_done_here += 1
    if config.nonfinite == "stop":
      nonfinite_flags.append(metrics["nonfinite"])

    log_step = step % config.log_every_steps == 0 or step == total
    preempted = preemption(step, log_step)
    save_step = step % config.checkpoint_every_steps == 0 or step == total or preempted
    if nonfinite_flags and (log_step or save_step):
      stop_if_nonfinite(nonfinite_flags, step, checkpointer)
      nonfinite_flags = []

    record: dict[str, Any] = {}  # one metrics.jsonl line per step: training and evaluations
    if log_step:
      host = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - window_start
      host["images_per_sec"] = config.batch_size * window_steps / max(elapsed, 1e-9)
      data = data_counts(data_iterator)
      record.update(host)
      record.update(data)
      last = {"step": step, **host}
      if is_main:
        rate = (time.perf_counter() - run_start) / steps_done_here
        print(f"step {step}/{total}  loss {host['loss']:.4f}  "
              f"{host['images_per_sec']:.1f} img/s  ETA {_format_eta(rate * (total - step))}"
              + _skipped_text(data), flush=True)
    due = evals_lib.due(config.get("evals", ()), step)
    if due:
      results = evals_lib.run_due(due, step, state, trained_models, mesh,
                                  report=None if is_main else (lambda line: None))
      record.update(results)
      last.update(results)
      if is_main and results:
        print(f"step {step}/{total}  " + "  ".join(f"{k} {v:.4g}" for k, v in results.items()),
              flush=True)
    if record:
      writer.write(step, record)
    if log_step or due:
      # the evaluation's time is not the steps': images/sec counts from here
      window_start, window_steps = time.perf_counter(), 0

    if save_step:
      check_skipped_steps(state, step, config, checkpointer)
      writer.sync()  # the metrics of the steps this checkpoint covers are on disk first
      checkpointer.save(step, state, batches.position())
    if preempted:
      checkpointer.close()
      name = preemption.flag.signal_name or "a signal on another process"
      if is_main:
        print(f"stopped by {name}: checkpoint saved at step {step} in {checkpointer.directory}; "
              f"run the same command again to resume", flush=True)
      return {**last, "stopped_by": name}
    if stop_after_steps is not None and steps_done_here >= stop_after_steps:
      break

  checkpointer.close()
  if step == total:
    export_models(task, state, workdir, config)
  return last
