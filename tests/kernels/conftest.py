"""Fixtures of the kernel tests."""

from __future__ import annotations

import logging

import pytest

from gazelle.kernels import dispatch


@pytest.fixture
def triton_mode(monkeypatch):
    """GAZELLE_KERNELS=triton: the Triton kernels also for CPU tensors (in Triton's interpreter)."""
    monkeypatch.setenv("GAZELLE_KERNELS", "triton")


@pytest.fixture
def kernel_log(monkeypatch):
    """Messages of the "gazelle.kernels" logger, with fresh once-per-op memories."""
    monkeypatch.setattr(dispatch, "_logged", set())
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("gazelle.kernels")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
