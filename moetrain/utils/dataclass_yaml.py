"""Strict YAML -> dataclass loading, independent of what the dataclasses hold.

The pieces :mod:`moetrain.config` assembles into ``load_config``:

* :class:`Context` remembers which file is loaded and where each dotted key came from
  (a preset, a ``--set``), so every :class:`ConfigError` is one line naming file and key;
* :func:`read_yaml_mapping`, :func:`parse_override`, :func:`set_dotted`, :func:`merge_into`
  build one nested dict from the file and the overrides;
* :func:`build_dataclass` turns it into dataclasses, rejecting unknown keys (with a
  "did you mean") and coercing values to the declared types;
* :func:`to_plain`, :func:`dump_yaml`, :func:`write_atomic` write it back.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``tuple[...]``
of those, and nested dataclasses. Allowed values go in field metadata (:func:`choices`).

Why coercion: PyYAML implements YAML 1.1, which reads ``1e-3`` (no dot) as the *string*
``'1e-3'``. ``float`` fields accept numeric strings; ``int`` fields accept them only when
integral (``1e5`` yes, ``1.5`` no); a boolean is never a number.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import tempfile
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from moetrain.utils.atomic import publish_modes
from moetrain.utils.errors import UserError

__all__ = [
    "ConfigError", "Context", "choices", "read_yaml_mapping", "parse_override", "set_dotted",
    "merge_into", "build_dataclass", "did_you_mean", "to_plain", "dump_yaml", "write_atomic",
    "field_docs",
]


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid. ``str(err)`` is one line naming file and key."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        # One line, always: the CLI prints it as is, and PyYAML's messages span lines.
        super().__init__(" ".join(str(message).split()))
        self.path = path
        self.key = key


def choices(default: Any, *options: Any) -> Any:
    """A dataclass field whose value must be one of ``options`` (checked by build_dataclass)."""
    return field(default=default, metadata={"choices": options})


class Context:
    """Where values came from, so that an error can point at the file or the --set."""

    def __init__(self, path: str):
        self.path = path
        self.origins: dict[str, str] = {}  # dotted key -> "--set k=v" or "preset 'x'"

    def error(self, key: str | None, message: str, *, show_key: bool = True) -> ConfigError:
        origin = self.origins.get(key or "")
        suffix = f" (from {origin})" if origin else ""
        where = f"{key}: " if key and show_key else ""
        return ConfigError(f"{self.path}: {where}{message}{suffix}", path=self.path, key=key)

    def require(self, ok: bool, key: str, message: str) -> None:
        """Raise the error for ``key`` unless ``ok``."""
        if not ok:
            raise self.error(key, message)


def read_yaml_mapping(path: Path, ctx: Context) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ctx.error(None, f"cannot read config file ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        # One line: PyYAML's own message spans several (context, problem, a caret drawing).
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ctx.error(None, f"invalid YAML: {where}{problem}") from None
    if raw is None:
        # An empty or comment-only file is almost always a mistake (wrong file, truncated copy);
        # running every default silently would train something nobody asked for.
        raise ctx.error(None, "the file is empty or holds only comments; a recipe needs at least one "
                              "section (configs/tiny.yaml is the smallest runnable one)")
    if not isinstance(raw, dict):
        raise ctx.error(None, f"expected a mapping of sections at top level, got {_describe(raw)}")
    return raw


def parse_override(text: str, ctx: Context) -> tuple[str, Any, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ctx.error(None, f"--set expects section.key=value, got '{text}'")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value  # e.g. "a: b" is not valid YAML alone; keep the raw text
    return key, parsed, text


def set_dotted(tree: dict, dotted: str, value: Any, ctx: Context) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:  # "moe:" with nothing under it
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ctx.error(where, f"cannot set '{dotted}': '{where}' is a value, not a section")
        node = child
    node[leaf] = value


def merge_into(tree: dict, raw: dict, ctx: Context, prefix: str = "") -> None:
    """Deep-merge the file's mapping into the preset tree (the file wins)."""
    for key, value in raw.items():
        key = str(key)
        dotted = prefix + key
        if isinstance(tree.get(key), dict) and (value is None or isinstance(value, dict)):
            merge_into(tree[key], value or {}, ctx, prefix=dotted + ".")  # "model:" alone = empty
            continue
        tree[key] = value
        # The file now owns this key: errors about it should point at the file, not the preset.
        for owned in [k for k in ctx.origins if k == dotted or k.startswith(dotted + ".")]:
            del ctx.origins[owned]


