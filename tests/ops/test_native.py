"""The CUDA C++ fallback (``csrc/``), checked on a machine without a GPU.

Two builds, cached under ``.cache/native/`` (ninja redoes only what changed):

- the CUDA extension, compiled in a subprocess with nvcc for sm_80 and sm_90 and imported in a
  fresh process: its ops are registered and refuse CPU tensors with a clear error (the process
  survives), the Python side is wired to them, and ``cuobjdump`` reports every
  kernel for both architectures with registers and no spills (and, in the SASS, 16-byte
  accesses on the vectorised paths and no FMA contraction in the merge);
- the host build of ``csrc/rank1_common.h`` (``csrc/host_test.cpp``), which runs the very
  per-thread bodies of the kernels over CPU tensors: the merge is bit-identical to the PyTorch
  reference and to the Triton merge (interpreter) for the same seed, and the rank-1 epilogue,
  the column reductions and the row dots match a float64 reference.

Without a CUDA toolkit the extension build fails the run; ``XGBLORA_FAST_SKIP_CUDA_BUILD=1``
skips it instead (the host tests still run).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers.kernel_checks import bits_of, compensation_like, rel_err

import xgblora_fast as xf
from xgblora_fast.ops import _native, reference

REPO = pathlib.Path(__file__).resolve().parents[2]
NATIVE_CACHE = REPO / ".cache" / "native"
ARCHS = ("80", "90")
KERNELS = {  # kernel -> instantiations per architecture
    # {fp32: nearest, kahan; fp16, bf16: nearest, stochastic, kahan} x {16-byte, scalar}
    "merge_kernel": 16,
    "rank1_epilogue_kernel": 6,  # {fp32, fp16, bf16} x {16-byte, scalar}
    "rowdot_kernel": 6,
    "colsum_kernel": 12,  # x {with, without the plain column sum}
    "colsum_finalize_kernel": 1,
}
LOW = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *LOW]


# ---- the CUDA extension: build for sm_80 + sm_90, import, resource usage ----------------------


@pytest.fixture(scope="module")
def cuda_build():
    """``(library path, build seconds)`` of the extension, built in a subprocess."""
    if _native.find_cuda_home() is None:
        if os.environ.get("XGBLORA_FAST_SKIP_CUDA_BUILD") == "1":
            pytest.skip("no CUDA toolkit and XGBLORA_FAST_SKIP_CUDA_BUILD=1")
        pytest.fail(
            "no CUDA toolkit (nvcc) found: set CUDA_HOME, or XGBLORA_FAST_SKIP_CUDA_BUILD=1"
        )
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-c",
        "import xgblora_fast.ops._native as n; n.main()",
        "build",
        "--arch",
        ";".join(f"{a[0]}.{a[1]}" for a in ARCHS),
        "--build-dir",
        str(NATIVE_CACHE / "cuda"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"CUDA extension build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    path = pathlib.Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), proc.stdout
    return path, seconds


# Runs in a fresh interpreter: proves the import and the errors do not crash a process, and keeps
# the extension's ops out of this one (where other tests expect the extension to be absent).
_IMPORT_PROBE = """
import json, sys, torch
import xgblora_fast as xf
from xgblora_fast.ops import _native, merge as merge_mod, rank1_linear as lin

mod = _native.load_built(sys.argv[1])
ops = torch.ops.xgblora_fast
out = {
    "OPS": list(mod.OPS),
    "registered": {name: hasattr(ops, name) for name in _native.OPS},
    "merge_schema": str(ops.cuda_merge_.default._schema),
    "python_ops_intact": all(hasattr(ops, n) for n in ("merge_", "rank1_linear_fwd")),
    "native_module": _native.native_module() is not None,
    "native_status": _native.native_status(),
}

