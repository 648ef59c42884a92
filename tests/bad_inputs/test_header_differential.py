"""The header check accepts exactly what safetensors' own reader accepts (differential test).

On generated headers (tests/bad_inputs/header_cases.py: valid ones and subtly broken ones), `read_header` and
`safetensors.safe_open` must agree: when both accept, they read the same tensor names, dtypes, shapes and
metadata; when only safetensors accepts, the refusal must be one that blora_tools.adapter.header documents (a
safetensors dtype this tool does not compute with, a number of magnitude 1e308 or more); safetensors never
refuses what read_header accepts.
1,000 cases run by default, 10,000 with `-m slow`.
"""

from __future__ import annotations

from collections import Counter

import pytest
from header_cases import generate
from safetensors import safe_open

from blora_tools.adapter.header import OTHER_SAFETENSORS_DTYPES, read_header
from blora_tools.errors import AdapterFileError

DOCUMENTED_EXTRAS = ("is not supported by blora-tools", "number out of range")
"""Messages of the documented extra refusals generated headers reach: a safetensors dtype this tool does not
compute with (OTHER_SAFETENSORS_DTYPES), and JSON numbers of magnitude 1e308 or more (jsonio._float)."""


def _theirs(path):
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {
                "metadata": dict(f.metadata() or {}),
                "tensors": {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()},
            }
    except Exception as err:  # safetensors raises SafetensorError, and a few others for odd inputs
        return err


def _ours(path):
    try:
        header = read_header(path)
    except AdapterFileError as err:
        return err
    return {
        "metadata": dict(header.metadata),
        "tensors": {k: (t.dtype, t.shape) for k, t in header.tensors.items()},
    }


def _run(tmp_path, seeds) -> Counter:
    path = tmp_path / "case.safetensors"
    outcome: Counter = Counter()
    for seed in seeds:
        path.write_bytes(generate(seed))
        theirs, ours = _theirs(path), _ours(path)
        if isinstance(ours, dict):
            assert isinstance(theirs, dict), f"seed {seed}: accepted here, refused by safetensors: {theirs}"
            normalised = {k: (d.upper() if isinstance(d, str) else d, s) for k, (d, s) in theirs["tensors"].items()}
            assert ours["tensors"] == normalised and ours["metadata"] == theirs["metadata"], f"seed {seed}"
            outcome["both accept"] += 1
        elif isinstance(theirs, dict):
            extra = next((e for e in DOCUMENTED_EXTRAS if e in ours.message), None)
            assert extra is not None, f"seed {seed}: refused only here: {ours}"
            if extra == DOCUMENTED_EXTRAS[0]:
                dtypes = {str(d).upper() for d, _ in theirs["tensors"].values()}
                assert dtypes & OTHER_SAFETENSORS_DTYPES, f"seed {seed}: {dtypes}"
            outcome[f"documented extra refusal: {extra}"] += 1
        else:
            outcome["both refuse"] += 1
    return outcome


def _check_mix(outcome: Counter, total: int) -> None:
    """The generator must exercise both sides: a test where everything is refused would prove nothing."""
    assert outcome["both accept"] >= total // 5 and outcome["both refuse"] >= total // 5, outcome
    assert outcome[f"documented extra refusal: {DOCUMENTED_EXTRAS[0]}"] > 0, outcome


def test_header_check_agrees_with_safetensors(tmp_path):
    outcome = _run(tmp_path, range(1_000))
    _check_mix(outcome, 1_000)


@pytest.mark.slow
def test_header_check_agrees_with_safetensors_at_scale(tmp_path):
    outcome = _run(tmp_path, range(1_000, 11_000))
    _check_mix(outcome, 10_000)
