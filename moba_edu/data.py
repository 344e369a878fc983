"""Training data without a download: a real text corpus and synthetic long-context retrieval tasks.

Corpus. The Python standard library's own source files (`sysconfig.get_paths()["stdlib"]`, its `test`
packages and any site-packages left out), read as bytes (vocab 256) and joined with a 0 byte between
files. Every Python installation has it, so every machine has the corpus; it is the same on every
machine with the same Python version (another version ships other files: another corpus). Files go
to train or validation by a hash of their relative path (about 1 in 10 to validation), so the split
never depends on the listing order or the machine.

Retrieval. Key-value pairs are written into text as `KEY k v` (three bytes: the marker 1, a key and a
value byte from 128..255) and asked for at the end as `QUERY k v`: the model must predict `v` after
`QUERY k`, which only attention to the right pair can answer. With many pairs this is multi-query
associative recall (MQAR; Arora et al., 2023, "Zoology"); with one pair at a chosen distance from its
query it is a needle in a haystack. A MoBA layer sees the pair only if its router picks the pair's
block (or it lies in the query's own block): a router that misses it fails visibly.

Shapes: tokens int64 [B, S + 1] (inputs tokens[:, :-1], targets tokens[:, 1:]); answer bool [B, S],
True where the target is a value asked for by a query.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

KEY, QUERY = 1, 2            # markers: bytes that never occur in the library's source
SYMBOLS = range(128, 256)    # keys and values
SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """'val' for about 1 path in 10 (first byte of its SHA-1), else 'train'."""
    return "val" if hashlib.sha1(relpath.encode()).digest()[0] % 10 == 0 else "train"


@lru_cache(maxsize=None)
def stdlib_files() -> tuple[str, ...]:
    """Sorted relative paths (posix) of the standard library's .py files, tests and packages left out."""
    root = stdlib_root()
    paths = (p.relative_to(root) for p in root.rglob("*.py"))
    return tuple(sorted(p.as_posix() for p in paths if not SKIPPED & set(p.parts)))


@lru_cache(maxsize=None)
def corpus(split: str) -> torch.Tensor:
    """uint8 [n]: the files of `split` ('train' or 'val'), in sorted order, each followed by a 0 byte."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    root = stdlib_root()
    data = b"".join((root / p).read_bytes() + b"\0" for p in stdlib_files() if split_of(p) == split)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def corpus_info() -> dict:
    """What the corpus is on this machine, for the logs: Python version, files and bytes per split."""
    files = stdlib_files()
    val = [p for p in files if split_of(p) == "val"]
    return {"python": sys.version.split()[0], "root": str(stdlib_root()), "files": len(files),
            "val_files": len(val), "train_bytes": len(corpus("train")), "val_bytes": len(corpus("val")),
            "listing_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest()[:12]}


def text_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 bytes of `data` (uint8 [n]) -> int64 [batch, seq_len + 1]."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"seq_len: {seq_len} does not fit in a corpus of {len(data)} bytes")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


def insert_pairs(tokens: torch.Tensor, n_pairs: int, gen: torch.Generator, distance: int | None = None):
    """Write `n_pairs` pairs `KEY k v` into each row of tokens [B, S + 1] and ask for each at the end
    (`QUERY k v`, in random order); returns (tokens, answer bool [B, S]).

    Keys are distinct within a row. Pairs go at random places before the queries; with `distance`,
    the one pair's key sits exactly `distance` tokens before its query's key.
    """
    tokens = tokens.clone()
    B, S = tokens.shape[0], tokens.shape[1] - 1
    q0 = S + 1 - 3 * n_pairs                        # the queries fill the positions from q0 on
    if n_pairs < 1 or n_pairs > len(SYMBOLS) or q0 // 3 < n_pairs:
        raise ValueError(f"n_pairs: {n_pairs} pairs do not fit in sequences of {S} tokens")
    if distance is not None and (n_pairs != 1 or not 3 <= distance <= q0):
        raise ValueError(f"distance: expected 3..{q0} with n_pairs=1, got {distance} with n_pairs={n_pairs}")
    answer = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        keys = torch.randperm(len(SYMBOLS), generator=gen)[:n_pairs] + SYMBOLS.start
        values = torch.randint(SYMBOLS.start, SYMBOLS.stop, (n_pairs,), generator=gen)
        if distance is None:   # n_pairs of the q0 // 3 slots of 3 tokens before the queries
            starts = 3 * torch.randperm(q0 // 3, generator=gen)[:n_pairs]
        else:                  # key at q0 - distance + 1, query key at q0 + 1
            starts = torch.tensor([q0 - distance])
        for start, key, value in zip(starts.tolist(), keys.tolist(), values.tolist()):
            tokens[b, start:start + 3] = torch.tensor([KEY, key, value])
        for i, j in enumerate(torch.randperm(n_pairs, generator=gen).tolist()):
            at = q0 + 3 * i
            tokens[b, at:at + 3] = torch.tensor([QUERY, keys[j], values[j]])
            answer[b, at + 1] = True                # input `k` at at + 1 predicts the value at at + 2
    return tokens, answer
