"""Suite-wide test set-up: 8 simulated CPU devices, fp32 matmuls, repo paths."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: multi-device logic is tested on simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CORN_DIR = REPO_ROOT.parent / "shared" / "data" / "corn"


@pytest.fixture(scope="session", autouse=True)
def _jax_precision():
  import jax
  # Parity tests against PyTorch compare fp32 results; XLA's CPU default is already full precision,
  # this makes it explicit for every backend.
  jax.config.update("jax_default_matmul_precision", "highest")
  yield


@pytest.fixture(scope="session")
def corn_dir() -> Path:
  if not CORN_DIR.is_dir():
    pytest.skip(f"real photos not found at {CORN_DIR}")
  return CORN_DIR