def err(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None

x, w, dy = torch.randn(4, 8), torch.randn(6, 8), torch.randn(4, 6)
a, b, u = torch.randn(8), torch.randn(6), torch.randn(4)
out["errors"] = {
    "cuda_rank1_linear_fwd": err(lambda: ops.cuda_rank1_linear_fwd(x, w, None, a, b, 1.0, None)),
    "cuda_rank1_linear_bwd": err(
        lambda: ops.cuda_rank1_linear_bwd(dy, x, w, a, b, u, 1.0, None, True, True, True)
    ),
    "cuda_merge_": err(lambda: ops.cuda_merge_(w, a, b, 1.0, "stochastic", 7, None)),
    "_forward_cuda": err(lambda: lin._forward_cuda(x, w, None, a, b, 1.0, x)),
    "_backward_cuda": err(
        lambda: lin._backward_cuda(dy, x, w, a, b, u, 1.0, None, True, False, True)
    ),
    "_merge_cuda": err(lambda: merge_mod._merge_cuda(w, a, b, 1.0, "nearest", 0, None, 0)),
    "merge_backend_cuda": err(lambda: xf.merge_(w, a, b, 1.0, backend="cuda")),
    "linear_backend_cuda": err(lambda: xf.rank1_linear(x, w, None, a, b, 1.0, backend="cuda")),
    "second_copy": err(lambda: _native.load_built(sys.argv[1])),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cuda_import(cuda_build):
    """What a fresh GPU-less process sees when it imports the built extension and calls it."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(cuda_build[0])],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the import probe crashed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuobjdump() -> str:
    import triton

    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    home = _native.find_cuda_home()
    for cand in (bundled, pathlib.Path(home or "/nonexistent") / "bin" / "cuobjdump"):
        if cand.is_file():
            return str(cand)
    found = shutil.which("cuobjdump")
    if found is None:
        pytest.fail("cuobjdump not found (Triton bundles one; or the CUDA toolkit's bin/)")
    return found


def _kernel_name(mangled: str) -> str | None:
    m = re.search(r"\d+(" + "|".join(sorted(KERNELS, key=len, reverse=True)) + r")(?:I|E)", mangled)
    return m.group(1) if m else None


def resource_usage(library: pathlib.Path) -> dict[str, dict[str, dict[str, int]]]:
    """``{arch: {mangled kernel: {REG, STACK, SHARED, LOCAL, ...}}}`` from cuobjdump."""
    out = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch = function = None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function is not None and "REG:" in line:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            usage[arch][function] = {k: int(v) for k, v in fields.items()}
            function = None
    return usage


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


@pytest.mark.slow
@pytest.mark.xdist_group("native_cuda")
def test_extension_builds_for_sm80_sm90_and_imports_without_a_gpu(cuda_import):
    assert tuple(cuda_import["OPS"]) == _native.OPS
    assert all(cuda_import["registered"].values()), cuda_import["registered"]
    assert "Tensor(a!) weight" in cuda_import["merge_schema"]
    assert "str rounding" in cuda_import["merge_schema"]
    assert "Tensor(b!)? compensation" in cuda_import["merge_schema"]
    assert "int row_offset=0" in cuda_import["merge_schema"]
    # The Python custom ops of the same namespace live next to the C++ fragment.
    assert cuda_import["python_ops_intact"]
    assert cuda_import["native_module"], cuda_import["native_status"]


@pytest.mark.slow
@pytest.mark.xdist_group("native_cuda")
def test_ops_refuse_cpu_tensors_with_a_clear_error_not_a_crash(cuda_import):
    errors = cuda_import["errors"]
    for name in _native.OPS:
        assert re.fullmatch(
            rf"RuntimeError: xgblora_fast::{name}: the CUDA C\+\+ backend needs CUDA tensors, got "
            r"CPU tensors \(use backend=\"torch\" for CPU tensors, or move the tensors to a GPU\)",
            errors[name] or "",
        ), errors[name]
    # The Python wiring reaches the same ops, and the public API refuses before any kernel.
    for wired, op in (
        ("_forward_cuda", "cuda_rank1_linear_fwd"),
        ("_backward_cuda", "cuda_rank1_linear_bwd"),
        ("_merge_cuda", "cuda_merge_"),
    ):
        assert errors[wired] == errors[op]
    for api in ("merge_backend_cuda", "linear_backend_cuda"):
        assert errors[api] == "RuntimeError: backend='cuda' needs CUDA tensors, got tensors on cpu"
    assert "already registered" in errors["second_copy"]


@pytest.mark.slow
@pytest.mark.xdist_group("native_cuda")
def test_every_kernel_for_both_archs_without_spills(cuda_build):
    library, seconds = cuda_build
    usage = resource_usage(library)
    assert sorted(usage) == list(ARCHS)
    report = {"build_seconds": round(seconds, 1), "archs": {}}
    for arch in ARCHS:
        counts = dict.fromkeys(KERNELS, 0)
        for mangled, res in usage[arch].items():
            name = _kernel_name(mangled)
            assert name is not None, f"unexpected kernel {mangled}"
            counts[name] += 1
            assert res["REG"] > 0, (arch, mangled, res)
            assert res["REG"] <= 64, f"sm_{arch} {mangled}: {res['REG']} registers"
            assert res["STACK"] == 0 and res["LOCAL"] == 0, f"spills in sm_{arch} {mangled}: {res}"
        assert counts == KERNELS, (arch, counts)
        names = sorted(usage[arch])
        report["archs"][f"sm_{arch}"] = {
            pretty: usage[arch][m] for m, pretty in zip(names, _demangle(names), strict=True)
        }
    NATIVE_CACHE.mkdir(parents=True, exist_ok=True)
    (NATIVE_CACHE / "resource_usage.json").write_text(json.dumps(report, indent=1))


@pytest.mark.slow
@pytest.mark.xdist_group("native_cuda")
def test_sass_merge_has_no_fma_and_vector_paths_use_16_byte_accesses(cuda_build):
    """Bits depend on it: the merge's multiply and add must stay two roundings (no FFMA)."""
    sass = subprocess.run(
        [_cuobjdump(), "-sass", "-arch", "sm_90", str(cuda_build[0])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    seen = 0
    for body in functions:
        mangled = body.split("\n", 1)[0].strip()
        name = _kernel_name(mangled)
        vectorized = re.search(r"Li[48]E", mangled) is not None
        if name == "merge_kernel":
            seen += 1
            assert "FFMA" not in body, f"FMA contraction in {mangled}"
        if name in ("merge_kernel", "rank1_epilogue_kernel", "rowdot_kernel", "colsum_kernel"):
            assert ("LDG.E.128" in body) == vectorized, mangled
        if name in ("merge_kernel", "rank1_epilogue_kernel"):
            assert ("STG.E.128" in body) == vectorized, mangled
    assert seen == KERNELS["merge_kernel"]


# ---- loader and backend choice (no build needed) ----------------------------------------------


def test_loader_explains_why_the_extension_is_off(monkeypatch):
    monkeypatch.setenv(_native.ENV_JIT, "0")
    assert _native._jit_wanted() == (False, f"{_native.ENV_JIT}=0")
    monkeypatch.delenv(_native.ENV_JIT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    wanted, why = _native._jit_wanted()
    assert not wanted and "no CUDA device" in why
    home = _native.find_cuda_home()
    if home is not None:  # a real toolkit folder, never a wrapper script's bin/..
        assert (pathlib.Path(home) / "include" / "cuda_runtime.h").is_file()


def test_one_log_line_says_which_backend_runs_cuda_tensors_and_why(monkeypatch, caplog):
    from xgblora_fast.ops import backend as backend_mod

    cuda = torch.device("cuda")
    monkeypatch.setattr(backend_mod, "native_module", lambda: None)
    monkeypatch.setattr(backend_mod, "native_status", lambda: "xgblora_fast._C is not built")
    monkeypatch.setattr(backend_mod, "_triton_unusable_reason", lambda: "Triton is not installed")
    monkeypatch.setattr(backend_mod, "_announced", False)
    with caplog.at_level(logging.INFO, logger="xgblora_fast"):
        assert backend_mod.resolve_backend("auto", cuda) == "torch"
        assert backend_mod.resolve_backend("auto", cuda) == "torch"  # logged once per process
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "backend 'torch' active for CUDA tensors: Triton is not installed" in record.message
    assert "xgblora_fast._C is not built" in record.message

    caplog.clear()
    monkeypatch.setattr(backend_mod, "_announced", False)
    monkeypatch.setattr(backend_mod, "native_module", lambda: object())
    monkeypatch.setattr(backend_mod, "native_status", lambda: "prebuilt xgblora_fast._C")
    with caplog.at_level(logging.INFO, logger="xgblora_fast"):
        assert backend_mod.resolve_backend("auto", cuda) == "cuda"
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "backend 'cuda' active for CUDA tensors" in record.message
    assert "prebuilt xgblora_fast._C" in record.message


# ---- the host build of the shared header ------------------------------------------------------


@pytest.fixture(scope="module")
def host():
    return _native.build_host_test(NATIVE_CACHE / "host")


def on_host(fn):
    """Marks of the host-build tests: one xdist group, so the build happens once per run."""
    return pytest.mark.slow(pytest.mark.xdist_group("native_host")(fn))


@on_host
def test_counter_hash_matches_reference_including_high_index_words(host):
    idx = torch.tensor(
        [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 1]
    )
    idx = torch.cat(
        [idx, torch.randint(0, 2**62, (2000,), generator=torch.Generator().manual_seed(0))]
    )
    # Runs of 8 consecutive indices (one 16-byte pack) share the inner hash unless they cross
    # a multiple of 2^32.
    starts = torch.tensor([0, 5, 2**32 - 8, 2**32 - 7, 2**32 - 1, 2**32, 3 * 2**32 - 3, 2**40 - 2])
    runs = starts[:, None] + torch.arange(8)
    for seed in (0, 1, 7, 1234, 2**31 - 1):
        assert torch.equal(host.counter_hash(seed, idx), reference.counter_hash(seed, idx)), seed
        assert torch.equal(host.counter_hash_run8(seed, starts), reference.counter_hash(seed, runs))


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values around everything the rounding must get right for ``dtype``."""
    fi = torch.finfo(dtype)
    g = torch.Generator().manual_seed(1)
    big = torch.tensor(fi.max, dtype=torch.float32)
    sub = fi.smallest_normal * torch.rand(200, generator=g)  # subnormals of dtype
    specials = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, fi.tiny, -fi.tiny, 1e-45, -1e-45, 1.17e-38, -1.17e-38],
        dtype=torch.float32,
    )
    near_max = big * (1 - torch.rand(200, generator=g) * 4 * fi.eps)
    past_max = big * (1 + torch.rand(50, generator=g) * fi.eps / 4)  # still finite in fp32
    representable = torch.randn(200, generator=g).to(dtype).float()
    _, exponent = torch.frexp(representable)
    ulp = torch.ldexp(torch.full_like(representable, fi.eps), exponent - 1)
    ties = representable + ulp / 2  # exactly halfway: nearest-even decides
    values = torch.cat(
        [
            torch.randn(2000, generator=g),
            torch.randn(500, generator=g) * 1e-3,
            sub,
            specials,
            near_max,
            past_max,
            representable,
            ties,
            torch.nextafter(representable, torch.full_like(representable, float("inf"))),
        ]
    )
    return torch.cat([values, -values])


@on_host
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_matches_reference_on_edge_values(host, dtype):
    value = _edge_values(dtype)
    name = str(dtype).removeprefix("torch.")
    g = torch.Generator().manual_seed(2)
    finite = value.abs() <= torch.finfo(dtype).max
    nearest = host.round(value[finite], None, name)
    assert torch.equal(bits_of(nearest), bits_of(value[finite].to(dtype)))
    for bits in (
        torch.randint(0, 2**32, value.shape, generator=g),
        torch.zeros_like(value, dtype=torch.int64),
        torch.full_like(value, 2**32 - 1, dtype=torch.int64),
    ):
        got = host.round(value, bits, name)
        want = reference.round_stochastic(value, bits, dtype)
        assert torch.equal(bits_of(got), bits_of(want))
        assert torch.isfinite(got.float()).all()  # past the largest finite: to it


def _merge_case(M, K, dtype, seed, near=None):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, K, generator=g)
    a = torch.randn(K, generator=g) * 1e-2
    b = torch.randn(M, generator=g)
    if near == "max":  # just below the largest finite, updates below half an ulp
        fi = torch.finfo(dtype)
        below_max = torch.nextafter(
            torch.tensor(fi.max, dtype=dtype), torch.tensor(0.0, dtype=dtype)
        )
        weight = torch.sign(weight) * fi.max * (1 - 8 * fi.eps * torch.rand(M, K, generator=g))
        weight = weight.to(dtype).clamp(-below_max, below_max)
        a = a * float(fi.max) * fi.eps * 1e-2
    elif near == "subnormal":
        fi = torch.finfo(dtype)
        weight = (weight * fi.smallest_normal).to(dtype)
        a = a * float(fi.smallest_normal) * 10
    return weight.to(dtype), a, b


def _misaligned_copy(w: torch.Tensor) -> torch.Tensor:
    """A copy of ``w`` as a view one element into a wider buffer: rows not 16-byte aligned."""
    storage = torch.zeros(w.shape[0], w.shape[1] + 3, dtype=w.dtype)
    view = storage[:, 1 : 1 + w.shape[1]]
    view.copy_(w)
    return view


LAYOUTS = {
    "contiguous": lambda w: w.clone(),
    "transposed": lambda w: w.t().contiguous().t(),  # column-major storage, merged via a view
    "offset": _misaligned_copy,
}


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize(
    ("M", "K", "layout", "near"),
    [
        (45, 301, "contiguous", None),
        (64, 256, "contiguous", None),
        (40, 24, "transposed", None),
        (70, 33, "transposed", None),
        (13, 40, "offset", None),
        (1, 1, "contiguous", None),
        (24, 40, "contiguous", "max"),
        (24, 40, "contiguous", "subnormal"),
    ],
)
def test_merge_is_bit_identical_to_reference_and_triton(host, dtype, rounding, M, K, layout, near):
    weight, a, b = _merge_case(M, K, dtype, seed=M * K, near=near)
    kahan = rounding == "kahan"
    comp = compensation_like(weight, seed=M + K) if kahan else None
    for seed in (0, 99, 2**31 - 1):
        w_host, w_ref, w_triton = LAYOUTS[layout](weight), weight.clone(), LAYOUTS[layout](weight)
        c_host, c_ref, c_triton = (
            (LAYOUTS[layout](comp), comp.clone(), LAYOUTS[layout](comp)) if kahan else [None] * 3
        )
        vectorized = host.merge_(w_host, a, b, 0.75, rounding, seed, c_host, nthreads=37)
        reference.merge_reference_(w_ref, a, b, 0.75, rounding, seed, c_ref)
        xf.merge_(w_triton, a, b, 0.75, rounding, seed, "triton", compensation=c_triton)
        assert torch.equal(bits_of(w_host.contiguous()), bits_of(w_ref)), seed
        assert torch.equal(bits_of(w_host.contiguous()), bits_of(w_triton.contiguous())), seed
        if kahan:
            assert torch.equal(bits_of(c_host.contiguous()), bits_of(c_ref)), seed
            assert torch.equal(bits_of(c_host.contiguous()), bits_of(c_triton.contiguous())), seed
        expect_vec = (
            layout != "offset"
            and (M if layout == "transposed" else K) % (16 // weight.element_size()) == 0
        )
        assert vectorized == expect_vec
    if near is None and M * K > 1:
        assert not torch.equal(w_host.contiguous(), weight)


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_row_shard_merges_with_row_offset_are_bit_identical_to_the_full_merge(
    host, dtype, rounding, layout
):
    """Row blocks ``r0:r1`` merged alone with ``row_offset=r0`` (the FSDP case) write the bits of
    the whole-W merge, on the host build as in the reference and Triton, also with a base offset
    whose indices ``(row_offset + i) * K + j`` cross 2^32 in the middle of a row (the high index
    word)."""
    M, K = 40, 72
    weight, a, b = _merge_case(M, K, dtype, seed=21)
    kahan = rounding == "kahan"
    comp = compensation_like(weight, seed=22) if kahan else None
    base = 2**32 // K - 20  # index 2^32 is element (base + 20, 40)
    for row0 in (0, base):
        full, c_full = LAYOUTS[layout](weight), LAYOUTS[layout](comp) if kahan else None
        host.merge_(full, a, b, 0.75, rounding, 5, c_full, nthreads=37, row_offset=row0)
        w_ref, c_ref = weight.clone(), comp.clone() if kahan else None
        reference.merge_reference_(w_ref, a, b, 0.75, rounding, 5, c_ref, row0)
        w_tri, c_tri = weight.clone(), comp.clone() if kahan else None
        xf.merge_(w_tri, a, b, 0.75, rounding, 5, "triton", c_tri, row_offset=row0)
        assert torch.equal(bits_of(full.contiguous()), bits_of(w_ref))
        assert torch.equal(bits_of(full.contiguous()), bits_of(w_tri))
        if kahan:
            assert torch.equal(bits_of(c_full.contiguous()), bits_of(c_ref))
            assert torch.equal(bits_of(c_full.contiguous()), bits_of(c_tri))
        shards, c_shards = LAYOUTS[layout](weight), LAYOUTS[layout](comp) if kahan else None
        for r0, r1 in ((0, 14), (14, 27), (27, 40)):
            c = c_shards[r0:r1] if kahan else None
            host.merge_(shards[r0:r1], a, b[r0:r1], 0.75, rounding, 5, c, row_offset=row0 + r0)
        assert torch.equal(bits_of(shards.contiguous()), bits_of(full.contiguous()))
        if kahan:
            assert torch.equal(bits_of(c_shards.contiguous()), bits_of(c_full.contiguous()))


@on_host
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_merge_vector_and_scalar_paths_agree_for_any_thread_count(host, rounding):
    weight, a, b = _merge_case(32, 64, torch.bfloat16, seed=5)
    comp = compensation_like(weight, seed=6) if rounding == "kahan" else None
    results = []
    for nthreads, allow_vec in ((1, True), (7, True), (10_000, True), (3, False), (256, False)):
        w, c = weight.clone(), comp.clone() if comp is not None else None
        vectorized = host.merge_(
            w, a, b, 1.0, rounding, 11, c, nthreads=nthreads, allow_vec=allow_vec
        )
        assert vectorized is allow_vec
        results.append(torch.cat([bits_of(w), bits_of(c)]) if c is not None else bits_of(w))
    assert all(torch.equal(r, results[0]) for r in results)


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kahan_merge_with_compensation_laid_out_unlike_weight_takes_the_scalar_path(host, dtype):
    """C row-major under a column-major W (and the reverse): C's own strides, reference bits."""
    weight, a, b = _merge_case(24, 40, dtype, seed=8)
    comp = compensation_like(weight, seed=9)
    for w_layout, c_layout in (("transposed", "contiguous"), ("contiguous", "transposed")):
        w_host, c_host = LAYOUTS[w_layout](weight), LAYOUTS[c_layout](comp)
        w_ref, c_ref = weight.clone(), comp.clone()
        assert not host.merge_(w_host, a, b, 0.5, "kahan", 3, c_host, nthreads=29)
        reference.merge_reference_(w_ref, a, b, 0.5, "kahan", 3, c_ref)
        assert torch.equal(bits_of(w_host.contiguous()), bits_of(w_ref))
        assert torch.equal(bits_of(c_host.contiguous()), bits_of(c_ref))


@on_host
@pytest.mark.parametrize(
    ("start", "step", "ncols"),
    [(5, 97, 7), (3, 2**31 + 11, 4096), (2**33 + 1, 2**20 * 132, 4099), (0, 1, 1)],
)
def test_grid_stride_index_math_is_int64_exact(host, start, step, ncols):
    count = 500
    got = host.flat_index_walk(start, step, ncols, count)
    flat = [start + k * step for k in range(count)]
    want = torch.tensor([[f // ncols, f % ncols] for f in flat])
    assert torch.equal(got, want)


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("N", "M", "view", "with_bias", "accumulate"),
    [
        (5, 24, None, True, True),
        (33, 136, None, False, True),
        (9, 37, None, True, True),  # columns divisible by no pack
        (6, 40, "row-padded", True, True),  # row stride not a whole number of packs
        (7, 32, None, False, False),  # dx_adapter: s v a^T alone
    ],
)
def test_rank1_epilogue_matches_float64(
    host, record_error, dtype, N, M, view, with_bias, accumulate
):
    g = torch.Generator().manual_seed(N * M)
    y = torch.randn(N, M, generator=g).to(dtype)
    if view == "row-padded":
        y = torch.randn(N, M + 3, generator=g).to(dtype)[:, :M]
    u, b = torch.randn(N, generator=g), torch.randn(M, generator=g)
    bias = torch.randn(M, generator=g) if with_bias else None
    truth = 0.7 * u.double()[:, None] * b.double()[None, :]
    if accumulate:
        truth = truth + y.double()
    if bias is not None:
        truth = truth + bias.double()
    vectorized = host.rank1_epilogue_(y, u, b, bias, 0.7, accumulate, nthreads=29)
    assert vectorized == (view is None and M % (16 // y.element_size()) == 0)
    err = rel_err(y, truth)
    record_error("cuda_epilogue", "host", dtype, err)
    assert err < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("N", "C", "splits", "transposed"),
    [
        (1, 8, 1, False),
        (37, 64, 3, False),
        (300, 45, 7, False),
        (100, 72, 1000, False),
        (50, 48, 4, True),
    ],
)
def test_column_reductions_match_float64(host, record_error, dtype, N, C, splits, transposed):
    g = torch.Generator().manual_seed(N + C)
    x = torch.randn(N, C, generator=g).to(dtype)
    if transposed:  # unit row stride: the scalar path with strided columns
        x = x.t().contiguous().t()
    w = torch.randn(N, generator=g)
    wsum, csum, vectorized = host.colsum(x, w, 0.3, True, splits)
    assert vectorized == (not transposed and C % (16 // x.element_size()) == 0)
    err_w = rel_err(wsum, 0.3 * (x.double().t() @ w.double()))
    err_c = rel_err(csum, x.double().sum(0))
    record_error("cuda_colsum", "host", dtype, max(err_w, err_c))
    assert max(err_w, err_c) < 1e-5
    only_w, none, _ = host.colsum(x, w, 0.3, False, splits)
    assert none is None and torch.equal(only_w, wsum)


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("N", "K", "view"), [(3, 64, None), (17, 301, None), (8, 1000, None), (9, 48, "transposed")]
)
def test_row_dots_match_float64(host, record_error, dtype, N, K, view):
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(N, K, generator=g).to(dtype)
    if view == "transposed":
        x = x.t().contiguous().t()
    a = torch.randn(K, generator=g)
    u, vectorized = host.rowdot(x, a)
    assert vectorized == (view is None and K % (16 // x.element_size()) == 0)
    err = rel_err(u, x.double() @ a.double())
    record_error("cuda_rowdot", "host", dtype, err)
    assert err < 1e-5


@on_host
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_forward_and_backward_match_the_torch_path(host, dtype):
    """The C++ op's recipe (row dot, GEMM, epilogue; colsums) on the host == the torch path."""
    g = torch.Generator().manual_seed(3)
    N, K, M, s = 19, 40, 24, 0.5
    x, weight = torch.randn(N, K, generator=g).to(dtype), torch.randn(M, K, generator=g).to(dtype)
    a, b, bias = (
        torch.randn(K, generator=g),
        torch.randn(M, generator=g),
        torch.randn(M, generator=g),
    )
    dy = torch.randn(N, M, generator=g).to(dtype)
    y_ref, u_ref = reference.rank1_linear_forward_reference(x, weight, bias, a, b, s, None)
    u, _ = host.rowdot(x, a)
    y = x @ weight.t()
    host.rank1_epilogue_(y, u, b, bias, s, True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(u, u_ref.double()) < 1e-5
    assert rel_err(y, y_ref.double()) < tol
    dx_ref, da_ref, db_ref, dbias_ref, _ = reference.rank1_linear_backward_reference(
        dy, x, weight, a, b, u_ref, s, None, True, True, True
    )
    v, _ = host.rowdot(dy, b)
    dx = dy @ weight
    host.rank1_epilogue_(dx, v, a, None, s, True)
    da, _, _ = host.colsum(x, v, s, False, 3)
    db, dbias, _ = host.colsum(dy, u, s, True, 3)
    assert rel_err(dx, dx_ref.double()) < tol
    for got, want in ((da, da_ref), (db, db_ref), (dbias, dbias_ref)):
        assert rel_err(got, want.double()) < 1e-5
