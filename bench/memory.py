"""Memory benchmark: peak memory of a training step, and the extra memory of one merge.

Training step: a Llama built offline from a config (``MODELS``: hidden 512, 4 layers, 8 query
and 4 key/value heads, MLP 1408, vocab 8192; batch 4 x 256 tokens), causal-LM loss, AdamW, every
linear layer but ``lm_head`` targeted (``"all-linear"``), with

- XGBLoRA, the layers of one round active (``L_s = 0.25`` of the 4 blocks), and all active;
- peft LoRA r=1 and r=8 (peft's default fp32 adapters);
- full fine-tuning (every parameter, AdamW moments for all of them).

The number is the peak over 3 optimizer steps (XGBLoRA with ``kappa = 2``, so a merge, re-init
and resampling happen inside) minus the memory held just before the first step (model, adapters):
activations, gradients, optimizer state and temporaries.

Merge: one ``W [11008, 4096]`` (a 7B-class MLP layer), the extra memory of ``W += s b a^T`` by
``xf.merge_``, peft's ``merge()``, the unfused provider's in-place ``W.addr_``, a naive
``W += s * torch.outer(b, a)``, and ``merge_``'s ``max|W|`` check alone (providers as in
``bench/microbench.py``).

How it is measured. Every measurement runs in a fresh process. CPU: tracemalloc does not see
torch's allocations, so the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc maps every
block of 64 KiB or more and unmaps it when freed, so the resident set follows the live tensors)
and the peak is Linux's ``VmHWM``, reset to the current resident set through
``/proc/self/clear_refs`` right before the measured code; the result is ``VmHWM - VmRSS`` at
that point. CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus ``memory_allocated()`` before (tensors only, not the caching allocator's reserve).

    python bench/memory.py            # bench/results/memory_<device>.{json,md,png} (~2 min CPU)
    python bench/memory.py --quick    # a tiny model and a small W: memory_<device>_quick.*
    python bench/memory.py --temporaries [--json]   # computed from sizes, no run, no GPU

Backward temporaries (``--temporaries``): the peak bytes the Triton backward of one layer allocates
besides its outputs (``dx``, ``da``, ``db``, ``dbias``), for bf16 layers of a 7B-class model,
computed from the sizes the launchers allocate (``backward_temporaries``), before and after the
column sums of ``dy`` left the dx GEMM, against the layer's activation bytes (``x`` and ``y``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xgblora_fast.kernels.reduce_launch import colsum_split

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
STEPS = 3
KAPPA = 2
MODELS = {
    "full": {
        "config": {
            "vocab_size": 8192,
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
        },
        "batch": 4,
        "seq": 256,
        "merge_shape": (11008, 4096),
    },
    "quick": {
        "config": {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        },
        "batch": 2,
        "seq": 16,
        "merge_shape": (4096, 4096),
    },
}
METHODS = {
    "xgblora": "XGBLoRA (one round active, L_s=0.25)",
    "xgblora-all": "XGBLoRA (all layers active, L_s=1.0)",
    "lora-r1": "peft LoRA r=1",
    "lora-r8": "peft LoRA r=8",
    "full": "full fine-tuning",
}
MERGES = ("xgblora", "peft", "addr", "naive", "check")
CHECK_ALONE = "merge_'s max-abs check of W alone"


# ------------------------------------------------------------------------------------ meter
def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


class PeakMeter:
    """Peak memory (bytes) of the code between ``start()`` and ``peak()``, over what was held."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0

    def current(self) -> int:
        """Bytes held now: allocated tensors (CUDA) or the resident set (CPU)."""
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return _proc_status_kib("VmRSS") * 1024

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base = self.current()

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


