"""Shared fixtures: the default corpus, tokenized once per session into a private cache directory."""

import os
from pathlib import Path

import pytest

# Modules that import kernels under Triton's CPU interpreter (tests/triton_interpreter.py). They hold no GPU
# tests, and in a GPU run the interpreter leaked into the process's compiled kernels (torch.compile's own Triton
# code ran interpreted on CUDA tensors: "only 0-dimensional arrays can be converted to Python scalars").
INTERPRETED_MODULES = {"test_attention.py", "test_cross_entropy.py", "test_adamw_bf16.py"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``-m gpu`` on a CUDA machine leaves the interpreted kernel modules uncollected."""
    if collection_path.name not in INTERPRETED_MODULES or config.option.markexpr != "gpu":
        return None
    import torch

    return True if torch.cuda.is_available() else None


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A ``MOE_TRACE_CACHE`` for the session holding the tokenized default corpus for the tiny preset.

    Subprocesses inherit the variable, so every training run in the session reuses one tokenizer.
    """
    from moe_trace.data import load_data
    from moe_trace.model import PRESETS

    cache = tmp_path_factory.mktemp("moe-trace-cache")
    previous = os.environ.get("MOE_TRACE_CACHE")
    os.environ["MOE_TRACE_CACHE"] = str(cache)
    load_data(None, PRESETS["gpt-tiny-moe"].vocab_size, PRESETS["gpt-tiny-moe"].seq_len)
    yield cache
    if previous is None:
        del os.environ["MOE_TRACE_CACHE"]
    else:
        os.environ["MOE_TRACE_CACHE"] = previous
