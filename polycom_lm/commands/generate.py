"""`polycom-lm generate MODEL --prompt TEXT`: continue a prompt with a trained model (KV-cached sampling).

Greedy by default (--temperature 0); --temperature, --top-k, --top-p and --seed sample. The continuation is
printed as it is generated, after the prompt.
"""

from __future__ import annotations

import argparse
import sys

import torch

from polycom_lm.commands.model_source import add_model_arguments, load_from_arguments, resolve_device


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt with a trained model",
                                   description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="stop after the end-of-text token (default on)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.models.generation import check_sampling, generate_tokens

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device)
    loaded = load_from_arguments(args, device)
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer.encode_batch([args.prompt])[0]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    generated: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)
    for token in generate_tokens(loaded.model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p,
                                 eos_id=tokenizer.eos_id if args.stop_at_eos else None, generator=generator):
        if token == tokenizer.eos_id:
            break
        generated.append(token)
        # Decode the whole continuation each time: a character may span several byte-fallback tokens.
        text = tokenizer.decode(prompt_ids + generated)[len(tokenizer.decode(prompt_ids)):]
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    text = tokenizer.decode(prompt_ids + generated)[len(tokenizer.decode(prompt_ids)):]
    sys.stdout.write(text[len(printed):] + "\n")
    return 0
