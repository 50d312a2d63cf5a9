"""Training data: a text file, a directory of text files, pre-tokenized ids, or (by default) the Python
sources of the running interpreter's installation, which exist on every machine without a download.

Text is tokenized with a byte-level BPE trained locally with the ``tokenizers`` library. The tokenizer and
the token ids (``train.npy``, ``val.npy``) are cached beside the data (for the default corpus or a
read-only location, under ``$MOE_TRACE_CACHE`` or ``~/.cache/moe-trace``), keyed by a fingerprint of
the corpus and the vocabulary size, so a second run starts at once. Batches depend only on
``(seed, step, micro-batch, rank)``: a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_trace.errors import UsageError

END_OF_TEXT = "<|endoftext|>"
VALIDATION_FRACTION = 0.05
BYTE_ALPHABET = 257  # a byte-level BPE vocabulary starts with the 256 bytes and END_OF_TEXT
_SPLITS = {"train": 0, "val": 1}
_ENCODE_CHUNK = 512  # documents per encode_batch call: bounds the memory of tokenizers' Encoding objects
# An uncapped default corpus learns its BPE merges from its first 128 MiB: on several GB, training on all of it
# would take far longer than encoding it. (A capped corpus learns from all of it, as it always did.)
BPE_SAMPLE_BYTES = 128 << 20


@dataclass
class TokenData:
    """Token ids split into train and validation, and where they came from."""

    train: np.ndarray  # 1-D token ids (may be a memory map)
    val: np.ndarray
    vocab_size: int  # every id is below this
    tokenizer_path: Path | None  # None for pre-tokenized input
    source: str

    def batch(self, split: str, seed: int, step: int, micro: int, batch_size: int, seq_len: int,
              rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, int64 ``[batch_size, seq_len]``, a pure function of its arguments."""
        tokens = self.train if split == "train" else self.val
        rng = np.random.default_rng([seed, _SPLITS[split], step, rank, micro])
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        window = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``batch`` (token ids, or any small host tensors) on ``device``, queued behind the work already there. To a
    GPU each tensor goes through pinned host memory, which the copy engine reads directly; from pageable memory
    the driver stages the bytes first. Neither waits for the GPU's queue (measured on an H200), but pinned
    batches made gpt-125m-moe's 16k-token step 0.5 ms faster and the 2-GPU 128k step 1.7 ms
    (benchmarks/NOTES.md, session 8)."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    # Pinned blocks come from torch's caching host allocator, which reuses one only after its copy completed.
    return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t).to(device, non_blocking=True)
                 for t in batch)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOE_TRACE_CACHE") or Path.home() / ".cache" / "moe-trace")


def load_data(data: str | os.PathLike | None, vocab_size: int, seq_len: int, *,
              max_corpus_bytes: int = 8 << 20, cache_dir: Path | None = None) -> TokenData:
    """Token ids for ``data`` (see the module docstring), tokenizing and caching text on first use.

    ``max_corpus_bytes`` caps the default corpus (0: no cap, every source file). Raises :class:`UsageError` for a
    missing path, ids that do not fit ``vocab_size``, or too little data for one ``seq_len`` window in each split.
    """
    if vocab_size <= BYTE_ALPHABET and (data is None or Path(data).suffix not in (".bin", ".npy")):
        raise UsageError(f"--vocab-size {vocab_size}: a byte-level BPE tokenizer needs more than {BYTE_ALPHABET} "
                         "tokens (256 bytes and the end-of-text token)")
    if data is None:
        docs = python_source_corpus(max_corpus_bytes)
        cache = (cache_dir or default_cache_dir()) / f"pysrc-{_fingerprint(docs)}-v{vocab_size}"
        token_data = _tokenized(lambda: (text for _, text in docs), cache, vocab_size, "python sources",
                                sample_bytes=None if max_corpus_bytes else BPE_SAMPLE_BYTES)
    else:
        path = Path(data)
        if not path.exists():
            raise UsageError(f"--data {path}: no such file or directory")
        if path.suffix in (".bin", ".npy"):
            token_data = _pretokenized(path, vocab_size)
        else:
            docs = _text_corpus(path)
            beside = path.parent / f"{path.name}.moe-trace-cache"
            if not os.access(beside if beside.exists() else path.parent, os.W_OK):  # read-only data
                beside = (cache_dir or default_cache_dir()) / "text"
            cache = beside / f"{_fingerprint(docs)}-v{vocab_size}"
            token_data = _tokenized(lambda: (p.read_text(errors="replace") for p, _ in docs), cache,
                                    vocab_size, str(path))
    shortest = min(len(token_data.train), len(token_data.val))
    if shortest <= seq_len + 1:
        raise UsageError(f"{token_data.source}: {shortest} tokens in a split is too few for --seq-len {seq_len}")
    return token_data


