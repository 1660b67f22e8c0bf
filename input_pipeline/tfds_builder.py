"""Turn any source (e.g. a captioned manifest) into a prepared TFDS dataset, without TensorFlow.

The dataset is written in ArrayRecord format, which `tfds.data_source` reads random-access (no
TensorFlow needed at either end); `open_source("tfds:NAME:SPLIT", data_dir=...)` then reads it back.
Captions are stored as raw UTF-8 bytes (surrogateescape) rather than a Text feature, so an odd
caption reaches the pipeline's validation step instead of failing the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _features():
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
      "has_image": np.bool_,
      "captions": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "label": np.int64,
      "path": tfds.features.Tensor(shape=(), dtype=np.object_),
      "key": tfds.features.Tensor(shape=(), dtype=np.object_),
      "error": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def _encode(text: str) -> bytes:
  return text.encode("utf-8", "surrogateescape")


def _example(record: Mapping[str, Any]) -> dict[str, Any]:
  return {
      "image_bytes": record["image_bytes"] or b"",
      "has_image": record["image_bytes"] is not None,
      "captions": [_encode(c) for c in record["captions"]],
      "label": int(record["label"]),
      "path": _encode(record["path"]),
      "key": _encode(record["key"]),
      "error": _encode(record.get("error") or ""),
  }


def prepare_tfds_dataset(splits: Mapping[str, Any], name: str, data_dir: str | Path,
                         version: str = "1.0.0", description: str = "") -> Path:
  """Write `{split: source}` as TFDS dataset `name` under data_dir; returns the dataset directory.

  Examples are keyed by record index so TFDS's deterministic shuffle is reproducible; records keep
  their source keys in the "key" feature.
  """
  import tensorflow_datasets as tfds
  if not _NAME.match(name):
    raise ValueError(f"TFDS dataset name {name!r} must be snake_case (letters, digits, underscores)")
  if not splits:
    raise ValueError("prepare_tfds_dataset needs at least one split")

  class _ManifestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description, features=_features())

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(source) for split, source in splits.items()}

    def _generate_examples(self, source):
      for index in range(len(source)):
        yield index, _example(source[index])

  _ManifestBuilder.name = name
  # TFDS looks for a checksums file next to a builder's module; for a class inside a package that
  # lookup imports `importlib_resources`, which tfds 4.9.10 only requires on Python < 3.9. A
  # one-part module name skips the lookup (this builder downloads nothing).
  _ManifestBuilder.__module__ = "agriclip_manifest_builder"
  builder = _ManifestBuilder(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return Path(builder.data_dir)
