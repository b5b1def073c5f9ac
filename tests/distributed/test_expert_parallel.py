"""Expert parallelism on gloo (composed with DDP) against a single process: with EP=2 on 2 ranks, and EP=2
on 4 ranks (two expert-data-parallel replicas of each expert shard), the logits, losses, gradients and
gradient norms equal EP=1's on the same data."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import expert_parallel_worker as worker  # noqa: E402

from polycom_lm.config import config_from_dict  # noqa: E402
from polycom_lm.distributed.parallelize import check_parallel_config  # noqa: E402
from polycom_lm.errors import ConfigError  # noqa: E402

LAYOUTS = [(2, 2), (4, 2)]  # (world size, ep)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_checkpoint(directory: Path) -> dict:
    """One AdamW step of the per-expert case in one process (ep=1), saved by the plain ddp engine."""
    from polycom_lm.distributed.parallelize import build_engine, parallelize

    case = next(case for case in worker.expert_parallel_cases() if case["per_expert_coefficients"])
    config = worker.case_config(case, ep=1)
    engine = build_engine(config, torch.device("cpu"))
    model = worker.build(config)
    parallelize(model, config, engine, lambda module: torch.optim.AdamW(module.parameters(), lr=1e-2))
    _, loss = worker.step_loss(model, worker.batch(1))
    engine.backward(loss)
    engine.optimizer_step()
    engine.save_checkpoint(directory)
    saved = {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "exp_avg": {n: engine.optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()},
    }
    engine.close()
    return saved


def launch(tmp_path_factory, world_size: int, ep: int) -> list[list[dict]]:
    output = tmp_path_factory.mktemp(f"expert_parallel_w{world_size}_ep{ep}")
    saved = single_process_checkpoint(output / "single_process_checkpoint")
    port = free_port()
    processes = []
    for rank in range(world_size):
        environment = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        command = [sys.executable, str(HERE / "expert_parallel_worker.py"), str(output), str(ep),
                   str(output / "single_process_checkpoint")]
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    logs = [process.communicate(timeout=300)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    ranks = [torch.load(output / f"rank{rank}.pt") for rank in range(world_size)]
    for rank_results in ranks:
        rank_results[-1]["single_process"] = saved
    return ranks


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda layout: f"world{layout[0]}_ep{layout[1]}")
def layout_results(request, tmp_path_factory):
    world_size, ep = request.param
    return world_size, ep, launch(tmp_path_factory, world_size, ep)


def reference(case: dict, world_size: int) -> dict:
    """Single process, all experts: the mean of the two ranks' losses, plain autograd, plain clipping."""
    config = worker.case_config(case, ep=1)
    model = worker.build(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = worker.batch(world_size)
    record = {"losses": [], "norms": []}
    for step in range(worker.STEPS):
        optimizer.zero_grad(set_to_none=True)
        per_rank = [worker.step_loss(model, tokens[2 * rank : 2 * rank + 2]) for rank in range(world_size)]
        (sum(loss for _, loss in per_rank) / world_size).backward()
        record["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), worker.MAX_GRAD_NORM).item())
        if step == 0:
            record["logits"] = [logits.detach() for logits, _ in per_rank]
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        record["losses"].append([loss.item() for _, loss in per_rank])
        optimizer.step()
    return record


@pytest.mark.parametrize("index", range(len(worker.expert_parallel_cases())))
def test_expert_parallel_matches_single_process(layout_results, index):
    world_size, ep, ranks = layout_results
    case = worker.expert_parallel_cases()[index]
    expected = reference(case, world_size)
    local_experts = 4 // ep
    for rank in range(world_size):
        got = ranks[rank][index]
        ep_rank = rank % ep
        torch.testing.assert_close(got["logits"], expected["logits"][rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["losses"], [losses[rank] for losses in expected["losses"]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["norms"], expected["norms"], rtol=1e-5, atol=1e-6)
        expert_names = set(got["expert_names"])
        assert any(name.endswith("experts.in_proj") for name in expert_names)
        assert case["per_expert_coefficients"] == any("activation" in name for name in expert_names)
        assert got["engine"] == "DDPEngine"  # chosen by its name alone; expert parallelism is a transformation
        for name, gradient in got["grads"].items():
            full = expected["grads"][name]
            if name in expert_names:  # this rank's slice of the experts
                full = full[ep_rank * local_experts : (ep_rank + 1) * local_experts]
            torch.testing.assert_close(gradient, full, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_expert_parallel_checkpoint_resumes_on_one_process(layout_results):
    """Saved with ep=2, loaded by the plain single-process engine: every expert (and its optimizer moments)
    is the concatenation of the EP ranks' shards; replicated weights are rank 0's."""
    from polycom_lm.distributed.parallelize import build_engine, parallelize

    world_size, ep, ranks = layout_results
    index = next(i for i, case in enumerate(worker.expert_parallel_cases()) if case["per_expert_coefficients"])
    config = worker.case_config(worker.expert_parallel_cases()[index], ep=1)
    engine = build_engine(config, torch.device("cpu"))
    model = worker.build(config)
    parallelize(model, config, engine, lambda module: torch.optim.AdamW(module.parameters(), lr=1e-2))
    engine.load_checkpoint(ranks[0][index]["checkpoint"])
    expert_names = set(ranks[0][index]["expert_names"])
    for name, parameter in model.named_parameters():
        for kind, actual in (("parameters", parameter), ("exp_avg", engine.optimizer.state[parameter]["exp_avg"])):
            if name in expert_names:
                expected = torch.cat([ranks[rank][index][kind][name] for rank in range(ep)])
            else:
                expected = ranks[0][index][kind][name]
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"{kind} {name}")
    engine.close()


def test_single_process_checkpoint_resumes_with_expert_parallel(layout_results):
    """Saved by one process (ep=1), loaded with ep=2: each rank holds its slice of every expert and of its
    Adam moments, and the replicated weights in full."""
    world_size, ep, ranks = layout_results
    local_experts = 4 // ep
    for rank in range(world_size):
        resumed = ranks[rank][-1]
        saved = resumed["single_process"]
        ep_rank = rank % ep
        for kind in ("parameters", "exp_avg"):
            for name, actual in resumed[f"resumed_{kind}"].items():
                expected = saved[kind][name]
                if name in resumed["expert_names"]:
                    expected = expected[ep_rank * local_experts : (ep_rank + 1) * local_experts]
                torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"rank {rank} {kind} {name}")


def test_test_data_routes_unevenly_across_ranks():
    """The EP test exercises uneven all-to-all splits: the ranks' batches load the experts differently,
    and a rank sends different row counts to the two expert shards."""
    config = worker.case_config(worker.expert_parallel_cases()[0], ep=1)
    model = worker.build(config)
    tokens = worker.batch(2)
    counts = []
    for rank in range(2):
        model(tokens[2 * rank : 2 * rank + 2, :-1])
        counts.append(model.layers[0].ffn.routing_statistics["tokens_per_expert"])
    assert not torch.equal(counts[0], counts[1])
    assert counts[0][:2].sum() != counts[0][2:].sum()  # rank 0 sends unequal row counts to the two ranks


def test_bad_expert_parallel_configs_fail_before_any_work():
    def config(**settings):
        moe = {"num_experts": 6, "top_k": 2}
        return config_from_dict({"model": {"family": settings.pop("family", "moe"), "moe": moe},
                                 "distributed": settings})

    with pytest.raises(ConfigError, match="distributed.ep=4 does not divide model.moe.num_experts=6.*valid ep degrees"):
        check_parallel_config(config(ep=4), world_size=4)
    with pytest.raises(ConfigError, match="does not divide the world size 4"):
        check_parallel_config(config(ep=3), world_size=4)
    with pytest.raises(ConfigError, match="needs model.family 'moe'"):
        check_parallel_config(config(ep=2, family="dense"), world_size=2)
    with pytest.raises(ConfigError, match="tp > 1 is not supported"):
        check_parallel_config(config(ep=2, tp=2), world_size=4)
    with pytest.raises(ConfigError, match="implemented with distributed.backend 'ddp'.*got 'fsdp'"):
        check_parallel_config(config(ep=2, backend="fsdp"), world_size=4)
    check_parallel_config(config(ep=2), world_size=4)  # a valid one passes