def python_source_corpus(max_bytes: int) -> list[tuple[str, str]]:
    """``(name, text)`` of the interpreter's ``.py`` files, deduplicated by content, up to ``max_bytes`` (0: all).

    Files are taken in the order of a hash of their path relative to their root, a deterministic order
    that mixes packages so that a capped corpus is not all one library.
    """
    roots = sorted({os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
    files: dict[str, str] = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                if name.endswith(".py"):
                    full = os.path.join(directory, name)
                    files.setdefault(os.path.relpath(full, root), full)
    order = sorted(files, key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
    seen: set[bytes] = set()
    docs, total = [], 0
    for rel in order:
        try:
            raw = Path(files[rel]).read_bytes()
        except OSError:
            continue
        digest = hashlib.sha1(raw).digest()
        if not raw.strip() or digest in seen:
            continue
        seen.add(digest)
        docs.append((rel, raw.decode("utf-8", errors="replace")))
        total += len(raw)
        if max_bytes and total >= max_bytes:
            break
    return docs


def _text_corpus(path: Path) -> list[tuple[Path, str]]:
    """``(file, content hash)`` of a text file or of every non-hidden text file under a directory."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    docs = []
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw[:8192]:
            continue  # binary
        docs.append((f, hashlib.sha1(raw).hexdigest()))
    if not docs:
        raise UsageError(f"--data {path}: no text files")
    return docs


def _fingerprint(docs: list[tuple]) -> str:
    h = hashlib.sha256()
    for name, content in docs:
        h.update(str(name).encode() + b"\0" + hashlib.sha1(content.encode()).digest())
    return h.hexdigest()[:16]


def _tokenized(texts: Callable[[], Iterable[str]], cache: Path, vocab_size: int, source: str,
               sample_bytes: int | None = None) -> TokenData:
    """Train (or load) the BPE tokenizer, on the texts' first ``sample_bytes`` (None: all), and the token ids of
    all of them, cached in ``cache``."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    tokenizer_path, train_path, val_path = cache / "tokenizer.json", cache / "train.npy", cache / "val.npy"
    if not (tokenizer_path.exists() and train_path.exists() and val_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        bpe = ByteLevelBPETokenizer()
        sample = texts() if sample_bytes is None else _first_bytes(texts(), sample_bytes)
        bpe.train_from_iterator(sample, vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[END_OF_TEXT], show_progress=False)
        tokenizer = Tokenizer.from_str(bpe.to_str())
        ids = np.concatenate(list(_encode(tokenizer, texts(), vocab_size)))
        n_val = max(1, int(len(ids) * VALIDATION_FRACTION))
        # Written under temporary names and renamed, tokenizer last, so a killed build is rebuilt.
        _atomic_save(train_path, ids[:-n_val])
        _atomic_save(val_path, ids[-n_val:])
        tmp = cache / f".tokenizer.{os.getpid()}.tmp"
        tokenizer.save(str(tmp))
        os.replace(tmp, tokenizer_path)
    return TokenData(np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), vocab_size,
                     tokenizer_path, source)


def _first_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    """The texts up to and including the one that brings their UTF-8 size to ``limit``."""
    total = 0
    for text in texts:
        yield text
        total += len(text.encode())
        if total >= limit:
            return


def _encode(tokenizer, texts: Iterable[str], vocab_size: int) -> Iterator[np.ndarray]:
    """Token ids of each text followed by the end-of-text id, in the smallest dtype that holds them."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    end = tokenizer.token_to_id(END_OF_TEXT)
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, _ENCODE_CHUNK)):
        for encoding in tokenizer.encode_batch(chunk):
            yield np.asarray([*encoding.ids, end], dtype=dtype)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _pretokenized(path: Path, vocab_size: int) -> TokenData:
    ids = np.memmap(path, dtype=np.uint16, mode="r") if path.suffix == ".bin" else np.load(path, mmap_mode="r")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"--data {path}: expected a 1-D array of integer token ids, got {ids.dtype} {ids.shape}")
    largest = int(ids.max()) if len(ids) else 0
    if largest >= vocab_size:
        raise UsageError(f"--data {path}: token id {largest} does not fit --vocab-size {vocab_size}")
    n_val = max(1, int(len(ids) * VALIDATION_FRACTION))
    return TokenData(ids[:-n_val], ids[-n_val:], vocab_size, None, str(path))
