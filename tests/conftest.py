"""Shared fixtures: the default corpus, tokenized once per session into a private cache directory."""

import os

import pytest


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
