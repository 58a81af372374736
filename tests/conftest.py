"""Fixtures: tiny random-weight pipelines built here, and the shipped default model. Nothing touches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest  # noqa: E402
import torch  # noqa: E402

from attnreuse.pipelines.tiny import build_pipeline  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sd_pipe():
    """A fresh tiny SD-1.x-style pipeline (random weights, local tokenizer)."""
    return build_pipeline("tiny-sd", seed=0)


@pytest.fixture
def sdxl_pipe():
    return build_pipeline("tiny-sdxl", seed=0)
