"""Test set-up: the Triton kernels run on CPU tensors in the Triton interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, so it is set here, before any test module
imports ``xgblora_fast``. Tests that compile kernels ahead of time run in a subprocess without it.
"""

import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# tests/gpu need compiled kernels: bench/gpu_check.py runs them with XGBLORA_FAST_GPU_TESTS=1.
if os.environ.get("XGBLORA_FAST_GPU_TESTS") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))
ERROR_DIR = REPO / ".cache" / "max_errors"  # pytest-xdist workers hand their maxima over here

import pytest  # noqa: E402
import torch  # noqa: E402

# Largest relative error seen per (op, backend, dtype), printed at the end of the run.
MAX_ERRORS: dict[tuple[str, str, str], float] = {}


@pytest.fixture
def record_error():
    """Record a measured relative error; the terminal summary prints the maximum per key."""

    def record(op: str, backend: str, dtype: torch.dtype, err: float) -> None:
        key = (op, backend, str(dtype).removeprefix("torch."))
        MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)

    return record


def pytest_sessionstart(session):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        ERROR_DIR.mkdir(parents=True, exist_ok=True)
        for f in ERROR_DIR.glob("*.json"):
            f.unlink()


def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and MAX_ERRORS:
        rows = [[*key, err] for key, err in MAX_ERRORS.items()]
        (ERROR_DIR / f"{worker}.json").write_text(json.dumps(rows))


def pytest_terminal_summary(terminalreporter):
    merged = dict(MAX_ERRORS)
    for f in ERROR_DIR.glob("*.json"):
        for op, backend, dtype, err in json.loads(f.read_text()):
            merged[(op, backend, dtype)] = max(merged.get((op, backend, dtype), 0.0), err)
    if not merged:
        return
    terminalreporter.section("max relative error vs float64 reference")
    for (op, backend, dtype), err in sorted(merged.items()):
        terminalreporter.write_line(f"{op:<14} {backend:<7} {dtype:<9} {err:.3e}")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """Tiny BERT body and GPT-2 folders with a tokenizer (``offline_models.build_tiny_models``)."""
    from helpers.offline_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """A toy sentiment CSV (``offline_models.write_sentiment_csv``)."""
    from helpers.offline_models import write_sentiment_csv

    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "train.csv")