# ------------------------------------------------------------------------------------ workers
def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """One method's training steps on the job's model; the row for the results."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import xgblora_fast as xf

    device, spec, method = job["device"], MODELS[job["size"]], job["method"]
    torch.manual_seed(0)
    config = LlamaConfig(**spec["config"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=_dtype(device))
    model.train()
    booster = None
    if method.startswith("xgblora"):
        lps = 0.25 if method == "xgblora" else 1.0
        # The gradient init (an option) is pinned: its probes make it the larger of the two
        # inits, so the figure bounds the default random init too.
        cfg = xf.XGBLoRAConfig(
            target_modules="all-linear",
            layers_per_round=lps,
            kappa=KAPPA,
            kappa_growth=1.0,
            booster_init="gradient",
        )
        booster = xf.Booster(model, cfg)
        params = booster.param_groups()
    elif method.startswith("lora"):
        import peft

        rank = int(method.removeprefix("lora-r"))
        lora = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")
        model = peft.get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if booster is not None:
        booster.attach(optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), device=device)

    meter = PeakMeter(device)
    meter.start()
    baseline = meter.base
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if booster is not None:
            booster.step(loss.item())
    peak = meter.peak()
    return {
        "kind": "training",
        "key": method,
        "method": METHODS[method],
        "device": device,
        "dtype": str(_dtype(device)).removeprefix("torch."),
        "tokens": spec["batch"] * spec["seq"],
        "trainable_params": trainable,
        "weights_mib": weights / MIB,
        "baseline_mib": baseline / MIB,
        "peak_delta_mib": peak / MIB,
    }


def merge_job(job: dict[str, Any]) -> dict[str, Any]:
    """One merge of the job's provider on a large ``W``; warmed up on a small one first."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
    import microbench_providers as mb

    from xgblora_fast.ops.checks import check_merge_args

    device, key = job["device"], job["merge"]
    dtype_name = "bf16" if device == "cuda" else "fp32"
    backend = "triton" if device == "cuda" else "torch"
    names = {
        "xgblora": mb.provider_fused(backend),
        "peft": mb.PROVIDER_PEFT_R1,
        "addr": mb.PROVIDER_UNFUSED,
        "naive": mb.PROVIDER_NAIVE,
    }

    def merge_fn(problem: mb.Problem) -> Callable[[], Any]:
        if key == "check":
            return lambda: check_merge_args(problem.weight, problem.a, problem.b, 1.0, "nearest")
        if key == "xgblora":
            return mb.fused_provider(problem, backend).merge
        if key == "peft":
            return mb.peft_provider(problem, 1, mb.PROVIDER_PEFT_R1).merge
        return (mb.unfused_provider if key == "addr" else mb.naive_provider)(problem).merge

    merge_fn(mb.make_problem(64, 64, dtype_name, device))()  # lazy initialisation, not counted
    m, k = job["shape"]
    problem = mb.make_problem(m, k, dtype_name, device)
    merge = merge_fn(problem)
    meter = PeakMeter(device)
    meter.start()
    merge()
    extra = meter.peak()
    weight = problem.weight.numel() * problem.weight.element_size()
    return {
        "kind": "merge",
        "key": key,
        "provider": CHECK_ALONE if key == "check" else names[key],
        "M": m,
        "K": k,
        "device": device,
        "dtype": dtype_name,
        "weight_mib": weight / MIB,
        "extra_mib": extra / MIB,
        "extra_over_weight": extra / weight,
    }


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh process (see the module docstring) and return its row."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory job {job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ backward temporaries
# (N tokens, K in_features, M out_features) of the --temporaries table: 7B-class attention
# projection, MLP up and down projections (Llama-3-8B: 4096 -> 14336 -> 4096).
TEMPORARY_LAYERS = ((4096, 4096), (4096, 14336), (14336, 4096))
TEMPORARY_TOKENS = (512, 2048, 4096, 16384)


