"""Test configuration: offline, CPU, one torch thread (deterministic, and fair to parallel jobs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton kernels are first imported

import pytest
import torch

torch.set_num_threads(int(os.environ.get("ATTNCTL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_cache():
    """Tiny pipelines built once per session; tests that modify them must restore them (handles do)."""
    from attnctl.testing import make_tiny_pipeline

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny_pipeline(name)
        return cache[name]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked `heavy` (a minute or more of CPU) run first: started last, one of them would keep a pytest-xdist
    worker busy alone at the end of the run. The order is otherwise the collection's, the same on every worker."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
