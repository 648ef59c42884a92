"""The `kohya` fixture of the opt-in `-m real` tests: the sd-scripts tree, scratch folder and interpreter of
harness/ (SD_SCRIPTS, KOHYA_REAL_WORK, KOHYA_PYTHON). Skips while SD_SCRIPTS is unset or names no folder, or while
KOHYA_PYTHON names no file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import Kohya


@pytest.fixture(scope="session")
def kohya(tmp_path_factory) -> Kohya:
    for variable, exists in (("SD_SCRIPTS", Path.is_dir), ("KOHYA_PYTHON", Path.is_file)):
        value = os.environ.get(variable)
        if value and not exists(Path(value)):
            pytest.skip(f"{variable}={value} does not exist")
    found = Kohya.from_env(tmp_path_factory.mktemp("kohya_harness"))
    if found is None:
        pytest.skip("SD_SCRIPTS is not set: point it at a kohya-ss/sd-scripts work tree to run the real trainer")
    return found
