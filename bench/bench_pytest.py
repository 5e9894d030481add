"""pytest-benchmark view of the microbenchmarks: the same providers and checks, small CPU shapes.

    pytest bench/bench_pytest.py --benchmark-group-by=param:case,param:operation
    pytest bench/bench_pytest.py --benchmark-disable     # every case once, as a smoke test

``bench/microbench.py`` is the reference run (providers interleaved in rounds, results and plots
written under ``bench/results``); this file points pytest-benchmark's tooling (``--benchmark-
compare``, ``--benchmark-histogram``, ``--benchmark-json``) at the same code on the ``--quick``
shapes, fp32 on CPU. Every provider is checked against the float64 reference before it is timed.
"""

from __future__ import annotations

import microbench_providers as mb
import pytest
from microbench import QUICK_SHAPES

CASES = [(s.m, s.k, n) for s in QUICK_SHAPES for n in s.tokens]
LAYER_PROVIDERS = [
    mb.PROVIDER_FLOOR,
    mb.provider_fused("torch"),
    mb.PROVIDER_PEFT_R1,
    mb.PROVIDER_PEFT_R8,
    mb.PROVIDER_UNFUSED,
]
MERGE_PROVIDERS = [
    mb.PROVIDER_COPY,
    mb.provider_fused("torch"),
    mb.provider_bound_kept("torch"),
    mb.PROVIDER_PEFT_R1,
    mb.PROVIDER_UNFUSED,
    mb.PROVIDER_NAIVE,
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}x{c[1]}-N{c[2]}")
def case(request):
    """``(problem, {name: provider}, rotating inputs)`` of one shape and token count."""
    m, k, n = request.param
    problem = mb.make_problem(m, k, "fp32", "cpu")
    providers = mb.build_providers(problem, "cpu")
    providers += [p for p in mb.merge_providers(problem, providers, "cpu") if p.module is None]
    inputs = mb.make_inputs(problem, n, mb.rotation_count(problem, n))
    return problem, providers, inputs


def _provider(providers: list[mb.Provider], name: str, merge: bool) -> mb.Provider:
    return next(p for p in providers if p.name == name and (p.merge is not None or not merge))


@pytest.mark.parametrize("operation", mb.LAYER_OPS)
@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
def test_layer(benchmark, case, provider: str, operation: str) -> None:
    problem, providers, inputs = case
    chosen = _provider(providers, provider, merge=False)
    x, dy = inputs[0]
    mb.check_provider(chosen, problem, x[: mb.CHECK_ROWS_CPU], dy[: mb.CHECK_ROWS_CPU])
    benchmark(mb.op_fn(operation, chosen, inputs))


@pytest.mark.parametrize("provider", MERGE_PROVIDERS)
def test_merge(benchmark, case, provider: str) -> None:
    problem, providers, _ = case
    chosen = _provider(providers, provider, merge=True)
    mb.check_merge(chosen, problem)
    benchmark(chosen.merge)
