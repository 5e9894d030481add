"""``bench/gpu_check.py`` without a GPU: arguments, the clear refusal, steps, the summary parser.

The parser is checked on ``tests/data/gpu_check_sample/``: synthetic H100-like numbers in the
exact formats the steps write (``bench/microbench.py``'s and ``bench/memory.py``'s JSON, pytest's
junit XML), not a measurement.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
SAMPLE = REPO / "tests" / "data" / "gpu_check_sample"
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

JUNIT_MIXED = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">\
<testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="0.042">\
<testcase classname="tests.gpu.test_gpu_kernels" name="test_ok" time="0.000" />\
<testcase classname="tests.gpu.test_gpu_kernels" name="test_fail[triton]" time="0.001">\
<failure message="assert 1 == 2">E   assert 1 == 2</failure></testcase>\
<testcase classname="tests.gpu.test_gpu_kernels" name="test_skip[cuda]" time="0.000">\
<skipped type="pytest.skip" message="no CUDA toolkit">tests/gpu/conftest.py:40: no CUDA toolkit\
</skipped></testcase>\
<testcase classname="tests.gpu.test_gpu_compile" name="test_err" time="0.000">\
<error message="failed on setup with &quot;RuntimeError: boom&quot;">E   RuntimeError: boom\
</error></testcase></testsuite></testsuites>"""


# ---- arguments and steps ----------------------------------------------------------------------


def test_defaults_flags_and_the_output_folder_variable(monkeypatch):
    monkeypatch.delenv(gpu_check.OUT_ENV, raising=False)
    args = gpu_check.parse_args([])
    assert re.fullmatch(r"gpu_check_\d{8}-\d{6}", str(args.out))
    assert (
        args.timeout_s == gpu_check.DEFAULT_TIMEOUT_S == 450
        and not args.skip_tests
        and not args.skip_bench
    )
    monkeypatch.setenv(gpu_check.OUT_ENV, "/tmp/figures")
    assert gpu_check.parse_args([]).out == Path("/tmp/figures")
    args = gpu_check.parse_args(["--out", "o", "--skip-tests", "--skip-bench", "--timeout-s", "60"])
    assert (args.out, args.skip_tests, args.skip_bench, args.timeout_s) == (
        Path("o"),
        True,
        True,
        60,
    )


@pytest.mark.parametrize("argv", [["--timeout-s", "0"], ["--timeout-s", "soon"], ["--fast"]])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_needs_no_gpu():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for flag in ("--out", "--skip-tests", "--skip-bench", "--timeout-s", gpu_check.OUT_ENV):
        assert flag in proc.stdout


