"""Forward+backward time of one MoE layer, ours against transformers' OLMoE block and a dense FFN.

Measured side by side in one run, interleaved round by round so that load from other processes hits
every candidate alike; the table reports medians and ratios, which are what to compare (absolute times
depend on the machine and its load).

    .venv/bin/python scripts/bench_moe.py                      # the issue's setting (below)
    .venv/bin/python scripts/bench_moe.py --tokens 512 --repeats 3

Default setting: hidden 512, 64 experts, top-8, SwiGLU expert width 256, 2048 tokens, fp32, a random
(non-zero) router. Candidates:
- ours (grouped_mm / padded_bmm expert matmuls), SwiGLU experts with OLMoE's weights;
- transformers `OlmoeSparseMoeBlock` with its experts implementations "eager" (the class's own forward, a
  Python loop over the experts that were hit) and "grouped_mm" (what `from_pretrained` picks here). Its
  third, "batched_mm", gathers one weight matrix per token-expert pair ([T·k, 2·I, H]: 17 GB at this
  size) and is left out;
- a dense SwiGLU FFN with the same active parameters (width top_k · expert width = 2048);
- ours with PolyNorm experts (width 3/2 · 256 = 384) and the dense PolyNorm FFN of equal active size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.models import FeedForward
from polycom_lm.models.moe import MoEFeedForward


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=256, help="SwiGLU expert width")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def ours(arguments, activation: str, matmul: str, hf_block=None) -> torch.nn.Module:
    config = ModelConfig(
        d_model=arguments.hidden,
        activation=activation,
        activation_impl="auto",
        moe=MoEConfig(
            num_experts=arguments.experts,
            top_k=arguments.top_k,
            expert_hidden_size=arguments.expert_width,
            expert_matmul=matmul,
        ),
    )
    layer = MoEFeedForward(config)
    layer.init_weights(0.02, 0.02)
    if hf_block is not None:  # the same weights as transformers' block: the same routing and work
        with torch.no_grad():
            layer.router.weight.copy_(hf_block.gate.weight)
            layer.experts.in_proj.copy_(hf_block.experts.gate_up_proj)
            layer.experts.out_proj.copy_(hf_block.experts.down_proj)
    return layer


def transformers_block(arguments, implementation: str, seed: int) -> torch.nn.Module:
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(
        hidden_size=arguments.hidden,
        intermediate_size=arguments.expert_width,
        num_experts=arguments.experts,
        num_experts_per_tok=arguments.top_k,
    )
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    block = OlmoeSparseMoeBlock(config)
    with torch.no_grad():
        for parameter in block.parameters():  # transformers initialises the router to zero: randomise
            parameter.normal_(0.0, 0.02)
    return block


def dense(arguments, activation: str) -> torch.nn.Module:
    """A dense FFN whose matmul parameters equal the MoE layer's active ones (minus the small router)."""
    config = ModelConfig(
        d_model=arguments.hidden,
        activation=activation,
        ffn_hidden_size=arguments.top_k * arguments.expert_width,
    )
    ffn = FeedForward(config)
    ffn.init_weights(0.02, 0.02)
    return ffn


def forward_backward(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        inputs = x.detach().requires_grad_()
        (module(inputs) * upstream).sum().backward()

    return run


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    x = torch.randn(1, arguments.tokens, arguments.hidden)
    upstream = torch.randn_like(x)
    reference_block = transformers_block(arguments, "eager", seed=1)
    candidates: dict[str, torch.nn.Module] = {
        "ours swiglu grouped_mm": ours(arguments, "swiglu", "grouped_mm", reference_block),
        "ours swiglu padded_bmm": ours(arguments, "swiglu", "padded_bmm", reference_block),
        "transformers eager": reference_block,
        "transformers grouped_mm": transformers_block(arguments, "grouped_mm", seed=1),
        "dense swiglu (same active params)": dense(arguments, "swiglu"),
        "ours polynorm grouped_mm": ours(arguments, "polynorm", "grouped_mm"),
        "dense polynorm (same active params)": dense(arguments, "polynorm"),
    }
    with torch.no_grad():  # sanity: ours computes what transformers computes
        difference = (candidates["ours swiglu grouped_mm"](x) - reference_block(x)).abs().max().item()
    runs = {name: forward_backward(module, x, upstream) for name, module in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(2 + arguments.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index >= 2:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest_transformers = min(value for name, value in medians.items() if name.startswith("transformers"))
    print(
        f"MoE forward+backward, hidden {arguments.hidden}, {arguments.experts} experts, top-{arguments.top_k}, "
        f"SwiGLU expert width {arguments.expert_width}, {arguments.tokens} tokens, fp32, "
        f"{torch.get_num_threads()} threads, median of {arguments.repeats} interleaved rounds"
    )
    print(f"max |ours - transformers| output difference: {difference:.2e}")
    print(f"{'candidate':40s} {'ms':>9s} {'÷ fastest transformers':>24s}")
    for name, value in medians.items():
        print(f"{name:40s} {value * 1e3:9.1f} {value / fastest_transformers:24.2f}")
    swiglu_ratio = medians["ours swiglu grouped_mm"] / medians["dense swiglu (same active params)"]
    polynorm_ratio = medians["ours polynorm grouped_mm"] / medians["dense polynorm (same active params)"]
    print(f"MoE ÷ dense FFN of equal active parameters: swiglu {swiglu_ratio:.2f}, polynorm {polynorm_ratio:.2f}")


if __name__ == "__main__":
    main()
