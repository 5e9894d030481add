"""The run summary's peak resident memory per phase (Linux's VmHWM, restarted per phase)."""

import sys

import pytest
import torch

from xgblora_fast.cli.peak_memory import PhasePeaks

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's"
)
MIB = 2**20


def hold(mib: int) -> None:
    """Touch ``mib`` MiB of fresh memory, then free it."""
    block = torch.ones(mib * MIB // 4)
    assert float(block[-1]) == 1.0


def test_each_phase_keeps_its_own_peak_and_the_highest_of_its_visits():
    hold(8)  # allocator warm-up
    peaks = PhasePeaks()
    with peaks.phase("big"):
        hold(400)
    with peaks.phase("small"):
        hold(40)
    with peaks.phase("small"):  # a second, smaller visit does not lower the first's peak
        hold(10)
    peaks.enter(None)
    assert set(peaks.peaks) == {"loading", "big", "small"}
    # Restarted at each phase: the 400 MiB of "big" are not in "small"'s peak.
    assert peaks.peaks["big"] - peaks.peaks["small"] > 300
    assert peaks.peaks["small"] < peaks.peaks["big"]
    assert peaks.peaks["loading"] > 0 and peaks.current is None


def test_a_phase_returns_to_the_one_it_interrupted():
    peaks = PhasePeaks(first="training")
    hold(200)
    with peaks.phase("evaluation"):
        hold(10)
    assert peaks.current == "training"
    hold(300)  # after the evaluation, training goes on and its peak grows
    peaks.enter(None)
    assert peaks.peaks["training"] - peaks.peaks["evaluation"] > 200
