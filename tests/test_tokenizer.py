"""The CLIP tokenizer against transformers.CLIPTokenizer, both built from the real OpenAI BPE file."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest

from agriclip_jax import tokenizer as tk


@pytest.fixture(scope="module")
def openai_bpe():
  path = tk.installed_openai_bpe()
  if path is None:
    pytest.skip("open_clip_torch (which ships bpe_simple_vocab_16e6.txt.gz) is not installed")
  return path


@pytest.fixture(scope="module")
def ours(openai_bpe):
  return tk.ClipTokenizer.from_openai_bpe(openai_bpe)


@pytest.fixture(scope="module")
def hf_tokenizer(ours, tmp_path_factory):
  from transformers import CLIPTokenizer
  directory = ours.save(tmp_path_factory.mktemp("openai_tokenizer"))
  return CLIPTokenizer.from_pretrained(str(directory))


def varied_captions() -> list[str]:
  """Over 200 captions: plain, unicode, punctuation, numbers, odd whitespace and very long ones."""
  subjects = ["a leaf with boron deficiency", "MAIZE Leaf Blight", "cattle named Bessie",
              "a fish type of Neon Tetra specie", "rock'n'roll cows", "the farmer's wheat",
              "café au lait spots on a naïve calf", "Ærøskøbing barley", "東京の田んぼ", "🌽 corn!! 🐄",
              "straße mit Kühen", "Ωmega-3 rich feed", "قمح صحي", "गेहूं का पौधा", "e\u0301pi de ble\u0301",
              "soy\u00a0bean\tfield\n\nrow", "zero\u200bwidth", "&amp; html entities &lt;b&gt;",
              "“curly quotes” and ‘single’", "C:\\data\\img_01.jpg", "x" * 40, "Don't, won't, it's, we've"]
  templates = ["a photo of {}.", "{}", "Image of {} (close-up)", "   {}   ", "{}!!! ... ?!",
               "a photo contain {} deficiency", "{} -- 12.5% infected, 3/4 leaves, 2024-05-01",
               "{} at 40°C, pH 6.5, 1,000,000 spores/ml", "#{}: #1 @home [v2] {{x}}"]
  captions = [t.format(s) for t, s in itertools.product(templates, subjects)]
  long_sentence = " ".join(f"leaf{i} shows lesion number {i}, grey-green & tan;" for i in range(60))
  captions += [long_sentence, "supercalifragilistic" * 30, "1234567890" * 20, "", "   ", "a",
               "<|endoftext|> typed by hand", "<|startoftext|>hello", "ALL CAPS SHOUTING",
               "mixed\r\nline\rbreaks", "emoji 🌾🌾🌾 only", "…ellipsis…", "tab\tseparated\tvalues"]
  return captions


def test_captions_are_many_and_varied():
  captions = varied_captions()
  assert len(captions) >= 200
  assert any(len(c) > 1000 for c in captions)
  assert any(not c.isascii() for c in captions)


def test_ids_equal_transformers_clip_tokenizer(ours, hf_tokenizer):
  captions = varied_captions()
  reference = hf_tokenizer(captions, max_length=77, truncation=True, padding="max_length")
  expected = np.where(np.array(reference["attention_mask"]) == 1, np.array(reference["input_ids"]), 0)
  got = ours.encode(captions)
  assert got.dtype == np.int32 and got.shape == (len(captions), 77)
  mismatched = [c for c, g, e in zip(captions, got, expected) if not np.array_equal(g, e)]
  assert not mismatched, f"{len(mismatched)} captions differ, first: {mismatched[0]!r}"
  # Long captions are cut and still end with <|endoftext|>, which is where the text tower pools.
  long_rows = got[[len(hf_tokenizer.tokenize(c)) > 75 for c in captions]]
  assert len(long_rows) >= 3 and (long_rows[:, -1] == ours.end_id).all()


def test_known_openai_ids(ours):
  # open_clip.tokenize("a photo of a cat") is [49406, 320, 1125, 539, 320, 2368, 49407, 0, ...].
  tokens = ours.encode(["a photo of a cat"])[0]
  np.testing.assert_array_equal(tokens[:8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])
  assert ours.vocab_size == 49408 and ours.start_id == 49406 and ours.end_id == 49407


def test_vocab_layout_follows_the_merges_file(ours, openai_bpe):
  lines = gzip.open(openai_bpe, "rt", encoding="utf-8").read().split("\n")
  first_merge = "".join(lines[1].split())
  last_merge = "".join(lines[tk.OPENAI_NUM_MERGES].split())
  assert ours.vocab[first_merge] == 512
  assert ours.vocab[last_merge] == 49405
  assert ours.vocab["!"] == 0 and ours.vocab["!</w>"] == 256


def test_truncation_keeps_end_token_and_pads_with_zero(ours):
  tokens = ours.encode(["one two three four five six seven eight", "hi"], context_length=6)
  np.testing.assert_array_equal(tokens[0], [ours.start_id] + ours.tokenize("one two three four") + [ours.end_id])
  np.testing.assert_array_equal(tokens[1], [ours.start_id, ours.tokenize("hi")[0], ours.end_id, 0, 0, 0])


def test_save_and_load_round_trip(ours, tmp_path):
  ours.save(tmp_path)
  again = tk.load_tokenizer(tmp_path)
  captions = varied_captions()[:40]
  np.testing.assert_array_equal(again.encode(captions), ours.encode(captions))
  assert ours.decode(ours.encode(["a photo of a cat!"])[0]) == "a photo of a cat !"


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tk.load_tokenizer(tmp_path / "nope.txt.gz")
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tk.load_tokenizer(tmp_path)
  (tmp_path / "bad.txt").write_text("x")
  with pytest.raises(ValueError, match="bad.txt"):
    tk.load_tokenizer(tmp_path / "bad.txt")


def test_end_token_must_be_largest_id():
  vocab = tk.clip_vocab_from_merges([])
  vocab["<|endoftext|>"], vocab["!"] = vocab["!"], vocab["<|endoftext|>"]
  with pytest.raises(ValueError, match="largest id"):
    tk.ClipTokenizer(vocab, [])


def test_trained_tokenizer_is_clip_shaped_and_matches_transformers(tmp_path):
  from transformers import CLIPTokenizer
  rng = np.random.default_rng(0)
  words = ["maize", "leaf", "blight", "rust", "healthy", "cattle", "fish", "wheat", "spots", "grey"]
  corpus = [" ".join(rng.choice(words, 6)) + f" {i}." for i in range(300)]
  trained = tk.train_bpe_tokenizer(corpus, vocab_size=600, out_dir=tmp_path)
  assert 514 < trained.vocab_size <= 600
  assert trained.end_id == trained.vocab_size - 1 and trained.start_id == trained.vocab_size - 2
  assert len(trained.tokenize("maize leaf blight")) == 3  # frequent words became whole tokens
  unseen = ["Ünseen wörds 東京 🌽 & symbols", "maize leaf", "x" * 200]
  tokens = trained.encode(unseen)
  assert (tokens >= 0).all() and (tokens < trained.vocab_size).all()
  reference = CLIPTokenizer.from_pretrained(str(tmp_path))
  ref = reference(unseen, max_length=77, truncation=True, padding="max_length")
  np.testing.assert_array_equal(tokens, np.where(np.array(ref["attention_mask"]) == 1,
                                                 np.array(ref["input_ids"]), 0))


def test_train_rejects_too_small_vocab():
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_bpe_tokenizer(["a b c"], vocab_size=100)


@pytest.fixture(scope="module")
def open_clip_simple_tokenizer(openai_bpe):
  """open_clip's own SimpleTokenizer (the OpenAI code), loaded without importing the open_clip
  package (which needs torchvision). ftfy is not installed: a stand-in does its NFC step only, so
  the comparison below avoids text that ftfy would otherwise repair."""
  import importlib
  import importlib.machinery
  import sys
  import types
  import unicodedata

  package = types.ModuleType("_open_clip_tokenizer_reference")
  package.__path__ = [str(openai_bpe.parent)]
  ftfy = types.ModuleType("ftfy")
  ftfy.__spec__ = importlib.machinery.ModuleSpec("ftfy", None)
  ftfy.fix_text = lambda text: unicodedata.normalize("NFC", text)
  saved = sys.modules.get("ftfy")
  sys.modules.update({"_open_clip_tokenizer_reference": package, "ftfy": ftfy})
  try:
    module = importlib.import_module("_open_clip_tokenizer_reference.tokenizer")
  finally:
    if saved is None:
      sys.modules.pop("ftfy", None)
    else:
      sys.modules["ftfy"] = saved
  return module.SimpleTokenizer(bpe_path=str(openai_bpe))


def test_ids_equal_open_clip_simple_tokenizer(ours, open_clip_simple_tokenizer):
  # HF (our reference of record) does not unescape HTML entities or treat typed special tokens
  # as text the way open_clip does; everything else must agree with OpenAI's original code.
  captions = [c for c in varied_captions() if "&" not in c and "<|" not in c]
  assert len(captions) >= 180
  expected = open_clip_simple_tokenizer(captions, context_length=77).numpy()
  got = ours.encode(captions)
  mismatched = [c for c, g, e in zip(captions, got, expected) if not np.array_equal(g, e)]
  assert not mismatched, f"{len(mismatched)} captions differ, first: {mismatched[0]!r}"