def test_refuses_clearly_without_a_gpu(tmp_path):
    """Exit status 2, one line on stderr, nothing written (CUDA hidden, also on a GPU machine)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check: no CUDA device (torch.cuda.is_available() is False")
    assert "needs a CUDA GPU" in lines[0]
    assert proc.stdout == "" and not out.exists()


def test_planned_steps_follow_the_skip_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "build_skip_reason", lambda: None)
    plan = dict(gpu_check.planned_steps(gpu_check.parse_args([]), tmp_path))
    assert list(plan) == ["build-cuda", "gpu-tests", "paths", "microbench", "memory"]
    assert plan["paths"][1:] == [
        str(REPO / "bench" / "gpu_check.py"),
        "--paths-step",
        "--out",
        str(tmp_path),
    ]
    assert plan["build-cuda"][-1] == "build"
    assert plan["gpu-tests"][1:6] == ["-m", "pytest", "tests/gpu", "-m", "gpu"]
    assert f"--junitxml={tmp_path / gpu_check.JUNIT_XML}" in plan["gpu-tests"]
    bench = REPO / "bench"
    out = ["--out", str(tmp_path)]
    assert plan["microbench"][1:] == [
        str(bench / "microbench.py"),
        *gpu_check.MICROBENCH_ARGS,
        *out,
    ]
    assert plan["memory"][1:] == [str(bench / "memory.py"), "--device", "cuda", *out]
    plan = dict(gpu_check.planned_steps(gpu_check.parse_args(["--skip-bench"]), tmp_path))
    assert plan["microbench"] == plan["memory"] == plan["paths"] == "--skip-bench"
    assert isinstance(plan["build-cuda"], list)  # the tests still need the extension
    plan = dict(gpu_check.planned_steps(gpu_check.parse_args(["--skip-tests"]), tmp_path))
    assert plan["gpu-tests"] == "--skip-tests" and isinstance(plan["build-cuda"], list)
    argv = ["--skip-tests", "--skip-bench"]
    plan = dict(gpu_check.planned_steps(gpu_check.parse_args(argv), tmp_path))
    assert all(isinstance(reason, str) for reason in plan.values())


def test_step_environment_runs_compiled_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("XGBLORA_FAST_GPU_TESTS", raising=False)
    env = gpu_check.child_env(gpu_tests=True)
    assert "TRITON_INTERPRET" not in env and env["XGBLORA_FAST_GPU_TESTS"] == "1"
    assert "XGBLORA_FAST_GPU_TESTS" not in gpu_check.child_env()
    assert gpu_check.child_env(no_jit=True)["XGBLORA_FAST_JIT_CUDA"] == "0"


def test_run_step_logs_and_stops_a_step_at_its_limit(tmp_path):
    env = gpu_check.child_env()
    done = gpu_check.run_step("hello", [sys.executable, "-c", "print('hi')"], tmp_path, 60, env)
    assert (done["status"], done["detail"]) == ("ok", "exit status 0")
    assert (tmp_path / "hello.log").read_text().splitlines()[-1] == "hi"
    failed = gpu_check.run_step("bad", [sys.executable, "-c", "exit(3)"], tmp_path, 60, env)
    assert (failed["status"], failed["detail"]) == ("failed", "exit status 3")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    slow = gpu_check.run_step("slow", sleeper, tmp_path, 1, env)
    assert slow["status"] == "timeout" and slow["seconds"] < 30


def _fake_machine(monkeypatch) -> None:
    """A GPU machine whose steps copy the recorded sample's files into the output folder."""
    monkeypatch.delenv(
        "TRITON_INTERPRET", raising=False
    )  # main() pops it; restored for the next tests
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(
        gpu_check, "environment", lambda: json.loads((SAMPLE / gpu_check.ENV_JSON).read_text())
    )
    monkeypatch.setattr(
        gpu_check,
        "measure_ceilings",
        lambda: json.loads((SAMPLE / gpu_check.CEILINGS_JSON).read_text()),
    )
    copy = [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"]

    def plan(args, out_dir):
        files = {
            "gpu-tests": gpu_check.JUNIT_XML,
            "microbench": gpu_check.MICROBENCH_JSON,
            "memory": gpu_check.MEMORY_JSON,
        }
        steps = [(name, [*copy, str(SAMPLE / f), str(out_dir / f)]) for name, f in files.items()]
        return [("build-cuda", "prebuilt xgblora_fast._C installed"), *steps]

    monkeypatch.setattr(gpu_check, "planned_steps", plan)


def test_main_runs_the_steps_and_prints_the_summary_last(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fake_machine(monkeypatch)
    assert gpu_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary_md = (out / gpu_check.SUMMARY_MD).read_text()
    assert printed.endswith(summary_md + "\n") and summary_md.startswith("# gpu_check: PASS")
    steps = json.loads((out / gpu_check.STEPS_JSON).read_text())
    assert [(s["name"], s["status"]) for s in steps] == [
        ("ceilings", "ok"),
        ("build-cuda", "skipped"),
        ("gpu-tests", "ok"),
        ("microbench", "ok"),
        ("memory", "ok"),
    ]
    for name in ("gpu-tests", "microbench", "memory"):
        assert (out / f"{name}.log").is_file()
    assert json.loads((out / gpu_check.SUMMARY_JSON).read_text())["ok"] is True

    # Again in the same folder with no time left: the earlier results are not summarised.
    assert gpu_check.main(["--out", str(out), "--timeout-s", "5"]) == 1
    steps = json.loads((out / gpu_check.STEPS_JSON).read_text())
    assert [s["status"] for s in steps[2:]] == ["not run"] * 3
    assert not (out / gpu_check.MICROBENCH_JSON).exists()
    assert "Microbenchmarks: no results" in capsys.readouterr().out


def test_a_failed_build_is_not_retried_by_the_later_steps(tmp_path, monkeypatch, capsys):
    _fake_machine(monkeypatch)
    show = "import os; print('JIT', os.environ.get('XGBLORA_FAST_JIT_CUDA'))"
    plan = [
        ("build-cuda", [sys.executable, "-c", "exit(1)"]),
        ("gpu-tests", [sys.executable, "-c", show]),
    ]
    monkeypatch.setattr(gpu_check, "planned_steps", lambda args, out: plan)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert (tmp_path / "gpu-tests.log").read_text().splitlines()[-1] == "JIT 0"
    assert "| build-cuda | failed |" in capsys.readouterr().out


# ---- the summary --------------------------------------------------------------------------------


def _row(rows, operation, provider, m, k, n):
    return next(
        r
        for r in rows
        if (r["operation"], r["provider"], r["M"], r["K"], r["N"]) == (operation, provider, m, k, n)
    )


def test_summary_of_the_recorded_sample():
    summary = gpu_check.summarize(SAMPLE)
    assert summary["ok"]
    assert summary["environment"]["device"] == "NVIDIA H100 80GB HBM3"
    assert [s["name"] for s in summary["steps"]] == [
        "ceilings",
        "build-cuda",
        "gpu-tests",
        "microbench",
        "memory",
    ]
    tests = summary["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (25, 0, 0, 0)
    assert tests["total"] == 25 and tests["failing"] == [] and tests["skips"] == {}

    rows = json.loads((SAMPLE / gpu_check.MICROBENCH_JSON).read_text())["rows"]
    fwd_bwd = {(e["shape"], e["N"]): e for e in summary["fwd_bwd"]}
    assert sorted(fwd_bwd) == [
        ("11008x4096", 2048),
        ("11008x4096", 16384),
        ("4096x4096", 2048),
        ("4096x4096", 16384),
    ]
    e = fwd_bwd["11008x4096", 16384]
    ours = _row(rows, "forward+backward", "xgblora-fast[triton]", 11008, 4096, 16384)
    peft = _row(rows, "forward+backward", "peft LoRA r=1", 11008, 4096, 16384)
    floor = _row(rows, "forward+backward", "nn.Linear (frozen)", 11008, 4096, 16384)
    assert e["triton_vs_cublas"] == ours["ratio_to_floor"]
    assert e["peft_vs_cublas"] == peft["ratio_to_floor"]
    assert e["peft_over_triton"] == pytest.approx(peft["p50_ms"] / ours["p50_ms"])
    assert e["floor_ms"] == floor["p50_ms"]
    assert 1.0 < e["triton_vs_cublas"] < e["cuda_vs_cublas"] < e["peft_vs_cublas"]

    assert summary["merge_copy_gbps"] == 2905.3  # the microbenchmark run's own copy ceiling
    merges = {e["shape"]: e for e in summary["merge"]}
    assert sorted(merges) == ["11008x4096", "4096x4096"]
    merge = _row(rows, "merge", "xgblora-fast[cuda]", 4096, 4096, 0)
    assert merges["4096x4096"]["cuda_pct_of_copy"] == pytest.approx(100 * merge["gbps"] / 2905.3)

    training = {r["method"]: r for r in summary["memory"]["training"]}
    assert training["full fine-tuning"]["over_xgblora"] == pytest.approx(421.5 / 212.4)
    merge_memory = {r["provider"]: r for r in summary["memory"]["merge"]}
    assert merge_memory["xgblora-fast[triton]"]["extra_mib"] < 1.0

    text = gpu_check.render_summary(summary)
    assert text.startswith("# gpu_check: PASS\n")
    assert "NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB), driver 580.82.07" in text
    assert "Ceilings: copy 2912 GB/s, bf16 GEMM 698 TFLOP/s" in text
    assert "GPU tests: 25 passed, 0 failed, 0 errors, 0 skipped" in text
    fwd_bwd_line = next(line for line in text.splitlines() if line.startswith("| 11008x4096 | 16"))
    assert f"| {e['triton_vs_cublas']:.3f} |" in fwd_bwd_line
    assert f"| {e['peft_over_triton']:.2f}x |" in fwd_bwd_line
    pct = merges["4096x4096"]["triton_pct_of_copy"]
    assert 85 < pct < 100 and f"| {pct:.0f}% |" in text
    assert "| full fine-tuning | 421.5 | 1.98 |" in text


def test_summary_without_results_says_so(tmp_path):
    summary = gpu_check.summarize(tmp_path)
    assert not summary["ok"]  # no steps ran
    text = gpu_check.render_summary(summary)
    assert text.startswith("# gpu_check: FAIL\n")
    for what in ("GPU tests", "Microbenchmarks", "Memory benchmark"):
        assert f"{what}: no results" in text


def test_failures_errors_skips_and_failed_steps_are_reported(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(SAMPLE, out)
    (out / gpu_check.JUNIT_XML).write_text(JUNIT_MIXED)
    summary = gpu_check.summarize(out)
    tests = summary["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (1, 1, 1, 1)
    assert tests["failing"] == [
        "tests.gpu.test_gpu_kernels::test_fail[triton]",
        "tests.gpu.test_gpu_compile::test_err",
    ]
    assert tests["skips"] == {"no CUDA toolkit": 1}
    assert not summary["ok"]
    text = gpu_check.render_summary(summary)
    assert "- FAILED tests.gpu.test_gpu_kernels::test_fail[triton]" in text
    assert "- skipped 1: no CUDA toolkit" in text

    (out / gpu_check.JUNIT_XML).unlink()
    steps = json.loads((out / gpu_check.STEPS_JSON).read_text())
    steps[2] = gpu_check.step_record("gpu-tests", "skipped", "--skip-tests")
    (out / gpu_check.STEPS_JSON).write_text(json.dumps(steps))
    assert gpu_check.summarize(out)["ok"]  # skipped on request: not a failure
    steps[4] = gpu_check.step_record("memory", "timeout", "killed after 180 s", 180.0)
    (out / gpu_check.STEPS_JSON).write_text(json.dumps(steps))
    summary = gpu_check.summarize(out)
    assert not summary["ok"]
    assert "| memory | timeout | 180 | killed after 180 s |" in gpu_check.render_summary(summary)


def test_a_test_run_that_passed_nothing_fails_the_summary(tmp_path):
    """E.g. every GPU test skipped because the kernels were interpreted: no validation."""
    out = tmp_path / "run"
    shutil.copytree(SAMPLE, out)
    skipped = (
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        '<testsuite name="pytest" errors="0" failures="0" skipped="1" tests="1" time="0.1">'
        '<testcase classname="tests.gpu.test_gpu_kernels" name="test_x" time="0.000">'
        '<skipped type="pytest.skip" message="interpreted">interpreted</skipped></testcase>'
        "</testsuite></testsuites>"
    )
    (out / gpu_check.JUNIT_XML).write_text(skipped)
    summary = gpu_check.summarize(out)
    assert summary["tests"]["skipped"] == summary["tests"]["total"] == 1
    assert not summary["ok"]


def test_truncated_junit_counts_as_no_results(tmp_path):
    (tmp_path / gpu_check.JUNIT_XML).write_text(JUNIT_MIXED[:300])
    assert gpu_check.junit_counts(tmp_path / gpu_check.JUNIT_XML) is None


def test_sample_and_parser_match_what_the_benchmarks_write():
    """Column names, meta keys and provider names are those of bench/microbench.py, memory.py."""
    import memory
    import microbench_providers as mb
    from timing import COLUMNS

    data = json.loads((SAMPLE / gpu_check.MICROBENCH_JSON).read_text())
    assert all(tuple(r) == COLUMNS for r in data["rows"])
    assert set(data["meta"]) == {
        "device",
        "device_name",
        "cpu_count",
        "threads",
        "torch",
        "xgblora_fast",
        "date",
        "timer",
        "ceilings",
        "seconds",
    }
    assert set(data["meta"]["ceilings"]) == {"copy_gbps", "gemm_tflops", "copy_bytes", "gemm_n"}
    assert (gpu_check.FLOOR, gpu_check.COPY, gpu_check.PEFT_R1) == (
        mb.PROVIDER_FLOOR,
        mb.PROVIDER_COPY,
        mb.PROVIDER_PEFT_R1,
    )
    assert all(name == mb.provider_fused(b) for b, name in gpu_check.FUSED.items())
    assert gpu_check.MICROBENCH_JSON == "microbench_cuda.json"  # stem of a --shape run, no tag
    mem = json.loads((SAMPLE / gpu_check.MEMORY_JSON).read_text())
    assert {r["method"] for r in mem["rows"] if r["kind"] == "training"} == set(
        memory.METHODS.values()
    )
    assert {r["key"] for r in mem["rows"] if r["kind"] == "merge"} == set(memory.MERGES)


# ---- the paths step (fused vs cuBLAS path) ------------------------------------------------------


def test_path_timings_and_race_check_run_both_paths():
    """The paths step's code on CPU tensors through the Triton interpreter, tiny shapes."""
    calls = []

    def timer(run):
        calls.append(run)
        run()
        return 1e-3 * len(calls)

    rows = gpu_check.path_timings(
        shapes=((17, 12),), tokens=(20, 33), dtypes=("fp32",), device="cpu", timer=timer
    )
    assert [(r["operation"], r["N"]) for r in rows] == [
        ("forward", 20),
        ("backward", 20),
        ("forward", 33),
        ("backward", 33),
    ]
    assert len(calls) == 12  # nn.Linear, fused, cuBLAS path per row
    for r in rows:
        assert r["shape"] == "17x12" and r["error"] < r["tolerance"]
        assert r["fused_over_linear"] == pytest.approx(r["fused_ms"] / r["linear_ms"])
        assert r["auto"] == "fused"  # the fake timer makes fused faster than cuBLAS...
    assert (
        gpu_check.path_timings(
            shapes=((17, 12),), tokens=(16,), dtypes=("fp32",), device="cpu", timer=timer
        )[0]["auto"]
        == "cublas"
    )  # ...but decode-sized N goes to cuBLAS
    race = gpu_check.race_check(shapes=((9, 12, 17),), launches=2, dtype="fp32", device="cpu")
    assert race["launches"] == 4 and race["failures"] == []
    assert race["max_error"] < race["tolerance"]


def _paths_data(failures=()):
    row = {
        "operation": "forward",
        "shape": "4096x4096",
        "N": 16384,
        "dtype": "bf16",
        "linear_ms": 0.700,
        "fused_ms": 0.710,
        "cublas_ms": 0.830,
        "fused_over_linear": 0.710 / 0.700,
        "cublas_over_linear": 0.830 / 0.700,
        "error": 1e-3,
        "tolerance": 3e-2,
        "auto": "fused",
    }
    race = {
        "launches": 80,
        "shapes": ["16384x4096x11008", "16383x4095x4097"],
        "dtype": "bf16",
        "max_error": 2e-3,
        "tolerance": 3e-2,
        "failures": list(failures),
    }
    return {"device": "NVIDIA H100 80GB HBM3", "timings": [row], "race": race}


def test_summary_shows_the_paths_table_and_fails_on_a_race(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(SAMPLE, out)
    assert "Fused vs cuBLAS path: no results" in gpu_check.render_summary(gpu_check.summarize(out))
    (out / gpu_check.PATHS_JSON).write_text(json.dumps(_paths_data()))
    summary = gpu_check.summarize(out)
    assert summary["ok"]
    text = gpu_check.render_summary(summary)
    assert (
        "| forward | 4096x4096 | 16384 | bf16 | 0.700 | 0.710 | 0.830 | 1.014 | 1.186 | fused |"
        in text
    )
    assert "Race check: 80 fused launches" in text and "PASS" in text
    bad = [{"shape": "16384x4096x11008", "op": "backward", "launch": 7, "error": 0.5}]
    (out / gpu_check.PATHS_JSON).write_text(json.dumps(_paths_data(bad)))
    summary = gpu_check.summarize(out)
    assert not summary["ok"]
    assert "FAIL, 1 mismatches" in gpu_check.render_summary(summary)
