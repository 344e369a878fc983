"""The exercise checks of notebook 06 accept the right answer and name each planted mistake."""

import pytest
import torch

from moba_edu.checks import Mistake, nb06


def blocks_visited(indices, query_tile, slip=None):
    sizes = []
    for start in range(0, len(indices), query_tile):
        tile = indices[start:start + query_tile]
        if slip == "own":
            tile = tile[:, 1:]
        if slip == "padding":
            sizes.append(tile.unique().numel())
        elif slip == "duplicates":
            sizes.append(int((tile >= 0).sum()))
        else:
            sizes.append(tile[tile >= 0].unique().numel())
    return torch.tensor(sizes[:-1] if slip == "ragged" else sizes)


def bucket_offsets(routed, n_blocks, slip=None):
    real = routed.flatten() % n_blocks if slip == "wrap" else routed[routed >= 0]
    counts = torch.bincount(real, minlength=n_blocks)
    if slip == "counts":
        return counts
    if slip == "inclusive":
        return counts.cumsum(0)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def test_blocks_visited_accepts_the_right_answer(capsys):
    nb06.check_blocks_visited(blocks_visited)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("padding", "counted the -1 padding"), ("duplicates", "without removing duplicates"),
    ("own", "left out the own blocks"), ("ragged", "the last, ragged tile"),
])
def test_blocks_visited_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_blocks_visited(lambda indices, tile: blocks_visited(indices, tile, slip))


def test_bucket_offsets_accepts_the_right_answer(capsys):
    nb06.check_bucket_offsets(bucket_offsets)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("wrap", "padding was counted as a pair of the last block"), ("counts", "returned the counts"),
    ("inclusive", "leading 0 is missing"),
])
def test_bucket_offsets_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_bucket_offsets(lambda routed, n: bucket_offsets(routed, n, slip))