def backward_temporaries(n: int, k: int, m: int, elt: int = 2) -> dict[str, Any]:
    """Peak temporary bytes of one layer's Triton backward (dx, da, db, dbias, no dropout).

    The backward runs in phases, each freeing its temporaries before the next (PyTorch's caching
    allocator reuses them), so the peak is ``v = dy.b`` (``N`` floats, alive throughout) plus
    the largest phase. Before: the dx GEMM also wrote fp32 partial rows of ``dy^T u`` and
    ``dy^T 1``, sized for the smallest row block of any config (16 rows: ``2 ceil(N/16) M``
    floats); then ``da``'s ``weighted_colsum_triton`` partials over ``x``. After: the dx GEMM's
    row-dot source ``V [M, 4]`` in the input dtype with its ``[4]`` fp32 scales; ``da``'s
    partials; then the partials of the pass over ``dy`` for ``db`` and ``dbias``.
    ``activation_bytes`` is ``x`` plus ``y`` (the size of ``dy``) in the layer's dtype.
    """
    f4 = 4
    v = n * f4
    da_partials = colsum_split(n, k)[0] * k * f4
    before = v + max(2 * -(-n // 16) * m * f4, da_partials)
    after = v + max(m * 4 * elt + 4 * f4, da_partials, 2 * colsum_split(n, m)[0] * m * f4)
    activation = n * (k + m) * elt
    return {
        "N": n,
        "K": k,
        "M": m,
        "activation_bytes": activation,
        "before_bytes": before,
        "after_bytes": after,
        "before_fraction": before / activation,
        "after_fraction": after / activation,
    }


def temporaries_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N | K -> M | activations MiB | before MiB | before % | after MiB | after % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['K']} -> {r['M']} | {r['activation_bytes'] / MIB:.1f} | "
            f"{r['before_bytes'] / MIB:.2f} | {100 * r['before_fraction']:.2f} | "
            f"{r['after_bytes'] / MIB:.2f} | {100 * r['after_fraction']:.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ outputs
def summary_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], stem: str) -> str:
    """Tables of the training peaks (ratios to XGBLoRA's) and of the merges' extra memory."""
    train = [r for r in rows if r["kind"] == "training"]
    merges = [r for r in rows if r["kind"] == "merge"]
    lines = [
        f"# Memory on {meta['device']}",
        "",
        f"{meta['date']}; torch {meta['torch']}; produced by `python bench/memory.py`; data: "
        f"`{stem}.json`, plot: `{stem}.png`. Method: {meta['method']}",
        "",
    ]
    if train:
        spec = meta["model"]
        ours = next((r for r in train if r["key"] == "xgblora"), train[0])
        lines += [
            f"## Training step: Llama {spec['config']}, batch {spec['batch']} x {spec['seq']} "
            f"tokens, {STEPS} AdamW steps, all linear layers but lm_head targeted",
            "",
            f"Peak over the steps minus what was held before the first step (weights "
            f"{train[0]['weights_mib']:.1f} MiB). XGBLoRA's trainable count is every booster; "
            "a round trains those of its active layers only.",
            "",
            f"| method | trainable params | peak extra MiB | x {ours['method']} |",
            "|---|---|---|---|",
        ]
        for r in train:
            ratio = r["peak_delta_mib"] / ours["peak_delta_mib"]
            lines.append(
                f"| {r['method']} | {r['trainable_params']:,} | {r['peak_delta_mib']:.1f} | "
                f"{ratio:.2f} |"
            )
    if merges:
        lines += [
            "",
            f"## Merge W += s b a^T: extra peak memory, W [{merges[0]['M']}, {merges[0]['K']}] "
            f"{merges[0]['dtype']} ({merges[0]['weight_mib']:.0f} MiB)",
            "",
            "| provider | extra MiB | extra / size of W |",
            "|---|---|---|",
        ]
        for r in merges:
            lines.append(
                f"| {r['provider']} | {r['extra_mib']:.2f} | {r['extra_over_weight']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar charts: training peak extra memory per method; merge extra memory per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("training step: peak extra MiB", [r for r in rows if r["kind"] == "training"], "method"),
        ("merge: extra MiB", [r for r in rows if r["kind"] == "merge"], "provider"),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, data, label) in zip(axes.flat, panels, strict=True):
        key = "peak_delta_mib" if label == "method" else "extra_mib"
        ax.barh([r[label] for r in data], [r[key] for r in data])
        ax.invert_yaxis()
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and small W")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--merges", nargs="*", choices=MERGES, default=list(MERGES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="file name suffix (default: '_quick' with --quick)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one job, as JSON
    parser.add_argument(
        "--temporaries", action="store_true", help="backward temporaries, from sizes only"
    )
    parser.add_argument("--json", action="store_true", help="--temporaries as JSON")
    args = parser.parse_args(argv)

    if args.temporaries:
        rows = [
            backward_temporaries(n, k, m) for k, m in TEMPORARY_LAYERS for n in TEMPORARY_TOKENS
        ]
        print(json.dumps(rows, indent=1) if args.json else temporaries_markdown(rows))
        return 0

    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(train_job(job) if "method" in job else merge_job(job)))
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "quick" if args.quick else "full"
    spec = MODELS[size]
    jobs = [{"device": device, "size": size, "method": m} for m in args.methods]
    jobs += [{"device": device, "merge": m, "shape": spec["merge_shape"]} for m in args.merges]
    start = time.perf_counter()
    rows = [run_worker(job) for job in tqdm(jobs, desc="memory", unit="process")]
    meta = {
        "device": device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": spec,
        "steps": STEPS,
        "method": (
            "torch.cuda.max_memory_allocated over memory_allocated before"
            if device == "cuda"
            else "VmHWM after resetting it to VmRSS (/proc/self/clear_refs), "
            "MALLOC_MMAP_THRESHOLD_=65536, one process per row"
        ),
        "seconds": time.perf_counter() - start,
    }
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    stem = f"memory_{device}{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    markdown = summary_markdown(rows, meta, stem)
    (args.out / f"{stem}.md").write_text(markdown)
    if not args.no_plots:
        plot(rows, args.out / f"{stem}.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
