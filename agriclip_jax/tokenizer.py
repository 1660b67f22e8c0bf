"""The CLIP BPE tokenizer, built on HF `tokenizers` from a checkpoint's own files.

Three sources give the same tokenizer:
  - an HF tokenizer directory (`vocab.json` + `merges.txt`), as saved with a CLIPModel;
  - open_clip's `bpe_simple_vocab_16e6.txt.gz` (the OpenAI merges list), converted the way open_clip
    and HF build their vocabularies: 256 byte symbols, the same 256 with '</w>', one token per
    merge, then `<|startoftext|>` and `<|endoftext|>`;
  - `train_bpe_tokenizer`, a byte-level BPE learned from captions for models trained from scratch.

Text handling is that of `transformers.CLIPTokenizer` (the tokenizers-backed class, which is what
CLIP uses when ftfy is absent): NFC, runs of whitespace -> one space, lower-case; CLIP's split regex;
byte-level symbols with an end-of-word suffix. Sequences are `[SOT] ids [EOT]`, truncated so that the
end token is kept, and padded with 0 as open_clip does. The text tower pools at argmax(ids), so
`<|endoftext|>` must be the largest id; every constructor checks that.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
MERGES_HEADER = "#version: 0.2"
# CLIP's word split: special tokens, common English contractions, letter runs, single digits and runs
# of anything else that is not whitespace. Digits are split one by one, as in the OpenAI tokenizer.
CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                      r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# The OpenAI merges file holds 48894 merges after its header line (49408 - 512 - 2).
OPENAI_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters.

  Printable latin-1 bytes map to themselves; the others are shifted above 255 so that no byte is
  a whitespace or control character. The order of this dict is the order of CLIP's first 256 ids.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  codes = list(printable)
  shift = 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      codes.append(256 + shift)
      shift += 1
  return dict(zip(printable, (chr(c) for c in codes)))


def clip_vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's vocabulary layout: bytes, bytes + '</w>', one token per merge, then the two specials."""
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
  tokens += [START_TOKEN, END_TOKEN]
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"merges produce duplicate tokens ({len(tokens) - len(vocab)} duplicates)")
  return vocab


def read_openai_merges(path: str | Path) -> list[tuple[str, str]]:
  """The merges of open_clip's `bpe_simple_vocab_16e6.txt.gz` (header line skipped)."""
  path = Path(path)
  try:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read a gzip BPE merges file ({e})") from e
  merges = [tuple(line.split()) for line in lines[1:1 + OPENAI_NUM_MERGES]]
  bad = [i for i, m in enumerate(merges) if len(m) != 2]
  if bad:
    raise ValueError(f"{path}: line {bad[0] + 2} is not a merge of two symbols: {lines[bad[0] + 1]!r}")
  return merges  # type: ignore[return-value]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
  merges = []
  for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
    if not line or line.startswith("#version"):
      continue
    pair = tuple(line.split(" "))
    if len(pair) != 2:
      raise ValueError(f"{path}:{number}: expected two symbols separated by a space, got {line!r}")
    merges.append(pair)
  return merges  # type: ignore[return-value]


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
  """A `tokenizers.Tokenizer` that splits and encodes text as transformers.CLIPTokenizer does."""
  backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                          end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=END_TOKEN))
  backend.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  backend.decoder = decoders.ByteLevel()
  # Specials typed in a caption become the special ids, as in transformers.CLIPTokenizer.
  backend.add_special_tokens([START_TOKEN, END_TOKEN])
  return backend


