"""``bench/precision.py`` in a tiny configuration: files, structure, and what the study shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import precision  # noqa: E402


def test_precision_study_writes_its_results_and_kahan_beats_nearest(tmp_path):
    history = tmp_path / "history.json"  # as finetune writes it
    rounds = [{"round": 0, "relative_update": {"l0": 1e-3, "l1": 3e-3}}, {"round": 1}]
    history.write_text(json.dumps({"config": {}, "rounds": rounds}))
    result = precision.main(
        [
            "--rows",
            "32",
            "--cols",
            "64",
            "--merges",
            "5",
            "40",
            "--history",
            str(history),
            "--out",
            str(tmp_path),
        ]
    )
    for name in ("precision.json", "precision.md", "precision.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    config = result["config"]
    assert config["ratios"] == [1e-3, 3e-3] and config["ratio_source"] == str(history)
    assert json.loads((tmp_path / "precision.json").read_text())["config"] == config
    table = (tmp_path / "precision.md").read_text()
    assert "| 0.003 | kahan |" in table and "## fp16" in table
    error = {
        (r["dtype"], r["ratio"], r["method"], r["merges"]): r["error"] for r in result["summary"]
    }
    assert len(error) == 2 * 2 * len(precision.METHODS) * 2
    for dtype in ("bf16", "fp16"):
        # Nearest rounds at every merge; Kahan's error is one rounding's, as the fp32 master's,
        # so it shrinks against the growing sum of updates.
        near, kahan = error[(dtype, 3e-3, "nearest", 40)], error[(dtype, 3e-3, "kahan", 40)]
        master = error[(dtype, 3e-3, "fp32_master", 40)]
        assert kahan < 0.5 * near, (dtype, kahan, near)
        assert abs(kahan - master) < 0.1 * master, (dtype, kahan, master)
        assert kahan < error[(dtype, 3e-3, "kahan", 5)]
