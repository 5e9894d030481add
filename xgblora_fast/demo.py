"""``make demo``: boost a stack of ``FastRank1Linear`` layers toward a teacher, with merges.

A small, self-contained XGBLoRA run on synthetic regression data (the trainer issue replaces it
with the real fine-tune): a frozen 4-layer MLP student starts from a base model; a teacher is the
same base plus a dense, full-rank change of every weight. Each round samples ``--layers`` of the
layers, trains their fresh rank-1 boosters for ``--kappa`` AdamW steps, merges them into the
weights in place, re-initialises them and resets their optimizer state. At the end the boosters
are ejected: the result is a plain ``nn.Sequential`` of ``nn.Linear`` with the same outputs.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
import torch.nn as nn
from tqdm import tqdm

import xgblora_fast as xf


def build_models(width: int, depth: int, seed: int) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    base = nn.Sequential(*layers[:-1])
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                m.weight += 0.3 * torch.randn_like(m.weight) / width**0.5
    return base, teacher


def run(args: argparse.Namespace) -> dict[str, float]:
    student, teacher = build_models(args.width, args.depth, args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    student.to(dtype)  # boosters stay fp32 (peft's layout); merges round into this dtype
    boosters = xf.inject(student, target_modules=r"\d+", alpha=args.alpha, backend=args.backend)
    names = list(boosters)
    params = [p for layer in boosters.values() for p in (layer.lora_a, layer.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    x_eval = torch.randn(1024, args.width)
    with torch.no_grad():
        y_eval = teacher(x_eval)

    def eval_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(student(x_eval.to(dtype)).float(), y_eval).item()

    start = eval_loss()
    progress = tqdm(range(args.rounds), desc="boosting rounds", unit="round")
    for _ in progress:
        active = set(rng.sample(names, args.layers))
        for name, layer in boosters.items():
            layer.active = name in active
            layer.lora_a.requires_grad_(name in active)
            layer.lora_b.requires_grad_(name in active)
        for _ in range(args.kappa):
            x = torch.randn(args.batch, args.width)
            with torch.no_grad():
                target = teacher(x)
            loss = nn.functional.mse_loss(student(x.to(dtype)).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for name in active:
            layer = boosters[name]
            layer.merge_(rounding=args.rounding)
            for p in (layer.lora_a, layer.lora_b):
                optimizer.state.pop(p, None)  # moments *and* step count: a complete reset
        progress.set_postfix(eval_mse=f"{eval_loss():.4f}")
    end = eval_loss()
    with torch.no_grad():
        before_eject = student(x_eval.to(dtype)).float()
    plain = xf.eject(student)
    with torch.no_grad():
        eject_diff = (plain(x_eval.to(dtype)).float() - before_eject).abs().max().item()
    kinds = sorted({type(m).__name__ for m in plain})
    print(f"eval MSE: start {start:.4f} -> end {end:.4f} ({end / start:.1%} of start)")
    print(f"ejected model layers: {kinds}; max |output change| from eject: {eject_diff:.2e}")
    return {"start": start, "end": end, "eject_diff": eject_diff}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="number of linear layers")
    p.add_argument("--layers", type=int, default=2, help="layers boosted per round (L_s)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--kappa", type=int, default=10, help="optimizer steps per round")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rounding", choices=["nearest", "stochastic"], default="nearest")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
