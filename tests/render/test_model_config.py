"""A model folder's JSON files are inputs like any other: bounded, regular files, strict JSON, one-line errors."""

from __future__ import annotations

import os
import threading

import pytest

from blora_tools.errors import BloraError
from blora_tools.render.pipeline import peek_arch


def _folder(tmp_path, index_text=None):
    folder = tmp_path / "model"
    folder.mkdir()
    if index_text is not None:
        (folder / "model_index.json").write_text(index_text)
    return folder


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1, 2]", "not a JSON object"),
        ("[" * 5000 + "]" * 5000, "not valid JSON"),
        ('{"_class_name": NaN}', "not valid JSON"),
        ("{", "not valid JSON"),
    ],
)
def test_a_bad_model_index_is_a_one_line_error(tmp_path, text, problem):
    folder = _folder(tmp_path, text)
    with pytest.raises(BloraError) as info:
        peek_arch(folder)
    assert problem in str(info.value) and "model_index.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_oversized_model_index_is_refused(tmp_path):
    folder = _folder(tmp_path, '{"_class_name": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(BloraError, match="limit"):
        peek_arch(folder)


def test_a_fifo_model_index_is_not_read(tmp_path):
    folder = _folder(tmp_path)
    fifo = folder / "model_index.json"
    os.mkfifo(fifo)
    # Were it opened for reading, this writer would unblock it: the test then fails instead of hanging.
    watchdog = threading.Timer(10, lambda: open(fifo, "w").close())
    watchdog.start()
    try:
        assert peek_arch(folder) is None  # not a regular file: not a diffusers folder, and nothing blocked
        assert watchdog.is_alive()
    finally:
        watchdog.cancel()


def test_a_bad_unet_config_leaves_the_family_open(tmp_path):
    folder = _folder(tmp_path, '{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text("[]")
    assert peek_arch(folder) is None
