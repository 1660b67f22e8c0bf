"""Suite-wide test set-up: 8 simulated CPU devices, fp32 matmuls, repo paths."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: multi-device logic is tested on simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORN = REPO_ROOT.parent / "shared" / "data" / "corn"  # 4,185 photos, beside the checkout
VENDORED_CORN = REPO_ROOT / "tests" / "data" / "corn"       # 12 of them, in the repository


@pytest.fixture(scope="session", autouse=True)
def _jax_precision():
  import jax
  # Parity tests against PyTorch compare fp32 results; XLA's CPU default is already full precision,
  # this makes it explicit for every backend.
  jax.config.update("jax_default_matmul_precision", "highest")
  yield


@pytest.fixture(scope="session")
def corn_dir() -> Path:
  """Real maize photos (ImageFolder trees lab/ and field/): the shared set when it is beside the
  checkout, else the vendored subset, so that a clone on its own runs every photo test
  (AGRICLIP_TEST_CORN=vendored picks the subset even where the shared set is)."""
  roots = (VENDORED_CORN,) if os.environ.get("AGRICLIP_TEST_CORN") == "vendored" else \
      (SHARED_CORN, VENDORED_CORN)
  for root in roots:
    if root.is_dir():
      return root
  pytest.skip(f"real photos found neither at {SHARED_CORN} nor at {VENDORED_CORN}")


@pytest.fixture(scope="session")
def shared_corn_dir() -> Path:
  """The whole shared set (4,185 photos), for the tests that count it or need many photos of a
  class; a clone without ../shared skips them (under CI=true that skip fails the run)."""
  if not SHARED_CORN.is_dir() or os.environ.get("AGRICLIP_TEST_CORN") == "vendored":
    pytest.skip(f"the shared photo set is not at {SHARED_CORN}")
  return SHARED_CORN


# ------------------------------------------------------------------------------------------------
# Under CI=true, parity and photo tests must run: a skip there (a missing library, missing photos)
# is a failure, so a broken environment cannot pass quietly.
# ------------------------------------------------------------------------------------------------

def pytest_configure(config):
  config.addinivalue_line("markers", "parity: compares with the real PyTorch libraries; under "
                                     "CI=true a skip fails the run")


def _must_not_skip(item) -> bool:
  fixtures = getattr(item, "fixturenames", ())
  return item.get_closest_marker("parity") is not None or "corn_dir" in fixtures or \
      "shared_corn_dir" in fixtures


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.skipped and os.environ.get("CI", "").lower() == "true" and _must_not_skip(item):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where parity and photo tests must run: {reason}"
