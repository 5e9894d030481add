"""Which path of the Triton backend runs an op: ``"fused"`` or ``"cublas"``.

- ``fused``: one Triton GEMM kernel with the rank-1 terms in its main loop and epilogue
  (``kernels/rank1_linear.py``).
- ``cublas``: the GEMMs by cuBLAS (``F.linear``/``mm``, exactly what a frozen ``nn.Linear``
  runs) plus small Triton kernels for the rank-1 parts (``kernels/rank1_linear_parts.py``):
  never more than those small passes behind ``nn.Linear``.

``backend="triton"`` runs the fused path. ``backend="auto"`` on CUDA picks per (GPU, dtype, op,
shape bucket) on first use: both paths run once on the real inputs and are timed (CUDA events);
the fused path is chosen only if it is faster *and* agrees with the cuBLAS path within the
dtype's tolerance (``AGREE_TOL``; a disagreement logs a warning with the figures and rules the
fused path out for that bucket). Decode-sized ``N <= DECODE_MAX_N`` goes to cuBLAS untimed.
``XGBLORA_FAST_PATH=fused|cublas`` forces a path for both backends.

Choices are cached in memory and on disk (``$XGBLORA_FAST_CACHE/dispatch.json``, default
``~/.cache/xgblora_fast``), keyed by GPU name, driver and package version (an entry from another
GPU, driver or version is ignored), written atomically. Under ``torch.distributed`` rank 0
decides each new bucket and broadcasts the choice, so every rank runs the same path; this is a
collective, so ranks must meet new buckets in the same order (as DDP/FSDP training steps do).
The choice is made at run time inside the op's implementation, never in traced code, so
``torch.compile(fullgraph=True)`` is unaffected.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("xgblora_fast")

PATHS = ("fused", "cublas")
PATH_ENV = "XGBLORA_FAST_PATH"
CACHE_ENV = "XGBLORA_FAST_CACHE"
CACHE_FILE = "dispatch.json"
DECODE_MAX_N = 16
TIMING_REPS = 5
# Normwise agreement (max |fused - cublas| / max |cublas|) the fused path must reach on its first
# call: a few roundings of each dtype (the two paths round the GEMM output differently).
AGREE_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# With TF32 GEMMs allowed, fp32 agreement is that of TF32's 10-bit mantissa.
AGREE_TOL_TF32 = 4e-3

Runner = Callable[[], Any]
Timer = Callable[[str, Runner], float]
Comparator = Callable[[Any, Any, torch.dtype], tuple[bool, float, float]]


def forced_path() -> str | None:
    """``$XGBLORA_FAST_PATH`` if set (validated), else None."""
    value = os.environ.get(PATH_ENV, "").strip()
    if not value:
        return None
    if value not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {PATHS}, got {value!r}")
    return value


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV, Path.home() / ".cache" / "xgblora_fast")
    return Path(root) / CACHE_FILE


def n_bucket(n: int) -> int:
    """Rows rounded up to a power of two: one decision per octave of N."""
    return 1 << max(n - 1, 0).bit_length()


def bucket_key(op: str, dtype: torch.dtype, n: int, k: int, m: int, variant: str = "") -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{op}|{dtype_name}|n{n_bucket(n)}|k{k}|m{m}|{variant}"


def _flatten(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flatten(r)]
    return []


def agreement(fused: Any, cublas: Any, dtype: torch.dtype) -> tuple[bool, float, float]:
    """``(agree, error, tolerance)``: the largest normwise relative difference over the tensors
    the two paths returned (None entries must match), against ``AGREE_TOL``."""
    tol = AGREE_TOL[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = AGREE_TOL_TF32
    fl, cl = _flatten(fused), _flatten(cublas)
    if len(fl) != len(cl):
        return False, float("inf"), tol
    err = 0.0
    for f, c in zip(fl, cl, strict=True):
        if f.shape != c.shape:
            return False, float("inf"), tol
        if c.numel() == 0:
            continue
        # fp32 on the tensors' device: exact enough for these tolerances, no float64 copy.
        f32, c32 = f.detach().float(), c.detach().float()
        diff = (f32 - c32).abs().max().item()
        ratio = diff / max(c32.abs().max().item(), 1e-30)
        err = max(err, ratio) if not math.isnan(ratio) else math.inf  # NaN: a disagreement
    agree = err <= tol
    return agree, err, tol


def cuda_event_timer(name: str, run: Runner) -> float:
    """Median seconds of ``TIMING_REPS`` runs of ``run`` (after one warm-up), by CUDA events."""
    run()
    times = []
    for _ in range(TIMING_REPS):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _driver_version() -> str:
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        first = ""
    for word in first.split():
        if word[:1].isdigit() and "." in word:
            return word
    return f"cuda-runtime-{torch.version.cuda}"


def cuda_device_info(device: torch.device) -> dict[str, str]:
    """What a cached choice is valid for: GPU name, driver and package version."""
    from xgblora_fast import __version__

    return {
        "gpu": torch.cuda.get_device_name(device),
        "driver": _driver_version(),
        "version": __version__,
    }


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class PathSelector:
    """Chooses and remembers the path per bucket; the timer, comparator and device description
    can be injected (tests run the selection on CPU with them)."""

    def __init__(
        self,
        timer: Timer = cuda_event_timer,
        comparator: Comparator = agreement,
        device_info: Callable[[torch.device], dict[str, str]] = cuda_device_info,
        cache_path: Callable[[], Path] = cache_file,
    ) -> None:
        self.timer = timer
        self.comparator = comparator
        self.device_info = device_info
        self.cache_path = cache_path
        self.decisions: dict[tuple[str, str], str] = {}
        # device_info per device, asked once: it reads the driver version from a file.
        self._infos: dict[torch.device, dict[str, str]] = {}
        self._lock = threading.Lock()

    # --- the on-disk cache -----------------------------------------------------------------
    @staticmethod
    def _device_id(info: dict[str, str]) -> str:
        return f"{info['gpu']}|{info['driver']}|{info['version']}"

    def _read_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self.cache_path().read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def cached(self, info: dict[str, str], key: str) -> str | None:
        entry = self._read_cache().get(self._device_id(info), {})
        if entry.get("device") != info:
            return None
        choice = entry.get("choices", {}).get(key, {})
        path = choice.get("path") if isinstance(choice, dict) else None
        return path if path in PATHS else None

    def store(self, info: dict[str, str], key: str, record: dict[str, Any]) -> None:
        """Merge one choice into the cache file: write a temporary file, then rename it."""
        path = self.cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read_cache()
            entry = data.setdefault(self._device_id(info), {})
            entry["device"] = info
            entry.setdefault("choices", {})[key] = record
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:  # a read-only home must not stop training
            logger.info("xgblora_fast: could not write the path cache %s: %s", path, e)

    # --- the choice ------------------------------------------------------------------------
    def measure(self, key: str, dtype: torch.dtype, runners: dict[str, Runner]) -> dict[str, Any]:
        """Run both paths once, compare, time them: the record of the choice."""
        cublas = runners["cublas"]()
        try:
            fused = runners["fused"]()
        except Exception as e:  # e.g. a kernel that does not compile on this GPU
            logger.warning(
                "xgblora_fast: the fused path failed on %s (%s: %s); using the cuBLAS path for "
                "this bucket",
                key,
                type(e).__name__,
                e,
            )
            return {"path": "cublas", "agree": False, "error": None, "failed": type(e).__name__}
        results = {"fused": fused, "cublas": cublas}
        del fused, cublas
        agree, err, tol = self.comparator(results["fused"], results["cublas"], dtype)
        del results
        times = {name: float(self.timer(name, runners[name])) for name in PATHS}
        record = {
            "fused_s": times["fused"],
            "cublas_s": times["cublas"],
            "error": err,
            "tolerance": tol,
            "agree": bool(agree),
        }
        if not agree:
            logger.warning(
                "xgblora_fast: fused path disagrees with the cuBLAS path on %s: relative error "
                "%.3e > tolerance %.1e (fused %.1f us, cublas %.1f us); using the cuBLAS path "
                "for this bucket",
                key,
                err,
                tol,
                times["fused"] * 1e6,
                times["cublas"] * 1e6,
            )
        record["path"] = "fused" if agree and times["fused"] < times["cublas"] else "cublas"
        logger.info(
            "xgblora_fast: %s -> %s (fused %.1f us, cublas %.1f us, error %.1e)",
            key,
            record["path"],
            times["fused"] * 1e6,
            times["cublas"] * 1e6,
            err,
        )
        return record

    def _decide(self, info, key, dtype, runners) -> str:
        path = self.cached(info, key)
        if path is None:
            record = self.measure(key, dtype, runners)
            self.store(info, key, record)
            path = record["path"]
        return path

    def choose(
        self,
        backend: str,
        device: torch.device,
        key: str,
        n: int,
        dtype: torch.dtype,
        runners: dict[str, Runner],
    ) -> str:
        """The path for one call. ``backend`` is what the caller asked for (``auto``/``triton``);
        ``runners`` run each path on this call's inputs (only called when timing)."""
        forced = forced_path()
        if forced is not None:
            return forced
        if backend != "auto" or device.type != "cuda":
            return "fused"
        if n <= DECODE_MAX_N:
            return "cublas"
        info = self._infos.get(device)
        if info is None:
            info = self._infos[device] = self.device_info(device)
        memo = (self._device_id(info), key)
        path = self.decisions.get(memo)
        if path is not None:
            return path
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "cublas"  # no timing inside a CUDA graph capture; decide on an eager call
        with self._lock:
            path = self.decisions.get(memo)
            if path is None:
                path = self._agreed(info, key, dtype, runners)
                self.decisions[memo] = path
        return path

    def _agreed(self, info, key, dtype, runners) -> str:
        """``_decide`` on rank 0 and broadcast, or ``_decide`` alone without a process group."""
        if not _distributed():
            return self._decide(info, key, dtype, runners)
        import torch.distributed as dist

        message = [key, self._decide(info, key, dtype, runners) if dist.get_rank() == 0 else None]
        device = None
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        dist.broadcast_object_list(message, src=0, device=device)
        their_key, path = message
        if their_key != key:
            logger.warning(
                "xgblora_fast: rank 0 decided the path of %s while this rank needed %s (ranks "
                "met new shape buckets in different orders); using the cuBLAS path here",
                their_key,
                key,
            )
            return "cublas"
        return path


SELECTOR = PathSelector()
