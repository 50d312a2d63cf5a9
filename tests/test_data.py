"""Data sources, the tokenizer cache and deterministic batches."""

import numpy as np
import pytest
import torch

from moe_trace.data import TokenData, load_data, to_device
from moe_trace.errors import UsageError


def test_default_corpus_batches_are_a_function_of_seed_and_step(corpus_cache):
    data = load_data(None, 4096, 128)
    assert data.tokenizer_path is not None and data.tokenizer_path.is_relative_to(corpus_cache)
    assert len(data.val) > 128 and len(data.train) > 19 * len(data.val) * 0.9
    x, y = data.batch("train", seed=0, step=7, micro=1, batch_size=4, seq_len=128)
    assert x.shape == y.shape == (4, 128) and int(x.max()) < 4096
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
    again, _ = data.batch("train", seed=0, step=7, micro=1, batch_size=4, seq_len=128)
    other, _ = data.batch("train", seed=0, step=8, micro=1, batch_size=4, seq_len=128)
    assert (x == again).all() and not (x == other).all()


def test_text_directory_is_tokenized_once_and_cached_beside_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    (corpus / "image.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    first = load_data(corpus, vocab_size=300, seq_len=16)
    assert first.tokenizer_path.parent.parent == tmp_path / "corpus.moe-trace-cache"
    stamp = first.tokenizer_path.stat().st_mtime_ns
    second = load_data(corpus, vocab_size=300, seq_len=16)
    assert second.tokenizer_path == first.tokenizer_path and second.tokenizer_path.stat().st_mtime_ns == stamp
    assert np.array_equal(first.train, second.train)


def test_pretokenized_bin_and_npy(tmp_path):
    ids = np.arange(5000, dtype=np.uint16) % 1000
    ids.tofile(tmp_path / "ids.bin")
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    for name in ("ids.bin", "ids.npy"):
        data = load_data(tmp_path / name, vocab_size=1000, seq_len=32)
        assert data.tokenizer_path is None
        assert np.array_equal(np.concatenate([data.train, data.val]), ids)


def test_bad_data_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_data(tmp_path / "missing.txt", 4096, 128)
    np.save(tmp_path / "big.npy", np.array([0, 70000] * 100, dtype=np.int32))
    with pytest.raises(UsageError, match="does not fit"):
        load_data(tmp_path / "big.npy", 50257, 8)
    np.save(tmp_path / "short.npy", np.arange(50, dtype=np.int32))
    with pytest.raises(UsageError, match="too few"):
        load_data(tmp_path / "short.npy", 100, 32)


def test_the_tokenizer_learns_from_the_first_bytes_and_encodes_every_text(tmp_path):
    """An uncapped corpus learns its merges from a sample (``BPE_SAMPLE_BYTES``) and still encodes every text."""
    from tokenizers import Tokenizer

    from moe_trace.data import _first_bytes, _tokenized

    texts = ["alpha beta gamma " * 50] * 10 + ["zyxw vuts " * 50] * 10
    assert list(_first_bytes(iter(texts), 1)) == texts[:1]
    assert list(_first_bytes(iter(texts), 10 ** 9)) == texts
    sample = sum(len(t.encode()) for t in texts[:10])
    data = _tokenized(lambda: iter(texts), tmp_path / "sampled", 300, "test", sample_bytes=sample)
    whole = _tokenized(lambda: iter(texts), tmp_path / "whole", 300, "test")  # no sample: all of it
    sampled_tokens = Tokenizer.from_file(str(data.tokenizer_path)).get_vocab()
    assert not any("zyx" in token for token in sampled_tokens)  # the second half never reached the merges
    assert any("zyx" in token for token in Tokenizer.from_file(str(whole.tokenizer_path)).get_vocab())
    # every text is encoded: its end-of-text ids are all there, in train and validation together
    end = Tokenizer.from_file(str(data.tokenizer_path)).token_to_id("<|endoftext|>")
    ids = np.concatenate([data.train, data.val])
    assert int((ids == end).sum()) == len(texts)


def test_an_uncapped_default_corpus_holds_the_capped_one():
    from moe_trace.data import python_source_corpus

    capped = python_source_corpus(1 << 20)
    everything = python_source_corpus(0)
    assert everything[:len(capped)] == capped and len(everything) > len(capped)


def _token_data() -> TokenData:
    ids = np.random.default_rng(0).integers(0, 1000, size=50_000).astype(np.uint16)
    return TokenData(train=ids, val=ids[:5000], vocab_size=1000, tokenizer_path=None, source="random")


def test_a_batch_reaches_the_device_unchanged():
    x, y = _token_data().batch("train", 0, 3, 1, 4, 64)
    moved = to_device((x, y), torch.device("cpu"))
    assert all(torch.equal(m, t) for m, t in zip(moved, (x, y), strict=True))
    assert torch.equal(moved[0][:, 1:], moved[1][:, :-1])  # targets are the inputs shifted by one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_batch_is_queued_behind_the_gpus_work_not_waited_for():
    """The copy joins the GPU's queue: the host does not wait for the work already there."""
    x, y = _token_data().batch("train", 0, 3, 1, 8, 2048)
    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work ahead of the copy
    moved = to_device((x, y), device)
    assert not torch.cuda.current_stream().query(), "the copy waited for the queued work"
    assert torch.equal(moved[0].cpu(), x) and torch.equal(moved[1].cpu(), y)
