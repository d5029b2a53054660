"""YAML/dict → dataclass configs with errors that name the field and suggest fixes.

One YAML file configures a job (torchtune style); every field has a default and a
one-line docstring (the string literal under it, shown by ``floe <cmd> --print-config``).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import enum
import functools
import inspect
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

from floe.errors import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A configuration value is unknown, of the wrong type, or invalid."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (``x: int = 1`` then ``\"\"\"...\"\"\"``),
    inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# Names users bring from other tools (PEFT, Hugging Face TrainingArguments) and from floe's flags → our keys.
# Only for the did-you-mean of an unknown key: a config must use our key itself.
ALIASES = {"rank": "r", "lora_r": "r", "experts": "num_experts",
           "lr": "learning_rate", "steps": "max_steps", "epochs": "num_epochs", "num_train_epochs": "num_epochs",
           "per_device_train_batch_size": "batch_size", "bsz": "batch_size", "model_name": "name",
           "dataset": "source", "target": "target_modules"}


def _suggest(name: str, known: list[str]) -> str:
    guess = ALIASES.get(name.lower()) if ALIASES.get(name.lower()) in known else None
    if guess is None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        guess = close[0] if close else next((k for k in known if len(k) > 3 and (k in name or name in k)), None)
    return f" (did you mean '{guess}'?)" if guess else ""


def _coerce(value: Any, tp: Any, where: str, default: Any = None) -> Any:
    """``value`` as type ``tp``; ``default`` is the field's default, the start of a nested section."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where, default if isinstance(default, tp) else None)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its ``default_factory``), or ``MISSING``."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _declared(default: Any, fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """The values of ``default`` (a section as its parent declares it) that differ from the class defaults."""
    out = {}
    for name, f in fields.items():
        value = getattr(default, name)
        if value != _field_default(f):
            out[name] = copy.deepcopy(value)
    return out


def _renamed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` (one section of ``cls``) with the keys ``cls.RENAMED`` maps read as their new names,
    each with a one-line ``FutureWarning``; setting both names is an error."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in data:
            at = where + "." if where else ""
            if new in data:
                raise ConfigError(f"both '{at}{old}' and '{at}{new}' are set: '{old}' is the old name of '{new}'; "
                                  f"keep only '{new}'")
            warnings.warn(f"config key '{at}{old}' is deprecated: rename it to '{at}{new}'", FutureWarning,
                          stacklevel=3)
            data[new] = data.pop(old)
    return data


def _section_type(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def renamed_keys(cls: type, tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of config ``tree`` for job class ``cls`` with every renamed key, in any section, under its
    new name (warned once). Apply it to each source (file, ``--set``) before they merge, so a newer
    key from one overrides an old-named key from another instead of clashing with it."""
    tree = _renamed(cls, dict(tree), where)
    hints = typing.get_type_hints(cls)
    for key, value in tree.items():
        sub = _section_type(hints.get(key)) if key in hints else None
        if sub is not None and isinstance(value, dict):
            tree[key] = renamed_keys(sub, value, f"{where}.{key}" if where else key)
    return tree


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "", default: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys get a did-you-mean error.

    A nested section starts from the default its parent declares for it, the given keys on top
    (``RunConfig.eval`` is ``EvalConfig(split="test", max_examples=120, max_new_tokens=32)``: giving
    ``eval.max_examples`` keeps ``max_new_tokens`` 32); ``default`` is that declared instance. Every
    ``__post_init__`` check runs on the result. A key ``cls.RENAMED`` maps to its new name is read as
    that name, with a one-line ``FutureWarning``."""
    data = _renamed(cls, dict(data or {}), where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{where + '.' if where else ''}{key}'{_suggest(key, list(fields))}; "
                              f"valid keys{' in ' + where if where else ''}: {', '.join(fields)}")
    kwargs = _declared(default, fields) if default is not None else {}
    for k, v in data.items():
        start = None
        if isinstance(v, dict):  # a section: it starts from this field's default
            start = getattr(default, k) if default is not None else _field_default(fields[k])
        kwargs[k] = _coerce(v, hints[k], f"{where + '.' if where else ''}{k}", start)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def section_fields(obj: Any) -> list[dataclasses.Field]:
    """The fields of config section ``obj`` (a dataclass or its class) that are listed and recorded.

    All of them, except for a section whose class names ``SECTION_FIELDS``: a library's config
    with many more fields than a job uses (the ``adapter:`` section is PEFT's ``LoraConfig``).
    Those fields are listed, and any other is recorded only where it differs from a default
    instance, so a job that leaves PEFT's other knobs alone records (and fingerprints) the same."""
    fields = list(dataclasses.fields(obj))
    shown = getattr(obj, "SECTION_FIELDS", None)
    if shown is None:
        return fields
    if isinstance(obj, type):
        return [f for name in shown for f in fields if f.name == name]
    default = _default_instance(type(obj))
    return [f for name in shown for f in fields if f.name == name] + [
        f for f in fields if f.name not in shown and f.init and getattr(obj, f.name) != getattr(default, f.name)]


@functools.cache
def _default_instance(cls: type) -> Any:
    return cls()


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in section_fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def describe(cls_or_job: Any, prefix: str = "") -> list[str]:
    """Lines ``key: value  # doc`` for every field (recursing into nested dataclasses): the defaults of
    a job class, or the values of a job built from a config file, flags and ``--set``."""
    lines = []
    is_job = not isinstance(cls_or_job, type)
    docs = field_docs(type(cls_or_job) if is_job else cls_or_job)
    for f in section_fields(cls_or_job):
        if is_job:
            value = getattr(cls_or_job, f.name)
        else:
            value = _field_default(f)
            value = None if value is dataclasses.MISSING else value
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:")
            lines += describe(value if is_job else type(value), prefix + "  ")
        else:
            lines.append(f"{prefix}{f.name}: {yaml.safe_dump(to_dict(value), default_flow_style=True).strip().removesuffix('...').strip()}"
                         f"  # {docs.get(f.name) or f.metadata.get('help', '')}")
    klass = type(cls_or_job) if is_job else cls_or_job
    if getattr(klass, "SECTION_FIELDS", None) is not None:  # a library's config: say what else it takes
        base = next(k for k in klass.__mro__[1:] if dataclasses.is_dataclass(k))
        lines.append(f"{prefix}# ... and any other field of {base.__module__.split('.')[0]}.{base.__name__}")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (keys in ``ignore`` skipped)."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]
