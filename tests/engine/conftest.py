"""Shared by the engine tests: a calibration text file."""

from __future__ import annotations

import pytest
from tiny_models import write_calibration_file


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_calibration_file(tmp_path_factory.mktemp("data") / "calib.txt")
