"""Strict field types: one check for the Python API, the command line, config files and adapter files.

A config field's type is its dataclass annotation, so declaring a field (one line, as usual) is all it
takes for every way of setting it to be checked: ``DoraConfig(...)``, ``TrainConfig(...)`` (and so
``dorakit train``'s options), a YAML/JSON ``--config`` file, a resumed run's saved options and an
``adapter_config.json``. Nothing is coerced (issue 19): ``"false"`` is text, not false (``bool("false")``
is True, which once turned rsLoRA on), ``1`` is not ``True``, ``8.0`` is not the integer 8, and a float
field must be finite (``"lora_alpha": Infinity`` is refused). The message names the field, what it must
be and, when the value came from a file, the file.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     use_dora: bool = True
    >>> check_values(Example, {"use_dora": "false"}, source="adapter_config.json")
    Traceback (most recent call last):
    ...
    dorakit.fields.FieldTypeError: adapter_config.json: use_dora must be true or false, got 'false' (text).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

LIST_TYPES = (list, tuple, set, frozenset)  # what a list field accepts from Python (files only have lists)


class FieldTypeError(ValueError):
    """A config value of the wrong type (a ValueError: the command line reports it as bad input, exit 2)."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (string annotations evaluated in its module)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(instance: Any, source: str | None = None) -> None:
    """Check every field of a dataclass instance against its annotation.

    Raises:
        FieldTypeError: the first field whose value has the wrong type, naming it and ``source``.
    """
    check_values(type(instance), {name: getattr(instance, name) for name in field_types(type(instance))}, source)


def check_values(cls: type, values: Mapping[str, Any], source: str | None = None,
                 names: Mapping[str, str] | None = None) -> None:
    """Check ``values`` (field name -> value, e.g. read from a file) against the fields of ``cls``.

    Args:
        cls: the dataclass whose annotations give the types; keys that are not its fields are skipped
            (unknown names are refused elsewhere, with a suggestion).
        values: the values to check.
        source: where they came from (a file name), put in front of the message.
        names: how a field is called where the value came from, when not by its own name (PEFT's
            ``vera_dropout`` is ``lora_dropout`` here).
    Raises:
        FieldTypeError: naming the field, the expected type, the value and ``source``.
    """
    types_ = field_types(cls)
    for name, value in values.items():
        if name in types_ and not matches(value, types_[name]):
            shown = (names or {}).get(name, name)
            prefix = f"{source}: " if source else ""
            raise FieldTypeError(f"{prefix}{shown} must be {describe(types_[name])}, got {value!r} ({kind(value)}).")


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type ``tp`` (an annotation), strictly: bool is not int, int is not bool,
    text is neither, and a float field takes integers but not infinities or NaN."""
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin in (list, tuple, set, frozenset):
        item = args[0] if args else Any
        return isinstance(value, LIST_TYPES) and all(matches(v, item) for v in value)
    if origin in (dict, Mapping):
        key, item = args if args else (Any, Any)
        return isinstance(value, Mapping) and all(matches(k, key) and matches(v, item) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not know: the dataclass's own checks decide


def describe(tp: Any) -> str:
    """What a value of annotation ``tp`` is, in words: 'an integer or null', "one of 'a', 'b'"."""
    if tp is None or tp is type(None):
        return "null (unset)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in sorted(args, key=lambda a: a is type(None))]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin in (list, tuple, set, frozenset):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}")


def kind(value: Any) -> str:
    """The type of a value in the words of a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "not a finite number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, LIST_TYPES):
        return "a list"
    return type(value).__name__


def _plural(tp: Any) -> str:
    words = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
    return words.get(tp, describe(tp))
