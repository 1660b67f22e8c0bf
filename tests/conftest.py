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


# ------------------------------------------------------------------------------------------------
# Under CI=true, parity and photo tests must run: a skip there (a missing library, missing photos)
# is a failure, so a broken environment cannot pass quietly.
# ------------------------------------------------------------------------------------------------

def pytest_configure(config):
  config.addinivalue_line("markers", "parity: compares with the real PyTorch libraries; under "
                                     "CI=true a skip fails the run")


def _must_not_skip(item) -> bool:
  return item.get_closest_marker("parity") is not None or "corn_dir" in getattr(item, "fixturenames", ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.skipped and os.environ.get("CI", "").lower() == "true" and _must_not_skip(item):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where parity and photo tests must run: {reason}"
