"""The decode graphs' layout (pure functions; the capture itself is tested on the GPU)."""

from __future__ import annotations

import itertools

import pytest

from pagoda.engine.worker.cuda_graph import graph_batch_sizes, piece_ranges


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 28, 32, 40, 80])
@pytest.mark.parametrize("num_pieces", [1, 2, 4, 8])
def test_pieces_cover_every_layer_once_and_the_first_is_one_layer(num_layers, num_pieces):
    ranges = piece_ranges(num_layers, num_pieces)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a_end == b_start for (_, a_end), (b_start, _) in itertools.pairwise(ranges))
    assert all(end > start for start, end in ranges)
    assert len(ranges) <= num_pieces
    if num_pieces > 1 and num_layers > 1:
        assert ranges[0] == (0, 1)
        rest = [end - start for start, end in ranges[1:]]
        assert max(rest) - min(rest) <= 1  # the others split evenly


def test_batch_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(50) == [1, 2, 4, 8, 16, 32, 48, 50]
