"""The interleaved storage of a `[gate | up]` in-proj under tensor parallelism: contiguous shard r holds
exactly rank r's gate rows followed by its matching up rows, and the conversion back is exact."""

import pytest
import torch

from polycom_lm.distributed.tensor_parallel import canonical_to_interleaved, interleaved_to_canonical


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_contiguous_shard_holds_matching_gate_and_up_rows(tp):
    width, d_model = 8, 3
    canonical = torch.arange(2 * width * d_model, dtype=torch.float64).reshape(2 * width, d_model)
    gate, up = canonical[:width], canonical[width:]
    interleaved = canonical_to_interleaved(canonical, tp)
    for rank, shard in enumerate(interleaved.chunk(tp)):
        rows = slice(rank * width // tp, (rank + 1) * width // tp)
        torch.testing.assert_close(shard, torch.cat([gate[rows], up[rows]]))
    torch.testing.assert_close(interleaved_to_canonical(interleaved, tp), canonical)


def test_one_dimensional_tensors_convert_too():
    canonical = torch.arange(8.0)  # e.g. a bias [2w]
    torch.testing.assert_close(canonical_to_interleaved(canonical, 2), torch.tensor([0.0, 1, 4, 5, 2, 3, 6, 7]))
