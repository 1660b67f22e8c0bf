"""The table of weight formats for `agriclip convert`.

A format has a reader `(src: Path, options: dict) -> ConvertedModel` and/or a writer
`(model: ConvertedModel, dst: Path, options: dict) -> None`. The table is assembled explicitly from
the modules that define formats (no registration by import side effects): `flax` here,
`hf`/`openclip` in `clip_formats`, and the DINO formats in `agriclip_jax.convert.dino` when that
module exists. Format names are part of the command line that scripts rely on: keep them stable.

`convert` also takes option `preprocess`: a view name of `input_pipeline.transforms.PRESETS` that
replaces the source's view in the written model directory.

Options every reader/writer may receive: `model_name`, `tokenizer`, `allow_torchscript`,
`overwrite` (a directory writer keeps the files of an existing destination that it does not write
itself, instead of refusing it: fileio.atomic_directory's keep_others), and `scratch_dir` (a
temporary directory that lives for one conversion, for materialised tokenizer files).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from agriclip_jax import model_io
from input_pipeline.transforms import PreprocessSpec


@dataclasses.dataclass
class ConvertedModel:
  """A model between formats: what `model_io.save_model_dir` writes, plus where its tokenizer is.

  `preprocess` is the eval view the source defines (None: the model type's default view)."""
  model_type: str
  config: dict
  variables: dict
  tokenizer_dir: Path | None = None
  preprocess: PreprocessSpec | None = None


Reader = Callable[[Path, Mapping[str, Any]], ConvertedModel]
Writer = Callable[[ConvertedModel, Path, Mapping[str, Any]], None]

# Formats whose writers make a directory (config.json inside); the others write one file.
DIRECTORY_FORMATS = ("flax", "hf", "timm-dino-vit")

# Model types whose directories must carry tokenizer files (they have a text tower).
TYPES_WITH_TEXT = ("clip",)


def read_flax(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  """Our model directory (config.json + model.safetensors [+ tokenizer files]), any model type."""
  del options
  model_type, config, variables = model_io.load_model_dir(src)
  variables = model_io.unstack_layer_params(variables)  # writers map per-layer names
  tokenizer_dir = Path(src) if model_io.has_tokenizer(src) else None
  preprocess = (model_io.read_preprocess(src) if model_type in model_io.IMAGE_MODEL_TYPES
                else None)
  return ConvertedModel(model_type, config, variables, tokenizer_dir, preprocess)


def write_flax(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  if model.model_type in TYPES_WITH_TEXT and model.tokenizer_dir is None:
    raise ValueError(f"a {model.model_type!r} model directory must carry its tokenizer files; pass "
                     f"--tokenizer PATH (a bpe_simple_vocab_16e6.txt.gz or an HF tokenizer directory)")
  model_io.save_model_dir(dst, model.model_type, model.config, model.variables, model.tokenizer_dir,
                          keep_others=bool(options.get("overwrite")), preprocess=model.preprocess)


def _merge(into: dict[str, Any], table: Mapping[str, Any], origin: str, kind: str) -> None:
  for name, function in table.items():
    if name in into:
      raise ValueError(f"{kind} format {name!r} is defined twice (again in {origin})")
    into[name] = function


def format_tables() -> tuple[dict[str, Reader], dict[str, Writer]]:
  """(readers, writers) by format name, from every module that defines formats."""
  from agriclip_jax.convert import clip_formats

  readers: dict[str, Reader] = {"flax": read_flax}
  writers: dict[str, Writer] = {"flax": write_flax}
  modules = [clip_formats]
  if importlib.util.find_spec("agriclip_jax.convert.dino") is not None:
    modules.append(importlib.import_module("agriclip_jax.convert.dino"))
  for module in modules:
    _merge(readers, getattr(module, "READERS", {}), module.__name__, "source")
    _merge(writers, getattr(module, "WRITERS", {}), module.__name__, "destination")
  return readers, writers


def get_reader(name: str) -> Reader:
  readers, _ = format_tables()
  if name not in readers:
    raise ValueError(f"unknown source format {name!r}; known source formats: {', '.join(sorted(readers))}")
  return readers[name]


def get_writer(name: str) -> Writer:
  _, writers = format_tables()
  if name not in writers:
    raise ValueError(f"unknown destination format {name!r}; known destination formats: "
                     f"{', '.join(sorted(writers))}")
  return writers[name]


def warn_non_finite(model: ConvertedModel, source: str, limit: int = 5) -> list[str]:
  """Warns on stderr about NaN / infinite weights (converted as they are: a checkpoint saved
  mid-divergence is still worth inspecting) and returns the names of the tensors that hold them."""
  import sys

  import numpy as np
  bad = sorted(name for name, value in model_io.flatten(model.variables).items()
               if np.issubdtype(np.asarray(value).dtype, np.floating)
               and not np.all(np.isfinite(np.asarray(value))))
  if bad:
    shown = ", ".join(bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")
    print(f"warning: {source}: {len(bad)} tensor(s) hold NaN or infinite values: {shown}",
          file=sys.stderr)
  return bad


def convert(src: str | Path, src_format: str, dst: str | Path, dst_format: str,
            options: Mapping[str, Any] | None = None) -> ConvertedModel:
  """Reads `src` in one format and writes `dst` in another; returns the model in between."""
  reader, writer = get_reader(src_format), get_writer(dst_format)
  with tempfile.TemporaryDirectory(prefix="agriclip-convert-") as scratch:
    opts = {**(options or {}), "scratch_dir": Path(scratch)}
    model = reader(Path(src), opts)
    warn_non_finite(model, str(src))
    if opts.get("preprocess"):  # the user's choice of view replaces the source's
      model.preprocess = model_io.preprocess_for(model.model_type, model.config, opts["preprocess"])
    writer(model, Path(dst), opts)
    if model.tokenizer_dir is not None and Path(scratch) in Path(model.tokenizer_dir).parents:
      model.tokenizer_dir = None  # the scratch copy is about to go; `dst` holds the files now
  return model
