"""Caption paraphrases from an OpenAI-compatible chat-completions endpoint, with every guard.

One request per class (not per image): the model returns a JSON list of paraphrases of the class's
base caption; each answer is validated (keeps the class name, no other class name, length bounds,
no echoed instructions, links or markup) and whatever fails is replaced by the offline template
bank, so a broken or hostile endpoint degrades captions to templates, never to garbage.

- Disk cache keyed by (endpoint, model, prompt): a rerun makes no request at all. Only successful
  HTTP answers are cached; the key is never part of the cache key or the cache file.
- Timeouts, and retries with exponential back-off on timeouts, connection errors, 429 and 5xx.
- The API key is read from an environment variable, sent only in the Authorization header and
  scrubbed from every message this module logs or raises.
Works with local servers (vLLM, llama.cpp, Ollama's /v1) as well as hosted ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from agriclip_jax.fileio import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_MIN_CHARS = 12
DEFAULT_MAX_CHARS = 300
# A paraphrase answer is a few KiB; a bigger body is an endpoint gone wrong, not worth reading whole.
MAX_RESPONSE_BYTES = 1 << 20
# Phrases that mean the model talked about the task instead of answering it, or was steered by
# injected text: such an answer is not a caption.
_SUSPICIOUS = re.compile(
    r"ignore|instruction|disregard|system prompt|as an ai|language model|assistant|paraphras|"
    r"here (are|is)|sure[,!]|i cannot|i can't|sorry|prompt|api[ _-]?key|password|token|"
    r"https?://|www\.|<[a-z/!]|```|\{|\}",
    re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


class LLMError(RuntimeError):
  """The endpoint could not give an answer (after retries); the message never holds the key."""


def _normalise_words(text: str) -> str:
  return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


def _contains_phrase(text: str, phrase: str) -> bool:
  return re.search(rf"(?<![a-z0-9]){re.escape(_normalise_words(phrase))}(?![a-z0-9])",
                   _normalise_words(text)) is not None


def validation_problem(caption: str, class_name: str, other_class_names: Sequence[str] = (),
                       min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
  """None if `caption` is a usable paraphrase, else the reason it is not."""
  if not isinstance(caption, str):
    return "not_text"
  if "\n" in caption.strip() or "\r" in caption:
    return "multiple_lines"
  if not min_chars <= len(caption.strip()) <= max_chars:
    return "length"
  if not _contains_phrase(caption, class_name):
    return "drops_class_name"
  for other in other_class_names:
    # A class whose name is inside ours ("rust" in "common rust") is not a different class here.
    if not _contains_phrase(class_name, other) and _contains_phrase(caption, other):
      return "names_other_class"
  if _SUSPICIOUS.search(caption):
    return "instructions_or_markup"
  return None


def parse_answer(content: str) -> list[str] | None:
  """The list of strings in a model answer: a JSON array (possibly fenced or inside prose)."""
  text = content.strip()
  for candidate in (text, text[text.find("["):text.rfind("]") + 1] if "[" in text else ""):
    if not candidate:
      continue
    try:
      value = json.loads(candidate)
    except json.JSONDecodeError:
      continue
    if isinstance(value, dict):
      value = value.get("captions") or value.get("paraphrases")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      return [_LIST_MARKER.sub("", v).strip().strip('"') for v in value]
  return None


@dataclasses.dataclass
class LLMParaphraser:
  """Paraphrases through `POST {base_url}/chat/completions`."""
  base_url: str
  model: str
  key_env: str | None = "OPENAI_API_KEY"
  cache_dir: str | Path | None = None
  timeout_s: float = 30.0
  max_retries: int = 3
  backoff_s: float = 1.0
  temperature: float = 0.7
  min_chars: int = DEFAULT_MIN_CHARS
  max_chars: int = DEFAULT_MAX_CHARS
  stats: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not re.match(r"^https?://", self.base_url):
      raise ValueError(f"LLM base URL must start with http:// or https://, got {self.base_url!r}")
    self.base_url = self.base_url.rstrip("/")
    if self.max_retries < 0 or self.timeout_s <= 0:
      raise ValueError(f"LLM max_retries must be >= 0 and timeout_s > 0, got {self.max_retries}, {self.timeout_s}")

  # -- secrets ------------------------------------------------------------------------------------

  def _key(self) -> str | None:
    return os.environ.get(self.key_env) if self.key_env else None

  def _scrub(self, text: str) -> str:
    key = self._key()
    return text.replace(key, "***") if key else text

  def __repr__(self) -> str:  # dataclass's repr is fine: it holds the env var's name, not the key
    return f"LLMParaphraser(base_url={self.base_url!r}, model={self.model!r}, key_env={self.key_env!r})"

  # -- the request --------------------------------------------------------------------------------

  def _messages(self, base_caption: str, class_name: str, count: int) -> list[dict[str, str]]:
    system = ("You rewrite image captions for training a vision-language model for agriculture. "
              "Answer with a JSON array of strings and nothing else.")
    user = (f"Write {count} different paraphrases of this image caption: \"{base_caption}\". "
            f"Every paraphrase must contain the exact words \"{class_name}\", describe only what is "
            f"visible, be one sentence under {self.max_chars} characters, and name no other disease, "
            "breed or species.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]

  def _cache_path(self, payload: dict[str, Any]) -> Path | None:
    if self.cache_dir is None:
      return None
    digest = hashlib.sha256(json.dumps(
        {"url": self.base_url, "payload": payload}, sort_keys=True).encode("utf-8")).hexdigest()
    return Path(self.cache_dir) / f"{digest}.json"

  def _count(self, name: str) -> None:
    self.stats[name] = self.stats.get(name, 0) + 1

  def _post(self, payload: dict[str, Any]) -> str:
    """The answer's message content; retries transient failures; raises LLMError."""
    headers = {"Content-Type": "application/json"}
    key = self._key()
    if key:
      headers["Authorization"] = f"Bearer {key}"
    body = json.dumps(payload).encode("utf-8")
    url = f"{self.base_url}/chat/completions"
    last_problem = "no attempt"
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      request = urllib.request.Request(url, data=body, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          raw = response.read(MAX_RESPONSE_BYTES + 1)
      except urllib.error.HTTPError as error:
        last_problem = f"HTTP {error.code}"
        if error.code != 429 and error.code < 500:
          break  # a client error does not go away by asking again
        continue
      except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
              http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        last_problem = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else type(reason).__name__
        continue
      if len(raw) > MAX_RESPONSE_BYTES:
        last_problem = f"response larger than {MAX_RESPONSE_BYTES} bytes"
        break
      try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
        if not isinstance(content, str):
          raise TypeError("content is not text")
        return content
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        last_problem = "malformed response (not chat-completions JSON)"
        break  # the server answered; asking again would give the same shape
    raise LLMError(self._scrub(f"LLM endpoint {url} model {self.model!r} failed after "
                               f"{attempt + 1} attempt(s): {last_problem}"))

  def raw_paraphrases(self, base_caption: str, class_name: str, count: int) -> list[str] | None:
    """Unvalidated list from the model (cached), or None when the endpoint or answer failed."""
    payload = {"model": self.model, "messages": self._messages(base_caption, class_name, count),
               "temperature": self.temperature}
    cache_path = self._cache_path(payload)
    content: str | None = None
    if cache_path is not None and cache_path.is_file():
      try:
        content = json.loads(cache_path.read_text(encoding="utf-8"))["content"]
        self._count("cache_hits")
      except (OSError, json.JSONDecodeError, KeyError, TypeError):
        content = None  # a damaged cache entry is simply asked again
    if content is None:
      try:
        content = self._post(payload)
        self._count("requests_ok")
      except LLMError as error:
        self._count("requests_failed")
        log.warning("%s; using template captions", error)
        return None
      if cache_path is not None:
        atomic_write_text(cache_path, json.dumps({"model": self.model, "content": content}))
    parsed = parse_answer(content)
    if parsed is None:
      self._count("answers_malformed")
      log.warning("LLM answer for %r is not a JSON list of strings; using template captions",
                  self._scrub(class_name))
    return parsed

  def paraphrases(self, base_caption: str, class_name: str, other_class_names: Sequence[str],
                  count: int) -> list[str]:
    """Up to `count` validated, distinct paraphrases (possibly none)."""
    raw = self.raw_paraphrases(base_caption, class_name, count) or []
    kept: list[str] = []
    for caption in raw:
      problem = validation_problem(caption, class_name, other_class_names, self.min_chars, self.max_chars)
      if problem is None and caption not in kept and caption != base_caption:
        kept.append(caption)
      elif problem is not None:
        self._count(f"rejected_{problem}")
    return kept[:count]
