"""Shared fixtures. The tiny random-weight model set is built once per machine (cached, atomic) and reused."""

import pytest

from dpslm_stream import hub
from dpslm_stream.tiny import ensure_tiny_set


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny_set()


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    return hub.ModelSet(str(tiny_dir))
