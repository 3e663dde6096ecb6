"""Doctests of jtransfer/ and porting/ (pyproject's addopts has --doctest-modules).

The test suite's own settings are in tests/conftest.py. Docstring examples show how
to call things, not convolution numerics (tests/ checks those), so they run with
XLA's own convolutions (`JTRANSFER_CONV=xla`), which compile several times faster
than jtransfer's CPU forms (`jtransfer.models.conv`) and keep the doctests short.
"""

from __future__ import annotations

import pytest
from _pytest.doctest import DoctestItem

from jtransfer.models import conv


@pytest.fixture(autouse=True)
def _doctest_convolutions(request):
    if not isinstance(request.node, DoctestItem):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(conv.CONV_ENV, "xla")
        yield