def build_dataclass(cls: type, data: Any, ctx: Context) -> Any:
    """Turn a nested mapping into dataclass ``cls``: unknown keys, types and choices checked.

    Fields whose type is a dataclass are built recursively from sub-mappings; missing keys
    keep their defaults. Errors name the dotted key (``moe.top_k``).
    """
    return _build(cls, data, "", ctx, root=cls)


def _build(cls: type, data: Any, prefix: str, ctx: Context, root: type) -> Any:
    section = prefix.rstrip(".")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error(section, f"expected a mapping of {cls.__name__} keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if str(key) not in names:
            raise _unknown_key(str(key), prefix, names, ctx, root)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        dotted, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], dotted + ".", ctx, root)
            continue
        value = _coerce(data[f.name], tp, dotted, ctx)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            hint = did_you_mean(str(value), [c for c in choices if c is not None])
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ctx.error(dotted, f"'{value}' is not allowed{hint} Choose one of: {shown}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _unknown_key(key: str, prefix: str, names: list[str], ctx: Context, root: type) -> ConfigError:
    section = prefix.rstrip(".")
    dotted = prefix + key
    # The same name in another section (model.num_experts -> moe.num_experts) beats a typo match.
    elsewhere = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key and k != dotted]
    hint = f" — did you mean '{elsewhere[0]}'?" if elsewhere else did_you_mean(key, names, prefix)
    scope = f"in '{section}'" if section else "at top level"
    message = f"unknown key '{dotted}'{hint} Valid keys {scope}: {', '.join(names)}"
    return ctx.error(dotted, message, show_key=False)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


_INT_RE = re.compile(r"[+-]?\d+")


def _coerce(value: Any, tp: Any, key: str, ctx: Context) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, ctx)
        raise TypeError(f"unsupported config type {tp}")  # programming error, not user error
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ctx.error(key, f"expected a list of {len(args)} values, got {_describe(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(key, f"expected a mapping, got {_describe(value)}")
        return {_coerce(k, args[0], key, ctx): _coerce(v, args[1], f"{key}.{k}", ctx) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ctx.error(key, f"expected true or false, got {_describe(value)}")
    if tp is int:
        return _to_int(value, key, ctx)
    if tp is float:
        return _to_float(value, key, ctx)
    if tp is str:
        if isinstance(value, str):
            return value
        quote = "; quote it in YAML" if isinstance(value, (bool, int, float)) else ""
        raise ctx.error(key, f"expected a string, got {_describe(value)}{quote}")
    raise TypeError(f"unsupported config type {tp}")


def _to_int(value: Any, key: str, ctx: Context) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    number = _as_number(value)
    # "1e5" steps is common in recipes; accept integral floats, reject 1.5.
    if number is not None and number.is_integer():
        return int(number)
    raise ctx.error(key, f"expected an integer, got {_describe(value)}")


def _to_float(value: Any, key: str, ctx: Context) -> float:
    number = _as_number(value)
    if number is None:
        raise ctx.error(key, f"expected a number, got {_describe(value)}")
    return number


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 leaves "1e-3" as a string
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"{value!r} ({type(value).__name__})"


def did_you_mean(word: str, options: Any, prefix: str = "") -> str:
    """" — did you mean 'x'?" for the closest option, else "." (ends the sentence either way)."""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" — did you mean '{prefix}{close[0]}'?" if close else "."


def to_plain(obj: Any) -> Any:
    """Dataclasses become dicts and tuples lists, recursively: ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(obj)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, but short lists inline: ``adam_betas: [0.9, 0.98]``."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def dump_yaml(data: Any, header: str = "") -> str:
    """YAML text of plain data, keys in insertion order, short lists inline."""
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish_modes(tmp)  # mkstemp creates 0600; a plain open() would follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass, by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
