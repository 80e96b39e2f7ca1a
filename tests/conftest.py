"""Fixtures shared by the live test modules."""

from __future__ import annotations

import pytest

from tests.live import ns_name
from tracer.host import netns


@pytest.fixture
def ns():
    """A network namespace of the test's own (loopback up), removed afterwards."""
    with netns.NetNS(ns_name("ns")) as n:
        yield n
