"""Training faults of issue 17, each through the command a user types (`python -m agriclip_jax
train ...` as a subprocess, or `agriclip_jax.cli.main([...])` in this process when the run stops
before compiling anything): the message the user gets, the exit code, and that nothing on disk
was lost (compared byte for byte).

docs/reliability.md ("Training faults (issue 17)") has the table of these cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agriclip_jax import cli
from agriclip_jax.train.checkpoint import Checkpointer, verify_step
from agriclip_jax.train.workdir_lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.py")
TOTAL = 8
BASE = ["--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
        "--config.clip.layers=1", "--config.batch_size=8", "--config.tensorboard=False"]


def _args(workdir: Path, *extra: str, kind: str = "contrastive", total: int = TOTAL) -> list[str]:
  return ["train", "--config", f"{TINY}:{kind}", "--workdir", str(workdir),
          f"--config.total_steps={total}", *BASE, *extra]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  env.pop("AGRICLIP_DEBUG", None)
  return env


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "agriclip_jax", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "agriclip_jax", *args], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
  """The CLI in this process (runs that stop before compiling): (exit code, stdout, stderr)."""
  capsys.readouterr()
  code = cli.main(args)
  out, err = capsys.readouterr()
  return code, out, err


def _tree_digest(root: Path) -> dict[str, str]:
  """SHA-256 of every file under root, by relative path: 'nothing lost' is this staying equal."""
  return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _params(workdir: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(workdir / "models/clip/model.safetensors"))


def _largest_chunk(step_dir: Path) -> Path:
  chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(chunks, key=lambda p: p.stat().st_size)


def _one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("agriclip train: error: ")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
  """A finished 8-step contrastive run (checkpoints at 4 and 8, models exported). Tests copy it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = _run(_args(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert _steps(workdir) == [4, 8]
  return workdir


def _copy(finished: Path, tmp_path: Path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  return workdir


# ----------------------------------------------------------------------------------------------
# (2) checkpoint integrity, (3) saving over a step that was moved aside
# ----------------------------------------------------------------------------------------------

def test_flipped_bytes_in_the_latest_step_are_caught_and_the_run_redone_from_the_step_before(
    finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  expected = _params(workdir)
  chunk = _largest_chunk(workdir / "checkpoints/8")
  data = bytearray(chunk.read_bytes())
  data[1000:1064] = bytes(b ^ 0xFF for b in data[1000:1064])
  chunk.write_bytes(bytes(data))
  damaged = _tree_digest(workdir / "checkpoints/8")
  step4 = _tree_digest(workdir / "checkpoints/4")

  result = _run(_args(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"warning: checkpoint step 8 in {workdir / 'checkpoints'} is damaged: "
          f"{chunk} changed after it was written (its SHA-256 differs from the manifest); "
          f"moved it aside to {workdir / 'checkpoints-quarantine'}/8-") in result.stderr
  assert f"resumed from {workdir / 'checkpoints'} at step 4" in result.stdout
  # Nothing lost: the damaged step sits byte for byte in the quarantine; step 4 is untouched.
  [moved] = [p for p in (workdir / "checkpoints-quarantine").iterdir() if p.is_dir()]
  assert _tree_digest(moved) == damaged
  assert "changed after it was written" in Path(f"{moved}.reason.txt").read_text()
  assert _tree_digest(workdir / "checkpoints/4") == step4
  # Steps 5-8 redone from step 4 give the very same model; no NaN reaches the export.
  assert _steps(workdir) == [4, 8] and verify_step(workdir / "checkpoints/8")[0] == "verified"
  final = _params(workdir)
  for name in expected:
    np.testing.assert_array_equal(final[name], expected[name], err_msg=name)


def test_an_empty_and_a_truncated_step_are_moved_aside_and_their_steps_saved_again(finished,
                                                                                   tmp_path):
  workdir = _copy(finished, tmp_path)
  (workdir / "checkpoints/12").mkdir()  # e.g. a copy or sync that stopped after mkdir
  chunk = _largest_chunk(workdir / "checkpoints/8")
  chunk.write_bytes(chunk.read_bytes()[:100])
  config_before = (workdir / "config.json").read_bytes()

  result = _run(_args(workdir, total=12))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "already exists" not in result.stderr
  assert f"checkpoint step 12 in {workdir / 'checkpoints'} is damaged: the directory is empty" \
      in result.stderr
  assert (f"checkpoint step 8 in {workdir / 'checkpoints'} is damaged: {chunk} is 100 bytes, "
          in result.stderr)
  assert "at step 4" in result.stdout
  moved = sorted(p.name.split("-")[0] for p in (workdir / "checkpoints-quarantine").iterdir()
                 if p.is_dir())
  assert moved == ["12", "8"]
  assert _steps(workdir) == [8, 12]
  assert all(verify_step(workdir / f"checkpoints/{s}")[0] == "verified" for s in (8, 12))
  logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, 13))

  # (9) The same command again: nothing left to train. It says so, exports again and leaves the
  # run's config.json and metrics as they were.
  config_after = (workdir / "config.json").read_bytes()
  assert config_after != config_before  # total_steps=12 was recorded by the run that trained
  metrics = (workdir / "metrics.jsonl").read_bytes()
  again = _run(_args(workdir, total=12))
  assert again.returncode == 0, again.stderr[-3000:]
  assert (f"already done at step 12 (config.total_steps=12): exported {workdir / 'models'} from "
          f"that checkpoint") in again.stdout
  assert (workdir / "config.json").read_bytes() == config_after
  assert (workdir / "metrics.jsonl").read_bytes() == metrics


def test_total_steps_below_the_checkpoint_is_refused_and_changes_nothing(finished, tmp_path,
                                                                         capsys):
  workdir = _copy(finished, tmp_path)
  before = _tree_digest(workdir)
  code, _, err = _main(_args(workdir, "--config.mesh.data=1", total=4), capsys)
  assert code == 2
  assert _one_error_line(err) == (
      f"agriclip train: error: config.total_steps=4 is below the newest checkpoint (step 8 in "
      f"{workdir / 'checkpoints'}): this run would train nothing; give --config.total_steps "
      f"above 8 to go on, or use another --workdir")
  assert _tree_digest(workdir) == before


def test_restored_non_finite_parameters_count_as_a_damaged_step(tmp_path, capsys):
  import jax
  state = {"params": {"w": np.array([1.0, np.nan], np.float32)}, "step": np.int32(3)}
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  saver = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  saver.save(3, state, None)
  saver.close()
  assert verify_step(tmp_path / "checkpoints/3")[0] == "verified"  # the bytes are as written
  restorer = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  assert restorer.restore_latest(target, None) is None
  restorer.close()
  assert "checkpoint step 3" in capsys.readouterr().err
  assert "holds non-finite values (NaN or infinity)" in \
      next((tmp_path / "checkpoints-quarantine").glob("*.reason.txt")).read_text()


def test_a_step_without_a_manifest_is_restored_with_a_warning(tmp_path, capsys):
  import jax
  state = {"params": {"w": np.array([1.0, 2.0], np.float32)}, "step": np.int32(3)}
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  saver = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  saver.save(3, state, None)
  saver.close()
  (tmp_path / "checkpoints/3/agriclip_manifest.json").unlink()  # as an older version wrote it
  restorer = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  restored, step = restorer.restore_latest(target, None)
  restorer.close()
  assert step == 3
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), state["params"]["w"])
  assert (f"warning: checkpoint step 3 in {tmp_path / 'checkpoints'} has no agriclip_manifest.json"
          in capsys.readouterr().err)
  assert not (tmp_path / "checkpoints-quarantine").exists()


def test_a_run_that_skips_most_steps_stops_without_saving_or_exporting(tmp_path):
  # An absurd learning rate: step 1 sends the weights to ~1e30; every later step is non-finite
  # and skipped (nonfinite="skip").
  workdir = tmp_path / "run"
  result = _run(_args(workdir, "--config.checkpoint_every_steps=1", "--config.async_checkpoints=False",
                      "--config.clip.optimizer.lr=1e30", "--config.clip.optimizer.warmup_steps=0",
                      total=6))
  assert result.returncode == 2, result.stderr[-3000:]
  assert _one_error_line(result.stderr) == (
      f"agriclip train: error: 2 of 3 steps had a non-finite loss or gradient and were skipped, "
      f"more than config.max_skipped_fraction=0.5: stopping without saving or exporting a model; "
      f"the last good checkpoint (2) is intact in {workdir / 'checkpoints'}")
  assert _steps(workdir) == [1, 2]
  assert verify_step(workdir / "checkpoints/2")[0] == "verified"
  assert not (workdir / "models").exists()


# ----------------------------------------------------------------------------------------------
# (4) one live run per workdir, (5) Ctrl-C
# ----------------------------------------------------------------------------------------------

def _wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      stderr = process.stderr.read() if process.stderr else "(stderr went to a file)"
      pytest.fail(f"the run ended before {what}:\n{stderr[-3000:]}")
    time.sleep(0.05)
  process.kill()
  pytest.fail(f"{what}: not within {timeout}s")


def _logged_steps(workdir: Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_second_run_on_a_live_workdir_is_refused_and_ctrl_c_saves_and_stops(tmp_path, capsys):
  workdir = tmp_path / "run"
  process = _start(_args(workdir, total=400))
  _wait_for(lambda: len(_logged_steps(workdir)) >= 2, process, "step 2")
  holder = json.loads((workdir / LOCK_NAME).read_text())
  assert holder["pid"] == process.pid

  code, _, err = _main(_args(workdir, "--config.mesh.data=1", total=400), capsys)
  assert code == 2
  line = _one_error_line(err)
  assert line.startswith(f"agriclip train: error: {workdir / LOCK_NAME}: another training run is "
                         f"using workdir {workdir} (pid {process.pid} on host {holder['host']}, "
                         f"started {holder['started']})"), line

  signalled_at = _logged_steps(workdir)[-1]
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert "Ctrl-C: saving a checkpoint at the end of this step, then stopping" in err
  saved = _steps(workdir)[-1]
  assert signalled_at <= saved <= signalled_at + 2, (signalled_at, saved)
  assert (f"stopped by SIGINT: checkpoint saved at step {saved} in {workdir / 'checkpoints'}; "
          f"run the same command again to resume") in out
  assert verify_step(workdir / f"checkpoints/{saved}")[0] == "verified"
  assert not (workdir / LOCK_NAME).exists()  # released on the way out

  # A lock left by a run that was killed (its pid is gone) is taken over with a notice.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = {"host": holder["host"], "pid": dead.pid, "started": "earlier", "pid_start_ticks": None}
  (workdir / LOCK_NAME).write_text(json.dumps(stale))
  result = _run(_args(workdir, total=saved + 2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"notice: {workdir / LOCK_NAME} was left by a run that no longer runs (pid {dead.pid} on "
          f"host {holder['host']}, started earlier); taking it over") in result.stderr
  assert f"at step {saved}" in result.stdout
  assert not (workdir / LOCK_NAME).exists()


def test_a_second_ctrl_c_stops_at_once_and_leaves_only_complete_steps(tmp_path):
  workdir = tmp_path / "run"
  stderr_path = tmp_path / "stderr.txt"
  with open(stderr_path, "w") as stderr:
    process = subprocess.Popen(
        [sys.executable, "-m", "agriclip_jax",
         *_args(workdir, "--config.checkpoint_every_steps=2", total=400)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    # A committed checkpoint first (saves are asynchronous), so that resuming has one to find.
    _wait_for(lambda: (workdir / "checkpoints").exists() and _steps(workdir), process,
              "a complete checkpoint")
    before = _steps(workdir)
    process.send_signal(signal.SIGINT)
    # The second Ctrl-C goes as soon as the first is acknowledged (two signals that arrive
    # before Python runs the handler count as one), so it lands in the step or the save.
    deadline = time.time() + 60
    while "Ctrl-C: saving" not in stderr_path.read_text() and process.poll() is None:
      assert time.time() < deadline, "the first Ctrl-C was not acknowledged within 60 s"
      time.sleep(0.01)
    if process.poll() is None:
      process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
  err = stderr_path.read_text()
  assert "Traceback" not in err, err[-3000:]
  if "stopped at once by a second Ctrl-C" in err:
    assert process.returncode == 130, err[-3000:]
  else:
    # The first stop had already finished: the second Ctrl-C found the interpreter exiting, and
    # Python's default SIGINT action ended it. A shell reads both exits as 130.
    assert "stopped by SIGINT: checkpoint saved" in out, (out[-3000:], err[-3000:])
    assert process.returncode in (130, -signal.SIGINT), err[-3000:]
  # Whatever the second Ctrl-C cut short is under Orbax's temporary name; every step directory
  # under its final name is complete.
  steps = _steps(workdir)
  assert set(before) <= set(steps)
  assert all(verify_step(workdir / f"checkpoints/{s}")[0] == "verified" for s in steps)
  # The resumed run saves over the step the second Ctrl-C cut short.
  cut_short = [int(p.name.split(".")[0]) for p in (workdir / "checkpoints").iterdir()
               if not p.name.isdigit()]
  total = max(steps + cut_short) + 2
  result = _run(_args(workdir, "--config.checkpoint_every_steps=2", total=total))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"at step {steps[-1]}" in result.stdout and "moved it aside" not in result.stderr
  assert [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()] == []
  assert verify_step(workdir / f"checkpoints/{total}")[0] == "verified"


# ----------------------------------------------------------------------------------------------
# (8) a truncated metrics line
# ----------------------------------------------------------------------------------------------

def test_a_cut_short_metrics_line_is_dropped_with_a_warning_on_resume(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / "checkpoints/8")  # the run "died" after step 8 was logged, before its save
  metrics = workdir / "metrics.jsonl"
  lines = metrics.read_bytes().splitlines(keepends=True)
  assert len(lines) == 8
  metrics.write_bytes(b"".join(lines[:7]) + lines[7][:25])  # line 8 cut mid-record

  result = _run(_args(workdir, total=8))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"warning: {metrics} line 8 is not a whole JSON record" in result.stderr
  after = metrics.read_bytes().splitlines(keepends=True)
  assert after[:4] == lines[:4]  # the steps up to the restored checkpoint, byte for byte
  assert [json.loads(line)["step"] for line in after] == list(range(1, 9))


# ----------------------------------------------------------------------------------------------
# (6) a tokenizer larger than the model, (11) one-line errors
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
  """An ImageFolder with 4 good photos and 4 files that are not images (50 % bad)."""
  from PIL import Image
  root = tmp_path_factory.mktemp("folder") / "images"
  (root / "leaf").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"leaf/good{i}.png")
    (root / f"leaf/bad{i}.png").write_bytes(b"not an image at all")
  return root


def test_a_tokenizer_larger_than_the_text_model_is_refused_before_any_compute(image_folder,
                                                                             tmp_path, capsys):
  from agriclip_jax.tokenizer import train_bpe_tokenizer
  tokenizer = train_bpe_tokenizer(["a photo of a leaf"] * 20, vocab_size=600,
                                  out_dir=tmp_path / "tokenizer")
  workdir = tmp_path / "run"
  code, _, err = _main(_args(workdir, f"--config.data.source={image_folder}",
                             f"--config.data.tokenizer={tmp_path / 'tokenizer'}"), capsys)
  assert code == 2
  assert _one_error_line(err) == (
      f"agriclip train: error: tokenizer {tmp_path / 'tokenizer'} has {tokenizer.vocab_size} "
      f"tokens but the CLIP text model embeds only 16 (config.clip.vocab_size=16): token ids "
      f"from 16 up have no embedding and the loss would be NaN from step 1; use the model's own "
      f"tokenizer or set --config.clip.vocab_size={tokenizer.vocab_size}")
  assert not workdir.exists()


def test_half_bad_data_stops_a_short_run_at_the_end_of_its_first_epoch(image_folder, tmp_path,
                                                                      capsys):
  workdir = tmp_path / "run"
  # 8 records, 4 good; batch 2: the 4 steps need more than one epoch (the old check waited for
  # 200 records, so this run trained quietly).
  code, _, err = _main(_args(workdir, f"--config.data.source={image_folder}",
                             "--config.batch_size=2", "--config.mesh.data=1", kind="dino",
                             total=4), capsys)
  assert code == 2
  line = _one_error_line(err)
  assert line.startswith("agriclip train: error: too many bad records (limit 1.00%): 4 of 8 "
                         "records skipped (50.00%)"), line
  assert not (workdir / "models").exists()


def _write(path: Path, text: str) -> Path:
  path.write_text(text)
  return path


@pytest.mark.parametrize("case", ["syntax", "raises", "none", "not_py", "image_size",
                                  "skipped_fraction"])
def test_bad_configs_are_one_line_and_create_no_workdir(case, tmp_path, capsys):
  files = {"syntax": ("c.py", "def get_config(:\n"),
           "raises": ("c.py", "def get_config():\n  return 1 / 0\n"),
           "none": ("c.py", "def get_config():\n  return None\n"),
           "not_py": ("c.json", "{}")}
  spec = str(_write(tmp_path / files[case][0], files[case][1])) if case in files else \
      f"{TINY}:contrastive"
  extra = {"image_size": ["--config.data.image_size=0"],
           "skipped_fraction": ["--config.max_skipped_fraction=1.5"]}.get(case, [])
  workdir = tmp_path / "run"
  code, _, err = _main(["train", "--config", spec, "--workdir", str(workdir), *extra], capsys)
  assert code == 2
  expected = {
      "syntax": f"config file {tmp_path / 'c.py'}: syntax error at line 1: ",
      "raises": f"config file {tmp_path / 'c.py'}: get_config() failed: ZeroDivisionError: "
                f"division by zero",
      "none": f"config file {tmp_path / 'c.py'}: get_config() returned NoneType, not an "
              f"ml_collections.ConfigDict",
      "not_py": f"config file {tmp_path / 'c.json'} is not a .py file",
      "image_size": "config.data.image_size=0 must be a positive integer",
      "skipped_fraction": "config.max_skipped_fraction=1.5 must be a number in [0, 1)",
  }[case]
  assert _one_error_line(err).startswith(f"agriclip train: error: {expected}"), err
  assert not workdir.exists()


@pytest.mark.parametrize("override, expected", [
    ("data.jitter_p=1.5", "config.data.jitter_p=1.5 must be a probability in [0, 1]"),
    ("data.blur_p=[1.0, 0.1]", "config.data.blur_p=(1.0, 0.1) needs 3 probabilities"),
    ("data.clip_crop_scale=[0.5, 0.2]",
     "config.data.clip_crop_scale=(0.5, 0.2) must be (low, high) with 0 < low <= high <= 1")])
def test_bad_augmentation_keys_are_named_before_anything_runs(override, expected, tmp_path, capsys):
  workdir = tmp_path / "run"
  code, _, err = _main(["train", "--config", f"{TINY}:joint", "--workdir", str(workdir),
                        f"--config.{override}"], capsys)
  assert code == 2
  assert _one_error_line(err).startswith(f"agriclip train: error: {expected}"), err
  assert not workdir.exists()


def test_resuming_a_workdir_of_another_kind_is_refused_and_changes_nothing(finished, tmp_path,
                                                                          capsys):
  workdir = _copy(finished, tmp_path)
  before = _tree_digest(workdir)
  code, _, err = _main(_args(workdir, "--config.mesh.data=1", kind="dino"), capsys)
  assert code == 2
  assert _one_error_line(err) == (
      f"agriclip train: error: {workdir / 'config.json'}: workdir {workdir} holds a "
      f"'contrastive' run but this config is kind='dino'; use another --workdir for it")
  assert _tree_digest(workdir) == before


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs: room for one checkpoint of the tiny run, not two."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_the_async_save_is_one_line_naming_the_checkpoint_dir(small_disk):
  workdir = small_disk / "run"
  result = _run(_args(workdir))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f"agriclip train: error: {workdir / 'checkpoints'}: No space left on device (writing a "
      f"checkpoint)"]
  # The checkpoint before is intact, the cut-short save never got its final name, no model.
  assert _steps(workdir) == [4]
  assert verify_step(workdir / "checkpoints/4")[0] == "verified"
  assert not (workdir / "models").exists() and not (workdir / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# Units under the cases above: a short metrics write, a reused pid
# ----------------------------------------------------------------------------------------------

def test_a_metrics_line_cut_short_by_the_disk_is_cut_back_off(tmp_path, monkeypatch):
  from agriclip_jax.train import metrics_writer
  writer = metrics_writer.MetricsWriter(tmp_path, tensorboard=False)
  writer.write(1, {"loss": 1.5})
  before = (tmp_path / "metrics.jsonl").read_bytes()
  real_write = os.write
  monkeypatch.setattr(metrics_writer.os, "write", lambda fd, data: real_write(fd, data[:7]))
  with pytest.raises(OSError, match="No space left on device") as error:
    writer.write(2, {"loss": 1.25})
  assert error.value.filename == str(tmp_path / "metrics.jsonl")
  writer.close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == before  # whole lines only


def test_a_live_pid_with_another_start_time_is_not_the_lock_holder():
  import socket
  from agriclip_jax.train import workdir_lock
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "pid_start_ticks": workdir_lock._process_start_ticks(os.getpid())}
  assert not workdir_lock.holder_is_gone(me)
  if me["pid_start_ticks"] is None:
    pytest.skip("no /proc start times on this system")
  assert workdir_lock.holder_is_gone({**me, "pid_start_ticks": me["pid_start_ticks"] - 1})
  assert not workdir_lock.holder_is_gone({**me, "host": "another-host"})


def test_bad_record_counts_reach_metrics_and_the_progress_line(tmp_path):
  """Records skipped so far, by reason, in every log line of metrics.jsonl and on stdout."""
  from PIL import Image
  root = tmp_path / "images"
  (root / "leaf").mkdir(parents=True)
  rng = np.random.default_rng(1)
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"leaf/good{i:02d}.png")
  for i in range(6):  # a third bad: under the 1 % limit's check, which waits for 18 records here
    (root / f"leaf/bad{i}.png").write_bytes(b"not an image at all")
  workdir = tmp_path / "run"
  run = _run(_args(workdir, f"--config.data.source={root}", "--config.batch_size=2",
                   "--config.mesh.data=1", kind="dino", total=2))
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = lines[-1]
  assert last["data/skipped"] == last["data/skipped/not_an_image"] >= 1
  assert last["data/seen"] >= 2 * 2 + last["data/skipped"]  # at least the trained records
  assert f"skipped {int(last['data/skipped'])} of {int(last['data/seen'])} records (not_an_image " \
      f"{int(last['data/skipped'])})" in run.stdout