class ClipTokenizer:
  """CLIP BPE: `encode(texts) -> int32 [N, context_length]` with start/end tokens and 0 padding."""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "<memory>"):
    for token in (START_TOKEN, END_TOKEN):
      if token not in vocab:
        raise ValueError(f"{source}: vocabulary has no {token} token")
    end_id = vocab[END_TOKEN]
    if end_id != max(vocab.values()):
      raise ValueError(f"{source}: {END_TOKEN} has id {end_id} but the largest id is "
                       f"{max(vocab.values())}; CLIP's text tower pools at argmax(ids), so the "
                       f"end token must have the largest id")
    self.vocab = dict(vocab)
    self.merges = list(merges)
    self.source = source
    self.start_id = vocab[START_TOKEN]
    self.end_id = end_id
    self._backend = _build_backend(self.vocab, self.merges)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @classmethod
  def from_directory(cls, path: str | Path) -> "ClipTokenizer":
    """From an HF tokenizer directory or a model directory holding vocab.json + merges.txt."""
    path = Path(path)
    vocab_path, merges_path = path / VOCAB_FILE, path / MERGES_FILE
    for needed in (vocab_path, merges_path):
      if not needed.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file {needed.name} not found (a CLIP tokenizer "
                                f"directory holds {VOCAB_FILE} and {MERGES_FILE})")
    try:
      vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_path}: not valid JSON ({e})") from e
    return cls(vocab, _read_merges_txt(merges_path), source=str(path))

  @classmethod
  def from_openai_bpe(cls, path: str | Path) -> "ClipTokenizer":
    """From open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    merges = read_openai_merges(path)
    return cls(clip_vocab_from_merges(merges), merges, source=str(path))

  def tokenize(self, text: str) -> list[int]:
    """Ids of one text without start/end tokens."""
    return self._backend.encode(text, add_special_tokens=False).ids

  def encode(self, texts: Sequence[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """int32 [N, context_length]: [SOT] ids [EOT] 0 ...; long texts are cut, keeping [EOT] last."""
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length={context_length} leaves no room for the start and end tokens")
    encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
    tokens = np.zeros((len(encodings), context_length), np.int32)
    for row, encoding in enumerate(encodings):
      ids = [self.start_id] + encoding.ids[:context_length - 2] + [self.end_id]
      tokens[row, :len(ids)] = ids
    return tokens

  def decode(self, ids: Iterable[int]) -> str:
    """Text of one row of ids up to its end token (padding is 0, which is also the id of '!', so
    the end token, not the value, tells where the text stops)."""
    kept = []
    for token in (int(i) for i in ids):
      if token == self.end_id:
        break
      if token != self.start_id:
        kept.append(token)
    return self._backend.decode(kept).replace(END_OF_WORD, " ").strip()

  def save(self, directory: str | Path) -> Path:
    """Writes vocab.json + merges.txt (the files transformers.CLIPTokenizer reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VOCAB_FILE).write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]
    (directory / MERGES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def installed_openai_bpe() -> Path | None:
  """open_clip's BPE file from an installed open_clip_torch package, found without importing it
  (importing open_clip needs torchvision); None when the package is absent."""
  import importlib.util
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
    if candidate.is_file():
      return candidate
  return None


def load_tokenizer(path: str | Path) -> ClipTokenizer:
  """A model directory, an HF tokenizer directory, or a `.txt.gz` OpenAI BPE file (local, or a
  URL read through a local copy: `fileio.local_input`)."""
  from agriclip_jax.fileio import local_input
  path = local_input(path)
  if path.is_dir():
    return ClipTokenizer.from_directory(path)
  if path.is_file() and path.name.endswith(".gz"):
    return ClipTokenizer.from_openai_bpe(path)
  if not path.exists():
    raise FileNotFoundError(f"tokenizer path {path} does not exist")
  raise ValueError(f"{path}: expected a directory with {VOCAB_FILE} + {MERGES_FILE} or an OpenAI "
                   f"BPE file ending in .txt.gz")


def train_bpe_tokenizer(captions: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                        min_frequency: int = 2) -> ClipTokenizer:
  """Learns CLIP-style byte-level BPE merges from captions (HF tokenizers' BpeTrainer).

  The vocabulary keeps CLIP's layout: all 512 byte symbols (so any text encodes without unknowns),
  the learned merges in priority order, then <|startoftext|> and <|endoftext|> as the two largest
  ids. `vocab_size` is an upper bound: a small corpus may yield fewer merges.
  """
  from tokenizers import trainers

  base = 2 * 256 + 2
  if vocab_size <= base:
    raise ValueError(f"vocab_size={vocab_size} must exceed {base} (512 byte symbols + 2 specials)")
  seed = _build_backend(clip_vocab_from_merges([]), [])
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=[START_TOKEN, END_TOKEN], end_of_word_suffix=END_OF_WORD,
      initial_alphabet=list(bytes_to_unicode().values()))
  seed.train_from_iterator(captions, trainer=trainer)
  learned = json.loads(seed.to_str())["model"]["merges"]
  merges, produced = [], set()
  for merge in learned:
    pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
    # Two merges can spell the same token ("a"+"bc", "ab"+"c"); CLIP's layout has one id per token.
    if "".join(pair) not in produced:
      produced.add("".join(pair))
      merges.append(pair)
  merges = merges[:vocab_size - base]
  tokenizer = ClipTokenizer(clip_vocab_from_merges(merges), merges, source="trained")
  if out_dir is not None:
    tokenizer.save(out_dir)
  return tokenizer
