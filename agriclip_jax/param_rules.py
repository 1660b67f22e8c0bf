"""One mechanism for per-parameter settings: ordered (regex, value) rules, first match wins.

Parameters are named by joining their pytree path with '/', e.g. `clip/visual/transformer/
resblocks_0/attn/qkv/kernel`. The same rules drive weight-decay masks, learning-rate multipliers,
frozen parts and sharding, so there is exactly one way to say "this group of parameters".

Patterns are matched with `re.fullmatch`: a rule names the whole parameter, so `.*bias` means
"ends in bias" and `bias` alone means only a top-level parameter called bias.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

Rules = Sequence[tuple[str, Any]]

# Sentinel: no default given, so a parameter that no rule matches is an error.
_REQUIRED = object()


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined name of a pytree path from `jax.tree_util.tree_flatten_with_path`."""
  return "/".join(_key_name(k) for k in path)


def flatten_names(tree: Any) -> dict[str, Any]:
  """{'a/b/kernel': leaf, ...} in the pytree's leaf order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(path): leaf for path, leaf in leaves}


def _compile(rules: Rules) -> list[tuple[re.Pattern, Any, str]]:
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"a parameter rule is a (regex, value) pair; got {rule!r}")
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value, pattern))
    except re.error as err:
      raise ValueError(f"parameter rule {pattern!r} is not a valid regex: {err}") from err
  return compiled


def first_match(name: str, rules: Rules, default: Any = _REQUIRED) -> Any:
  """The value of the first rule whose regex matches the whole of `name`."""
  for regex, value, _ in _compile(rules):
    if regex.fullmatch(name):
      return value
  if default is _REQUIRED:
    raise ValueError(f"no parameter rule matches {name!r}; rules: {[r[0] for r in rules]}")
  return default


def tree_from_rules(tree: Any, rules: Rules, default: Any = _REQUIRED, *,
                    transform: Callable[[str, Any, Any], Any] | None = None,
                    require_all_used: bool = False) -> Any:
  """A pytree shaped like `tree` holding, for each leaf, its first matching rule's value.

  Args:
    transform: optional f(name, leaf, value) -> value, e.g. to turn a sharding rule into a
      PartitionSpec that depends on the leaf's shape.
    require_all_used: raise if some rule matches no parameter (catches typos in rule regexes).
  """
  compiled = _compile(rules)
  used = [False] * len(compiled)

  def value_for(path, leaf):
    name = path_name(path)
    for index, (regex, value, _) in enumerate(compiled):
      if regex.fullmatch(name):
        used[index] = True
        break
    else:
      if default is _REQUIRED:
        raise ValueError(f"no parameter rule matches {name!r}; rules: {[c[2] for c in compiled]}")
      value = default
    return transform(name, leaf, value) if transform else value

  result = jax.tree_util.tree_map_with_path(value_for, tree)
  if require_all_used:
    unused = [c[2] for c, u in zip(compiled, used) if not u]
    if unused:
      raise ValueError(f"parameter rules {unused} match no parameter; names look like "
                       f"{list(flatten_names(tree))[:5]}")
  return result
