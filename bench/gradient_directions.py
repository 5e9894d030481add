"""What the gradient init picks: the top singular vectors of each layer's weight gradient.

``booster_init="gradient"`` starts every round's ``a`` along ``v1``, the top right singular
vector of the layer's gradient ``G = dy^T x`` on one batch. This study measures, on the demo
model (fresh task head, as at the start of a fine-tune) and two training batches, per linear
layer:

- ``v1 top-5 share``: the fraction of ``|v1|^2`` in its 5 largest coordinates (a random unit
  vector of 384 coordinates: about 0.05). Near 1: ``a`` is almost a few input features;
- ``input max/median rms``: how far the largest input feature's RMS exceeds the typical one
  (transformers' outlier features);
- ``|Xv1| / random``: the RMS of the layer's output change along ``v1`` over that along a random
  unit direction (``|X|_F / sqrt(K)``): how much larger a step along ``v1`` is in function space;
- ``v1 batch |cos|``, ``u1 batch |cos|``: how much the input and output directions of two
  different batches agree (1: the same direction; ~0.05: unrelated).

Writes ``gradient_directions.{md,json,png}`` to ``--out`` (default ``bench/results``).

    python bench/gradient_directions.py                 # demo model, ~20 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from xgblora_fast.cli import finetune

RESULTS = Path(__file__).resolve().parent / "results"
TOP = 5  # coordinates counted in the concentration share
COLUMNS = {
    "v1_top5_share": "v1 top-5 share",
    "input_outlier_ratio": "input max/median rms",
    "output_ratio": "|Xv1| / random",
    "v1_batch_cos": "v1 batch |cos|",
    "u1_batch_cos": "u1 batch |cos|",
}


@torch.no_grad()
def direction_stats(
    gradients: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor
) -> dict[str, float]:
    """The ``COLUMNS`` of one layer.

    Args:
        gradients: the weight gradients ``[M, K]`` of two batches (any float dtype).
        inputs: the layer's inputs ``[N, K]`` in the first batch.
    """
    (u0, v0), (u1, v1) = (_top_pair(g.double()) for g in gradients)
    x = inputs.double()
    rms = x.square().mean(dim=0).sqrt()
    return {
        "v1_top5_share": float(v0.square().topk(min(TOP, v0.numel())).values.sum()),
        "input_outlier_ratio": float(rms.max() / rms.median().clamp_min(1e-300)),
        "output_ratio": float((x @ v0).norm() / (x.norm() / x.shape[1] ** 0.5)),
        "v1_batch_cos": float((v0 @ v1).abs()),
        "u1_batch_cos": float((u0 @ u1).abs()),
    }


def _top_pair(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, 0], vh[0]


def measure(cfg: finetune.FinetuneConfig) -> dict[str, dict[str, float]]:
    """``{layer: direction_stats}`` for every linear layer of the model but the fresh head."""
    train_rows, _ = finetune.load_rows(cfg)
    num_labels = len({r["label"] for r in train_rows})
    model, tokenizer, fresh = finetune.load_model(cfg, num_labels)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in fresh}
    inputs: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        layer.weight.requires_grad_(True)
        layer.register_forward_hook(
            lambda m, args, out, name=name: inputs.__setitem__(
                name, args[0].detach().reshape(-1, m.in_features)
            )
        )
    order = finetune.batch_order(len(train_rows), cfg.batch_size, 2, cfg.seed)
    gradients: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    first_inputs: dict[str, torch.Tensor] = {}
    for rows in order:
        model.zero_grad(set_to_none=True)
        enc = finetune.encode(tokenizer, [train_rows[i] for i in rows], cfg.max_length, cfg.task)
        model(**enc).loss.backward()
        for name, layer in layers.items():
            gradients[name].append(layer.weight.grad.detach().clone())
        if not first_inputs:  # the statistics of x are those of the first batch
            first_inputs = dict(inputs)
    return {n: direction_stats(tuple(gradients[n]), first_inputs[n]) for n in layers}


def write_report(stats: dict[str, dict[str, float]], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_directions.json").write_text(json.dumps({"meta": meta, "layers": stats}))
    means = {k: statistics.fmean(s[k] for s in stats.values()) for k in COLUMNS}
    lines = [
        "# Where the top singular vectors of the weight gradients point",
        "",
        f"Model: {meta['model']}, fresh task head, batches of {meta['batch_size']} (seed "
        f"{meta['seed']}). Columns: `bench/gradient_directions.py`. Produced by "
        "`python bench/gradient_directions.py`.",
        "",
        "| layer | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
        *(
            f"| {name} | " + " | ".join(f"{s[k]:.3f}" for k in COLUMNS) + " |"
            for name, s in stats.items()
        ),
        "| **mean** | " + " | ".join(f"**{means[k]:.3f}**" for k in COLUMNS) + " |",
    ]
    (out / "gradient_directions.md").write_text("\n".join(lines) + "\n")
    plot(stats, out / "gradient_directions.png")


def plot(stats: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    x = range(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.3 * len(names)), 7), sharex=True)
    axes[0].bar(x, [stats[n]["v1_top5_share"] for n in names])
    axes[0].set_ylabel(f"share of |v1|^2 in top {TOP} coords")
    axes[0].set_title("top right singular vector of each layer's weight gradient (one batch)")
    for key, label in (("v1_batch_cos", "v1 (input side, a)"), ("u1_batch_cos", "u1 (output, b)")):
        axes[1].plot(x, [stats[n][key] for n in names], "o-", label=label)
    axes[1].set_ylabel("|cos| between two batches")
    axes[1].legend(fontsize=8)
    short = [n.replace("encoder.layer.", "").replace("attention.", "") for n in names]
    axes[1].set_xticks(list(x), short, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the demo MiniLM)")
    p.add_argument("--data", default=None, help="CSV/JSONL (default: the demo reviews)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)  # the fresh head's init, as in a fine-tune with this seed
    cfg = finetune.FinetuneConfig(
        model=args.model,
        data=args.data,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    stats = measure(cfg)
    meta = {
        "model": args.model or "demo MiniLM",
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    write_report(stats, meta, args.out)
    print((args.out / "gradient_directions.md").read_text())
    return stats


if __name__ == "__main__":
    main()
