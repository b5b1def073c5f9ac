"""PolyNorm (and PolyReLUNorm, PolyNorm of relu(x)) under tensor parallelism: two real gloo processes, each
holding half of the FFN columns, with `row_sum_reducer` = all-reduce SUM, against the full-width
single-process result."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polycom_lm.activations import build_activation

ROWS, WIDTH, WORLD = 6, 16, 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_width_result(impl: str, name: str = "polynorm"):
    """Single process, whole rows: (out, dx, dweight, dbias) with the same seeds as the workers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64)
    module = build_activation(name, impl=impl).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.7, -0.4, 1.3]))
        module.bias.fill_(0.25)
    out = module(x)
    out.backward(grad_out)
    return out.detach(), x.grad, module.weight.grad, module.bias.grad


def worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # One process group for every case: starting processes costs more than the checks.
        for impl, sharded_norm in [("fused", True), ("reference", True), ("fused", False)]:
            check_shard(rank, impl, sharded_norm)
        for impl in ("fused", "reference"):
            check_shard(rank, impl, True, "polyrelunorm")
        check_shard(rank, "fused", False, "polyrelunorm")
    finally:
        dist.destroy_process_group()


def check_shard(rank: int, impl: str, sharded_norm: bool, name: str = "polynorm") -> None:
    expected_out, expected_dx, expected_dweight, expected_dbias = full_width_result(impl, name)
    generator = torch.Generator().manual_seed(0)
    x_full = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64)
    grad_full = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64)
    columns = slice(rank * WIDTH // WORLD, (rank + 1) * WIDTH // WORLD)
    x = x_full[:, columns].clone().requires_grad_()
    module = build_activation(name, impl=impl).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.7, -0.4, 1.3]))
        module.bias.fill_(0.25)
    if sharded_norm:
        module.row_sum_reducer = all_reduce_sum
        module.full_width = WIDTH
    out = module(x)
    out.backward(grad_full[:, columns])
    if not sharded_norm:
        # A naive per-shard norm normalises over half a row: a different function.
        assert not torch.allclose(out, expected_out[:, columns], rtol=1e-3, atol=1e-3)
        return
    torch.testing.assert_close(out, expected_out[:, columns], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, expected_dx[:, columns], rtol=1e-10, atol=1e-10)
    # Coefficient gradients are each shard's share; their sum over shards is the full gradient.
    dweight, dbias = all_reduce_sum(module.weight.grad.clone()), all_reduce_sum(module.bias.grad.clone())
    torch.testing.assert_close(dweight, expected_dweight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dbias, expected_dbias, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_polynorm_tp2_matches_tp1_and_a_per_shard_norm_does_not():
    """fused and reference PolyNorm and PolyReLUNorm on 2 column shards with the all-reduce hook equal the full-width
    result (output, input grad, coefficient grads summed over shards); without the hook they differ."""
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
