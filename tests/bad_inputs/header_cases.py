"""A seeded generator of safetensors files with valid and subtly invalid headers, for the differential test.

Each case starts from a valid layout (0-4 tensors of any safetensors dtype, shapes with zeros and huge
dimensions, tiled offsets, optional metadata) and applies up to three mutations, each one way a header can be
wrong or unusual: shapes and offsets of the wrong type, size or range, 64-bit overflow, unknown or unsupported
dtypes, repeated keys at every level, metadata of the wrong types, JSON that Python reads but serde_json does
not (NaN, Infinity, numbers out of range, -0, lone surrogates, deep nesting), padding and stray bytes, and
header/data sizes that disagree. The JSON text is written by hand so that repeated keys and raw tokens can be
expressed.
"""

from __future__ import annotations

import json
import random
import struct

SUPPORTED = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
OTHER = {"F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8, "F4": None, "F6_E2M3": None, "F6_E3M2": None}
"""Dtypes safetensors 0.8 reads but blora-tools refuses (None: sub-byte, any byte count is tried)."""
BOGUS = ["f32", "F17", "Q4", "", "float32", "I4", "F32 ", "bf16"]


def _s(value) -> str:
    return json.dumps(value)


def _obj(pairs) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


class Case:
    """One file being built: tensor entries as (name text, [(field text, value text)]), metadata, data size."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.entries: list[tuple[str, list[tuple[str, str]]]] = []
        self.metadata: list[tuple[str, str]] | None = None
        self.metadata_text: str | None = None
        self.extra_top: list[tuple[str, str]] = []
        self.data_size = 0
        self.prefix, self.suffix = "", ""
        self.length_delta = 0
        self.top_override: str | None = None

    def header_text(self) -> str:
        if self.top_override is not None:
            return self.top_override
        pairs = []
        if self.metadata_text is not None:
            pairs.append((_s("__metadata__"), self.metadata_text))
        elif self.metadata is not None:
            pairs.append((_s("__metadata__"), _obj(self.metadata)))
        pairs += [(name, _obj(fields)) for name, fields in self.entries]
        pairs += self.extra_top
        self.rng.shuffle(pairs) if self.rng.random() < 0.3 else None
        return self.prefix + _obj(pairs) + self.suffix

    def file_bytes(self) -> bytes:
        raw = self.header_text().encode("utf-8", "surrogatepass")
        if self.rng.random() < 0.7 and not self.suffix:
            raw += b" " * (-len(raw) % 8)
        length = max(0, len(raw) + self.length_delta)
        return struct.pack("<Q", length) + raw + bytes(self.rng.getrandbits(8) for _ in range(min(self.data_size, 64))) + b"\0" * max(0, self.data_size - 64)


def _shape(rng: random.Random) -> list[int]:
    kind = rng.random()
    if kind < 0.1:
        return []
    if kind < 0.2:
        return [0, rng.choice([2**40, 2**63, 2**64 - 1])]
    dims = rng.randint(1, 4)
    return [rng.choice([0, 1, 1, 2, 3, 4, 5, 8]) if rng.random() < 0.95 else 0 for _ in range(dims)]


def valid_case(rng: random.Random) -> Case:
    case = Case(rng)
    offset = 0
    for i in range(rng.randint(0, 4)):
        pool = SUPPORTED if rng.random() < 0.85 else OTHER
        dtype = rng.choice(sorted(pool))
        shape = _shape(rng)
        count = 1
        for d in shape:
            count *= d
        size = pool[dtype]
        nbytes = count * size if size is not None else rng.choice([count // 2, (count + 1) // 2, count])
        name = rng.choice([f"t{i}", f"lora_unet_x_{i}.lora_up.weight", f"é{i}", f"\U0001f600{i}", f"a b\\{i}", f"{i}"])
        fields = [(_s("dtype"), _s(dtype)), (_s("shape"), _s(shape)), (_s("data_offsets"), _s([offset, offset + nbytes]))]
        if rng.random() < 0.1:
            fields.append((_s("extra"), _s({"k": [1, 2.5, None, True, "s"]})))
        rng.shuffle(fields)
        case.entries.append((_s(name), fields))
        offset += nbytes
    case.data_size = offset
    if rng.random() < 0.6:
        case.metadata = [(_s(k), _s(v)) for k, v in
                         {"ss_network_dim": "4", "format": "pt", "k\u00e9": "v\U0001f600", "json": '{"a": [1, 2]}'}.items()
                         if rng.random() < 0.7]
    elif rng.random() < 0.2:
        case.metadata_text = "null"
    return case


def _entry(case: Case):
    return case.rng.choice(case.entries) if case.entries else None


def _set_field(case: Case, field: str, value_text: str) -> None:
    entry = _entry(case)
    if entry is None:
        return
    fields = entry[1]
    for i, (key, _) in enumerate(fields):
        if key == _s(field):
            fields[i] = (key, value_text)


_HUGE = [2**63, 2**64 - 1, 2**64, 2**70, 2**32, 2**62]


def _mutations():
    def shape_value(c):
        r = c.rng
        _set_field(c, "shape", r.choice([
            "[-1]", "[-0]", "[1.0]", "[1e0]", "[true]", '["1"]', "null", "{}", "[[1]]", "[]", "[0]",
            _s([r.choice(_HUGE), 0]), _s([0, r.choice(_HUGE), 4]), _s([2**63, 4, 0]), _s([2**32, 2**32]),
            _s([2**62]), _s([2**61]), _s([2**60, 8]), _s([r.randint(0, 9)]), "[" + "9" * r.randint(19, 25) + ",0]",
        ]))

    def offsets_value(c):
        r = c.rng
        entry = _entry(c)
        if entry is None:
            return
        try:
            a, b = (int(v) for v in json.loads(dict(entry[1]).get(_s("data_offsets"), "[0, 0]")))
        except (ValueError, TypeError):  # already mutated into something else
            a, b = 0, 0
        _set_field(c, "data_offsets", r.choice([
            _s([a, b + 1]), _s([a + 1, b]), _s([max(0, a - 1), b]), _s([b, a]), _s([a, b, b]), _s([a]),
            _s({"0": a, "1": b}), f"[{a}.0,{b}]", f"[{a},{b}e0]", "[false,true]", _s([a, 2**64]), _s([2**64 - 1, 2**64 - 1]),
            _s([a + 2**40, b + 2**40]), "null", "[-0," + str(b) + "]",
        ]))

    def dtype_value(c):
        r = c.rng
        _set_field(c, "dtype", r.choice([_s(r.choice(BOGUS)), "1", "null", '["F32"]', _s(r.choice(sorted(OTHER))),
                                        '"F\\u003332"', _s(r.choice(sorted(SUPPORTED)))]))

    def repeated_field(c):
        entry = _entry(c)
        if entry is not None:
            key, value = c.rng.choice(entry[1])
            entry[1].insert(c.rng.randrange(len(entry[1]) + 1), (key, c.rng.choice([value, '"F32"', "[1]", "[0,4]"])))

    def unknown_field(c):
        entry = _entry(c)
        if entry is not None:
            entry[1].append((c.rng.choice(['"x"', '"x"', '"dtype_"', '"\\u0064type"']), _raw_value(c.rng)))

    def repeated_tensor(c):
        entry = _entry(c)
        if entry is not None:
            copy = (entry[0], list(entry[1]))
            if c.rng.random() < 0.5:
                copy[1][0] = (copy[1][0][0], c.rng.choice(['"F17"', "[1]", "null", '"U8"']))
            where = c.rng.randrange(len(c.entries) + 1)
            c.entries.insert(where, copy)

    def repeated_metadata(c):
        c.extra_top.append((_s("__metadata__"), c.rng.choice(["{}", "null", '{"a":"b"}'])))

    def repeated_metadata_key(c):
        c.metadata = (c.metadata or []) + [(_s("k"), c.rng.choice(['"1"', "1", "null"])), (_s("k"), c.rng.choice(['"2"', "2"]))]

    def metadata_types(c):
        r = c.rng
        if r.random() < 0.5:
            c.metadata_text = r.choice(["[]", '""', "0", "false", "true", "null", "{}", '{"a":{"b":"c"}}', '{"a":["b"]}',
                                        '{"a":null}', '{"a":1}', '{"a":1.5}', '{"a":"\\u0000"}'])
        else:
            c.metadata = (c.metadata or []) + [(_s("m"), _raw_value(r))]

    def raw_tokens(c):
        entry = _entry(c)
        target = entry[1] if entry is not None and c.rng.random() < 0.7 else None
        token = c.rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * c.rng.randint(300, 320),
                              "-1" + "0" * 400, "1e-400", "-0", "0.0", "18446744073709551616", "-9223372036854775809",
                              "1.7976931348623157e308", "17976931348623158e292"])
        if target is not None:
            target.append((_s("x"), token))
        else:
            c.metadata = (c.metadata or []) + [(_s("m"), token)]

    def strings(c):
        r = c.rng
        text = r.choice(['"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\ude00\\ud83d"', '"\\ud83d"', '"\\u00e9"',
                         '"\\x"', '"\t"', '"\x7f"', '"\\/"', '"\\u12"'])
        where = r.random()
        entry = _entry(c)
        if where < 0.33 and entry is not None:
            c.entries[c.entries.index(entry)] = (text, entry[1])
        elif where < 0.66:
            c.metadata = (c.metadata or []) + [(_s("s"), text)]
        elif entry is not None:
            entry[1].append((_s("x"), text))

    def depth(c):
        entry = _entry(c)
        d = c.rng.choice([1, 60, 124, 125, 126, 127, 128, 200])
        value = "[" * d + "]" * d if c.rng.random() < 0.5 else '{"a":' * d + "1" + "}" * d
        if entry is not None:
            entry[1].append((_s("deep"), value))
        else:
            c.metadata = (c.metadata or []) + [(_s("deep"), value)]

    def padding(c):
        r = c.rng
        choice = r.random()
        if choice < 0.4:
            c.suffix = r.choice([" ", "  \t", "\n", "\r\n", "\x00", " x", "}", ",", "\x0c", "\u00a0"])
        elif choice < 0.8:
            c.prefix = r.choice([" ", "\n", "\t", "\ufeff", "\x00", "\u2028"])
        else:
            c.top_override = r.choice(["[]", '"x"', "1", "null", "", "{", '{"a":1}', '{"t":5}', '{"t":[]}'])

    def sizes(c):
        r = c.rng
        if r.random() < 0.6:
            c.data_size = max(0, c.data_size + r.choice([-8, -1, 1, 8, 64]))
        else:
            c.length_delta = r.choice([-1, 1, -8, 8, 10**6])

    def empty_and_special_names(c):
        entry = _entry(c)
        if entry is not None:
            c.entries[c.entries.index(entry)] = (c.rng.choice(['""', '"__metadata__"', '"\\u005f_metadata__"']), entry[1])

    return [shape_value, offsets_value, dtype_value, repeated_field, unknown_field, repeated_tensor, repeated_metadata,
            repeated_metadata_key, metadata_types, raw_tokens, strings, depth, padding, sizes, empty_and_special_names]


MUTATIONS = _mutations()


def _raw_value(rng: random.Random) -> str:
    return rng.choice(['"s"', "1", "-1", "1.5", "null", "true", "[]", "{}", '{"a":[1,{"b":null}]}', "[[[]]]", "1e5"])


def generate(seed: int) -> bytes:
    """The bytes of case `seed` (deterministic)."""
    rng = random.Random(seed)
    case = valid_case(rng)
    if rng.random() < 0.75:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            rng.choice(MUTATIONS)(case)
    return case.file_bytes()
