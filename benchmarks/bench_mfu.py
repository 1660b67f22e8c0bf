"""MFU, compile time and recompilation of the contrastive (CLIP) train step.

Figures, all from one process:
  matmul_peak         peak FLOP/s of this machine: best of a large square matmul in jax (fp32 on
                      CPU, bf16 on GPU), timed in this same run.
  train_step_*        the jitted contrastive step (forward, backward, AdamW; donated state):
                      compile time, step time, model FLOPs from XLA's cost analysis of the compiled
                      executable (and an analytic count as a cross-check), achieved FLOP/s and MFU.
  recompiles          backend compilations seen by a `jax.monitoring` listener during the steps
                      after the first (must be 0), and the jit cache size (must be 1).

The step is the training engineer's `agriclip_jax.train.steps` contrastive step when that module
exists, else the equivalent step written below (CLIP towers + `losses.infonce_loss` + optax AdamW);
the line `train_step_source` says which was measured.

Also importable: `gpu_check(...)` is the CLIP half of `benchmarks/gpu.sh` (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agriclip_jax.losses import infonce_loss
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig, VisionConfig, clip_config

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
H200_BF16_DENSE_PEAK = 989e12  # NVIDIA datasheet, dense (no sparsity); a lead, not a reading.


# ----------------------------------------------------------------------------------------------
# Measuring helpers (shared with bench_dino_step.py)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileLog:
  """Backend compilations recorded while a `count_compilations()` block was open."""
  names: list[str] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)

  @property
  def count(self) -> int:
    return len(self.names)


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileLog]:
  """Counts XLA backend compilations (any function) through a `jax.monitoring` listener."""
  log = CompileLog()

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    if event == BACKEND_COMPILE_EVENT:
      log.names.append(str(kwargs.get("fun_name", "?")))
      log.seconds.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield log
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def cost_analysis_flops(compiled: Any) -> float:
  """FLOPs XLA counts for one call of a compiled executable (dict or, in older jax, [dict])."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis reported no 'flops' for this executable")
  return float(cost["flops"])


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def matmul_peak_flops(size: int, dtype: jnp.dtype, repeats: int = 5, chain: int = 4) -> float:
  """Best FLOP/s of `chain` dependent [size, size] matmuls in one jitted call, over `repeats`."""
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = (jax.random.normal(keys[1], (size, size), jnp.float32) / np.sqrt(size)).astype(dtype)

  @jax.jit
  def chained(a, b):
    # Dependent products keep XLA from dropping any; one call amortises dispatch.
    for _ in range(chain):
      a = a @ b
    return a

  block(chained(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    block(chained(a, b))
    best = min(best, time.perf_counter() - start)
  return chain * 2.0 * size ** 3 / best


def transformer_flops_per_sample(tokens: int, width: int, layers: int, mlp_dim: int) -> float:
  """Forward matmul FLOPs of a pre-LN transformer stack for one sequence (full attention)."""
  per_token_per_layer = 2 * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens * width
  return float(tokens * layers * per_token_per_layer)


def vit_flops_per_image(cfg: VisionConfig, image_size: int | None = None) -> float:
  size = image_size or cfg.image_size
  patches = (size // cfg.patch_size) ** 2
  patch_embed = 2.0 * patches * cfg.patch_size ** 2 * 3 * cfg.width
  projection = 2.0 * cfg.width * cfg.out_features if cfg.output_dim is not None else 0.0
  return patch_embed + transformer_flops_per_sample(patches + 1, cfg.width, cfg.layers,
                                                    cfg.mlp_dim) + projection


def clip_train_flops_per_pair(config: CLIPConfig, text_length: int) -> float:
  """Analytic model FLOPs of one (image, text) pair in a train step: 3x forward (fwd + bwd)."""
  text = config.text
  text_fwd = transformer_flops_per_sample(text_length, text.width, text.layers, text.mlp_dim)
  text_fwd += 2.0 * text.width * text.output_dim
  return 3.0 * (vit_flops_per_image(config.vision) + text_fwd)


def median_step_seconds(run_step: Callable[[], Any], steps: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    block(run_step())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


# ----------------------------------------------------------------------------------------------
# The contrastive train step
# ----------------------------------------------------------------------------------------------

def local_contrastive_step(model: CLIP, tx: optax.GradientTransformation) -> Callable:
  """step(state, batch) -> (state, metrics): CLIP forward, InfoNCE, backward, AdamW."""

  def step(state: dict, batch: dict) -> tuple[dict, dict]:
    def loss_fn(params):
      out = model.apply({"params": params}, batch["images"], batch["tokens"], train=True)
      return infonce_loss(out["image_embeddings"], out["text_embeddings"], out["logit_scale"])

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1), dict(loss=loss)

  return step


def synthetic_clip_batch(config: CLIPConfig, batch: int, text_length: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  size = config.vision.image_size
  tokens = rng.integers(1, config.text.vocab_size - 1, (batch, text_length), dtype=np.int32)
  tokens[:, -1] = config.text.vocab_size - 1  # the end-of-text token has the largest id
  return dict(images=jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32)),
              tokens=jnp.asarray(tokens))


@dataclasses.dataclass
class ContrastiveStep:
  """One jitted step object per config: abstract compiles (batch search) and calls share its cache."""
  config: CLIPConfig
  step: Callable
  init_state: Callable[[], Any]
  source: str

  def abstract_state(self) -> Any:
    return jax.eval_shape(self.init_state)


def project_contrastive_step(variant: str, dtype: str, image_size: int, text_length: int,
                             remat: bool = False) -> ContrastiveStep:
  """The project's step (`agriclip_jax.train.steps`) on a one-device `kind="contrastive"` task."""
  from agriclip_jax.train.config import default_config
  from agriclip_jax.train.state import build_task, init_state
  from agriclip_jax.train.steps import make_train_step
  cfg = default_config()
  cfg.kind, cfg.dtype, cfg.remat = "contrastive", dtype, remat
  cfg.clip.variant, cfg.clip.sharded_loss = variant, False
  cfg.data.image_size, cfg.data.context_length = image_size, text_length
  cfg.total_steps = 1000
  task = build_task(cfg, steps_per_epoch=100)
  step = jax.jit(make_train_step(task, None), donate_argnums=0)
  return ContrastiveStep(task.clip_model.config, step, jax.jit(lambda: init_state(task, 0)),
                         "agriclip_jax.train.steps.make_train_step (kind contrastive, dense InfoNCE)")


def local_contrastive_setup(variant: str, dtype: str, image_size: int, text_length: int,
                            remat: bool = False) -> ContrastiveStep:
  config = clip_config(variant, dtype=dtype, image_size=image_size, remat=remat)
  config = config.replace(text=dataclasses.replace(config.text, context_length=text_length,
                                                   remat=remat))
  model = CLIP(config)
  tx = optax.adamw(1e-4, weight_decay=0.1)

  def init_state():
    params = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                        jnp.zeros((1, text_length), jnp.int32))["params"]
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

  step = jax.jit(local_contrastive_step(model, tx), donate_argnums=0)
  return ContrastiveStep(config, step, jax.jit(init_state),
                         "benchmarks/bench_mfu.py local step (CLIP + losses.infonce_loss + "
                         "optax.adamw): agriclip_jax.train did not import")


def make_contrastive_step(variant: str, dtype: str, image_size: int, text_length: int,
                          remat: bool = False) -> ContrastiveStep:
  """The project's step; the local equivalent only where the training package cannot import
  (e.g. a GPU image without ml_collections); `source` says which."""
  try:
    return project_contrastive_step(variant, dtype, image_size, text_length, remat)
  except ImportError as error:
    print(f"# agriclip_jax.train unavailable ({error}); measuring the local equivalent step")
    return local_contrastive_setup(variant, dtype, image_size, text_length, remat)


@dataclasses.dataclass
class StepReport:
  batch: int
  lower_s: float
  compile_s: float
  first_call_s: float
  step_s: float
  xla_flops: float
  analytic_flops: float
  later_compiles: int
  cache_size: int
  peak_bytes: int | None
  source: str


def measure_contrastive_step(setup: ContrastiveStep, batch: int, text_length: int,
                             steps: int) -> StepReport:
  config, step = setup.config, setup.step
  data = synthetic_clip_batch(config, batch, text_length)
  state = setup.init_state()
  start = time.perf_counter()
  lowered = step.lower(state, data)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  xla_flops = cost_analysis_flops(compiled)
  del compiled  # jit's own cache now holds this executable: the calls below do not compile again

  start = time.perf_counter()
  state, metrics = step(state, data)
  block(metrics)
  first_call_s = time.perf_counter() - start
  holder = {"state": state}

  def run_step():
    holder["state"], m = step(holder["state"], data)
    return m

  with count_compilations() as later:
    step_s, _ = median_step_seconds(run_step, steps)
  stats = jax.devices()[0].memory_stats() or {}
  return StepReport(batch=batch, lower_s=lower_s, compile_s=compile_s, first_call_s=first_call_s,
                    step_s=step_s, xla_flops=xla_flops,
                    analytic_flops=batch * clip_train_flops_per_pair(config, text_length),
                    later_compiles=later.count, cache_size=step._cache_size(),
                    peak_bytes=stats.get("peak_bytes_in_use"), source=setup.source)


def print_step_report(r: StepReport, peak: float, label: str, peak_label: str) -> None:
  achieved = r.xla_flops / r.step_s
  print(f"train_step_source: {r.source}")
  print(f"train_step_compile_time: {r.compile_s:.2f} s ({label}; lowering {r.lower_s:.2f} s more; "
        f"first call {r.first_call_s:.2f} s)")
  print(f"train_step_time: {r.step_s * 1e3:.1f} ms ({label}, median; "
        f"{r.batch / r.step_s:.1f} images/s)")
  print(f"train_step_xla_flops: {r.xla_flops / 1e9:.2f} GFLOP/step ({label}; analytic model "
        f"count {r.analytic_flops / 1e9:.2f}, ratio XLA/analytic {r.xla_flops / r.analytic_flops:.3f})")
  print(f"train_step_achieved: {achieved / 1e9:.2f} GFLOP/s ({label}, XLA FLOPs / median step time)")
  print(f"train_step_mfu: {100 * achieved / peak:.1f} % ({label}; of the {peak_label} "
        f"{peak / 1e9:.1f} GFLOP/s measured in this run)")
  print(f"train_step_recompiles: {r.later_compiles} (backend compiles during the steps after "
        f"the first; jit cache size {r.cache_size}; expected 0 and 1)")


def remat_temp_bytes(width: int, layers: int, heads: int, mlp_dim: int, tokens: int, batch: int,
                     remat: bool, policy: str) -> tuple[int, float]:
  """(XLA temp bytes, XLA FLOPs) of forward + backward through a transformer stack."""
  from agriclip_jax.models.transformer import Transformer
  stack = Transformer(width, layers, heads, mlp_dim, "quick_gelu", 1e-5, remat=remat,
                      remat_policy=policy)
  x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.float32)
  params = jax.eval_shape(lambda: stack.init(jax.random.key(0), jnp.zeros(x.shape))["params"])
  loss = lambda p, x: jnp.sum(stack.apply({"params": p}, x) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes), cost_analysis_flops(compiled)


