"""JSON in and out by one set of rules: read as strictly as safetensors' serde_json, never write NaN/Infinity.

Reading (`loads_strict`) accepts exactly the JSON text serde_json accepts, as safetensors 0.8 configures it:
no NaN/Infinity, every number within a 64-bit float's range (integers beyond u64/i64 and `-0` become floats,
as serde_json reads them; magnitudes from 1e308 up are refused, a documented margin: serde_json overflows on
some of them), no lone surrogate escapes, nesting at most `MAX_DEPTH` levels. Objects keep every
(key, value) pair in `pairs`, repeats included; as a dict the last value of a repeated key wins. Deep nesting
is a ValueError here, never a RecursionError. Metadata values holding JSON are read the same way
(`json_value`), so a hostile `ss_tag_frequency` or `blora_history` is treated as absent, not as a crash.

Writing (`dumps`) turns non-finite floats into null and non-Unicode text into escapes on purpose, then
refuses NaN/Infinity, so every document printed or stored is valid JSON.
"""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 127
"""The deepest nesting serde_json reads (its recursion limit of 128 counts the level that fails)."""

_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)
_FLOAT_LIMIT = 1e308
_MAX_INT_DIGITS = 20  # longer integers are beyond u64/i64 for serde_json (and JSON has no leading zeros)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonObject(dict):
    """A JSON object that also keeps every (key, value) pair in order, repeated keys included."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]):
        super().__init__(pairs)
        self.pairs = pairs


def loads_strict(text: str) -> object:
    """Parse `text` as serde_json would; ValueError saying why when it would refuse it."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=JsonObject,
            parse_constant=_no_constant,
            parse_int=_integer,
            parse_float=_float,
        )
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    _check_strings_and_depth(value)
    return value


def json_value(text: object) -> object | None:
    """A metadata string parsed by `loads_strict`, or None when it is not a string or not such JSON."""
    if not isinstance(text, str):
        return None
    try:
        return loads_strict(text)
    except ValueError:
        return None


def dumps(obj: object, **kwargs) -> str:
    """`json.dumps` of `json_safe(obj)`: valid JSON whatever `obj` holds (allow_nan=False as a guarantee)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def json_safe(obj: object) -> object:
    """`obj` made representable, deliberately: NaN/±Infinity floats become None, text that is not Unicode
    (lone surrogates, e.g. from a file name with undecodable bytes) is written with backslash escapes, and
    other objects (paths) become their text. Dict keys are made text too."""
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {_text(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return _text(obj)


def _text(obj: object) -> str:
    text = obj if isinstance(obj, str) else str(obj)
    if _LONE_SURROGATE.search(text):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    """A float within serde_json's range. Magnitudes from 1e308 up are refused: serde_json multiplies the
    digits by a power of ten and overflows on some values Python rounds to the largest float."""
    value = float(text)
    if not abs(value) < _FLOAT_LIMIT:
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _integer(text: str) -> int | float:
    """An integer as serde_json reads it: within u64/i64 an integer, otherwise (and `-0`) a float."""
    digits = len(text) - text.startswith("-")
    if digits <= _MAX_INT_DIGITS and text != "-0":
        value = int(text)
        if _I64_MIN <= value <= _U64_MAX:
            return value
    return _float(text)


def _check_strings_and_depth(value: object) -> None:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise ValueError("a string holds a lone surrogate escape (not Unicode text)")
        elif isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            if isinstance(item, JsonObject):
                for key, inner in item.pairs:
                    stack.append((key, depth))
                    stack.append((inner, depth + 1))
            else:
                stack.extend((inner, depth + 1) for inner in item)