def stack_train_step_timings(width: int, layers: int, heads: int, mlp_dim: int, tokens: int,
                             batch: int, scan: bool, steps: int = 3) -> tuple[float, float, float]:
  """(lower s, compile s, median step s) of an AdamW train step of a transformer stack."""
  from agriclip_jax.models.transformer import Transformer, stack_layer_params
  make = lambda scan_layers: Transformer(width, layers, heads, mlp_dim, "quick_gelu", 1e-5,
                                         scan_layers=scan_layers)
  x = jax.random.normal(jax.random.key(1), (batch, tokens, width))
  params = jax.jit(make(False).init)(jax.random.key(0), x)["params"]
  if scan:
    params = stack_layer_params(params)
  stack, tx = make(scan), optax.adamw(1e-4, weight_decay=0.1)

  def train_step(state, x):
    params, opt_state = state
    grads = jax.grad(lambda p: jnp.mean(stack.apply({"params": p}, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(train_step, donate_argnums=0)
  state = (params, tx.init(params))
  start = time.perf_counter()
  lowered = step.lower(state, x)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - start
  holder = {"state": step(state, x)}

  def run():
    holder["state"] = step(holder["state"], x)
    return holder["state"]

  step_s, _ = median_step_seconds(run, steps)
  return lower_s, compile_s, step_s


def print_scan_figures(quick: bool) -> None:
  shape = (64, 4, 2, 256, 17, 8) if quick else (768, 12, 12, 3072, 197, 8)
  label = (f"AdamW step of a transformer stack width {shape[0]}, {shape[1]} layers, {shape[4]} "
           f"tokens, batch {shape[5]}, fp32")
  unrolled = stack_train_step_timings(*shape, scan=False)
  scanned = stack_train_step_timings(*shape, scan=True)
  print(f"scan_compile_time: {scanned[0] + scanned[1]:.2f} s (nn.scan over layers, lower "
        f"{scanned[0]:.2f} + compile {scanned[1]:.2f}; unrolled {unrolled[0]:.2f} + "
        f"{unrolled[1]:.2f} s; ratio unrolled/scan {sum(unrolled[:2]) / sum(scanned[:2]):.2f}; "
        f"{label})")
  print(f"scan_step_time: {scanned[2] * 1e3:.1f} ms (nn.scan; unrolled {unrolled[2] * 1e3:.1f} ms, "
        f"ratio unrolled/scan {unrolled[2] / scanned[2]:.2f}; {label}; median of 3)")


def print_remat_memory(quick: bool) -> None:
  shape = (64, 2, 2, 256, 17, 8) if quick else (768, 12, 12, 3072, 197, 8)
  label = (f"transformer stack width {shape[0]}, {shape[1]} layers, {shape[4]} tokens, batch "
           f"{shape[5]}, fp32 forward + backward")
  base_bytes, base_flops = remat_temp_bytes(*shape, remat=False, policy="nothing_saveable")
  print(f"remat_off_temp_memory: {base_bytes / 2**20:.1f} MiB ({label}; XLA memory analysis)")
  for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
    temp, flops = remat_temp_bytes(*shape, remat=True, policy=policy)
    print(f"remat_{policy}_temp_memory: {temp / 2**20:.1f} MiB ({100 * temp / base_bytes:.0f} % of "
          f"no remat; XLA FLOPs {100 * flops / base_flops:.0f} % of no remat; {label})")


def main(quick: bool = False) -> None:
  threads = os.cpu_count()
  print(f"# backend {jax.default_backend()}, {jax.device_count()} device(s), {threads} CPUs")
  peak_size = 1024 if quick else 2048
  peak = matmul_peak_flops(peak_size, jnp.float32, repeats=3 if quick else 5)
  print(f"matmul_peak: {peak / 1e9:.1f} GFLOP/s (fp32 {peak_size}x{peak_size} matmul chain in jax, "
        f"best of repeats)")
  if quick:
    setup = make_contrastive_step("tiny", "float32", 32, 16)
    batch, steps, label = 8, 3, "tiny CLIP 32px, batch 8, fp32"
  else:
    setup = make_contrastive_step("ViT-B/16", "float32", 224, 77)
    batch, steps, label = 8, 3, "ViT-B/16 224px, batch 8, fp32"
  text_length = setup.config.text.context_length
  report = measure_contrastive_step(setup, batch, text_length, steps)
  print_step_report(report, peak, f"{label}, text length {text_length}", "fp32 matmul peak")
  print_remat_memory(quick)
  print_scan_figures(quick)
  if report.later_compiles or report.cache_size != 1:
    raise SystemExit("the train step recompiled after its first call")


# ----------------------------------------------------------------------------------------------
# Profile: where the time of the compiled step goes (docs/performance.md)
# ----------------------------------------------------------------------------------------------

_SKIPPED_EVENTS = ("ThreadpoolListener", "ThunkExecutor", "end:", "ThunkExecutor")


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax op_name of its metadata (where the op came from)."""
  names = {}
  for match in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text):
    names.setdefault(match.group(1), match.group(2))
  return names


def op_category(op_name: str) -> str:
  """'backward mlp/c_fc/dot_general' from a jax op_name; layer numbers dropped."""
  phase = ("backward" if "transpose(" in op_name else
           "forward" if "jvp(" in op_name else "update")
  path = re.sub(r"resblocks_\d+/", "", op_name)
  parts = [p for p in path.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))]
  for anchor in ("transformer", "visual", "text"):
    if anchor in parts:
      parts = parts[len(parts) - 1 - parts[::-1].index(anchor):]
      break
  return f"{phase} {'/'.join(parts[-3:]) or '?'}"


def profile_step(setup: ContrastiveStep, batch: int, text_length: int, steps: int,
                 trace_dir: str, top: int = 25) -> None:
  """Traces `steps` calls with `jax.profiler` and prints the top XLA ops and op categories.

  On CPU each executed thunk is an event on the XLA thread-pool lines of the host plane; its
  name is the HLO instruction, mapped to the jax op it came from through the HLO metadata.
  Times are summed over threads, so they show shares of work, not wall time.
  """
  import glob
  data = synthetic_clip_batch(setup.config, batch, text_length)
  state = setup.init_state()
  names = _op_names(setup.step.lower(state, data).compile().as_text())
  state, metrics = setup.step(state, data)
  block(metrics)
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    state, metrics = setup.step(state, data)
  block(metrics)
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)[-1]
  plane = jax.profiler.ProfileData.from_file(trace).find_plane_with_name("/host:CPU")
  by_op: dict[str, float] = {}
  for line in plane.lines:
    if not line.name.startswith("tf_XLA"):
      continue
    for event in line.events:
      if not event.name.startswith(_SKIPPED_EVENTS):
        by_op[event.name] = by_op.get(event.name, 0.0) + event.duration_ns / steps
  total = sum(by_op.values())
  by_category: dict[str, float] = {}
  by_kind: dict[str, float] = {}
  for op, ns in by_op.items():
    category = op_category(names.get(op, op))
    by_category[category] = by_category.get(category, 0.0) + ns
    kind = op.split(".")[0]
    by_kind[kind] = by_kind.get(kind, 0.0) + ns
  print(f"# profile: {len(by_op)} ops, {total / 1e6:.1f} thread-ms per step, trace {trace}")
  for title, table in (("op kind", by_kind), ("category", by_category), ("op", by_op)):
    print(f"# top by {title}:")
    for key, ns in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
      origin = f"  <- {names.get(key, '')}" if title == "op" else ""
      print(f"#   {100 * ns / total:5.1f} %  {ns / 1e6:8.2f} ms  {key}{origin}")


# ----------------------------------------------------------------------------------------------
# GPU: the CLIP half of benchmarks/gpu.sh
# ----------------------------------------------------------------------------------------------

def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _memory_needed(compiled: Any) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def largest_fitting_batch(setup: ContrastiveStep, text_length: int, start: int, max_batch: int,
                          deadline: float, limit: int | None) -> tuple[int, float]:
  """(batch, its compile seconds): the largest power-of-two multiple of `start` that fits.

  Each candidate is only compiled (no buffers are allocated) and judged by XLA's memory analysis
  against `limit` (the allocator's `memory_stats()['bytes_limit']` on GPU), so an over-large batch costs a
  compile, not a crash. To save compiles, the first jump assumes memory grows in proportion to
  the batch (an overestimate: params and optimizer state do not grow); doubling goes on from there.
  The executable of the batch chosen stays in the step's jit cache for the measured run.
  """
  abstract_state = setup.abstract_state()
  size = setup.config.vision.image_size
  compile_seconds: dict[int, float] = {}

  def bytes_needed(batch: int) -> int | None:
    abstract_batch = dict(images=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                          tokens=jax.ShapeDtypeStruct((batch, text_length), jnp.int32))
    start_time = time.perf_counter()
    needed = _memory_needed(setup.step.lower(abstract_state, abstract_batch).compile())
    compile_seconds[batch] = time.perf_counter() - start_time
    print(f"# batch {batch}: compiled in {compile_seconds[batch]:.1f} s, needs "
          f"{needed / 2**30 if needed else float('nan'):.2f} GiB of "
          f"{limit / 2**30 if limit else float('nan'):.2f} GiB", flush=True)
    return needed

  def fits(batch: int) -> bool:
    needed = bytes_needed(batch)
    return needed is not None and needed <= 0.95 * limit

  needed = bytes_needed(start)
  if limit is None or needed is None:
    return start, compile_seconds[start]  # no memory figures on this backend: the start batch.
  if needed > 0.95 * limit:
    raise SystemExit(f"even batch {start} needs {needed} bytes, over 95% of the {limit} available")
  best = start
  batch = min(start * 2 ** int(np.floor(np.log2(0.95 * limit / needed))), max_batch)
  while batch > best:  # verify the proportional jump, halving if it was too far
    if fits(batch):
      best = batch
      break
    batch //= 2
  batch = best * 2
  while batch <= max_batch and time.time() < deadline and fits(batch):
    best, batch = batch, batch * 2
  if time.time() >= deadline:
    print("# batch search stopped by its time budget", flush=True)
  return best, compile_seconds[best]


def gpu_check(tiny: bool, budget_s: float) -> None:
  """CLIP ViT-B/16 bf16 train step at the largest batch that fits: images/s, MFU, peak memory.

  `tiny`: a tiny fp32 model, for checking this code on a CPU (the figures mean nothing there).
  """
  began = time.time()
  backend = jax.default_backend()
  device = jax.devices()[0]
  print(f"# backend {backend}, device {device.device_kind}, jax {jax.__version__}", flush=True)
  if tiny:
    variant, size, start, max_batch, steps, text_length, peak_size = "tiny", 32, 4, 16, 3, 16, 512
  else:
    variant, size, start, max_batch, steps, text_length, peak_size = (
        "ViT-B/16", 224, 128, 4096, 10, 77, 8192)
  peak = matmul_peak_flops(peak_size, jnp.bfloat16, repeats=10)
  print(f"matmul_peak_bf16: {peak / 1e12:.1f} TFLOP/s (bf16 {peak_size}^3 matmul chain in jax, best "
        f"of 10)", flush=True)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit is None and tiny:
    limit = 192 * 2**20  # CPU reports no allocator limit: pretend one so the search runs
  # bf16 on the accelerator; the CPU smoke test (--tiny) runs fp32, which XLA:CPU compiles far faster.
  dtype = "float32" if tiny else "bfloat16"
  setup = make_contrastive_step(variant, dtype, size, text_length)
  batch, compile_s = largest_fitting_batch(setup, text_length, start, max_batch,
                                           deadline=began + 0.5 * budget_s, limit=limit)
  while True:
    try:
      report = measure_contrastive_step(setup, batch, text_length, steps)
      break
    except Exception as error:  # noqa: BLE001 -- only out-of-memory is retried, smaller
      if not _is_out_of_memory(error) or batch <= start:
        raise
      print(f"# batch {batch} ran out of memory at run time; halving", flush=True)
      batch //= 2
      compile_s = float("nan")  # the halved batch compiles inside the measured first call
  label = f"CLIP {variant} {dtype}, batch {batch}, text length {text_length}"
  achieved = report.xla_flops / report.step_s
  analytic = report.analytic_flops / report.step_s
  print(f"# step measured: {report.source}")
  print(f"gpu_clip_images_per_s: {batch / report.step_s:.1f} images/s ({label}; median of "
        f"{steps} steps of {report.step_s * 1e3:.1f} ms)")
  print(f"gpu_clip_compile_time: {compile_s:.1f} s ({label}; lower + compile)")
  print(f"gpu_clip_mfu_vs_datasheet: {100 * achieved / H200_BF16_DENSE_PEAK:.1f} % (XLA FLOPs "
        f"{report.xla_flops / 1e12:.2f} TFLOP/step / step time, over H200 bf16 dense 989 TFLOP/s)")
  print(f"gpu_clip_mfu_vs_measured: {100 * achieved / peak:.1f} % (over the bf16 matmul peak "
        f"{peak / 1e12:.1f} TFLOP/s measured above)")
  print(f"gpu_clip_mfu_analytic: {100 * analytic / H200_BF16_DENSE_PEAK:.1f} % (analytic model "
        f"FLOPs {report.analytic_flops / 1e12:.2f} TFLOP/step, over 989 TFLOP/s)")
  peak_bytes = report.peak_bytes
  print(f"gpu_clip_peak_memory: {peak_bytes / 2**30:.2f} GiB (memory_stats peak_bytes_in_use)"
        if peak_bytes is not None else "gpu_clip_peak_memory: n/a (backend reports no memory_stats)")
  print(f"gpu_clip_recompiles: {report.later_compiles} (backend compiles during the steps after "
        f"the first; expected 0)")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--gpu-check", action="store_true", help="the CLIP half of gpu.sh")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test of --gpu-check)")
  parser.add_argument("--budget-s", type=float, default=150.0)
  parser.add_argument("--profile", default=None, metavar="VARIANT",
                      help="trace the contrastive step of this variant (fp32, 224 px unless tiny)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--trace-dir", default="/tmp/agriclip_trace")
  args = parser.parse_args()
  if args.profile:
    tiny_variant = args.profile.startswith("tiny")
    setup = make_contrastive_step(args.profile, "float32", 32 if tiny_variant else 224,
                                  16 if tiny_variant else 77)
    profile_step(setup, args.batch, setup.config.text.context_length, 2, args.trace_dir)
  elif args.gpu_check:
    gpu_check(args.tiny, args.budget_s)
  else:
    main(args.quick)
