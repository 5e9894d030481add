"""README.md and docs/*.md point only at things that exist.

Checked in each file, outside fenced code blocks: every relative Markdown link (``[text](path)``,
``[text](path#anchor)``, ``[text](#anchor)``) names an existing file, and an ``#anchor`` into a
.md file names one of its headings (GitHub's slug rule); every backticked repo path
(``tests/...py``, ``bench/...py``, ``xgblora_fast/...py``, package-relative ``ops/...py`` and
the like, ``docs/...md``, ``bench/results/...``) and every ``python -m xgblora_fast.<module>``
exists. No shipped file mentions ``shared/`` (users' clones do not have it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE_DIRS = ("kernels", "ops", "nn", "boosting", "integrations", "cli", "tools")

FENCED = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
REPO_PATH = re.compile(
    r"(?:tests|bench|xgblora_fast)/[\w./-]+\.py|docs/[\w./-]+\.md|bench/results/[\w./-]+"
    rf"|(?:{'|'.join(PACKAGE_DIRS)})/[\w./-]+\.py"
)
MODULE = re.compile(r"python -m (xgblora_fast(?:\.\w+)*)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link syntax reduced to its text, lower case, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's slug, repeats numbered as GitHub does (``x``, ``x-1``, ``x-2``, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCED.sub("", markdown)):
        slug = github_slug(match[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _path_exists(path: str) -> bool:
    if path.split("/")[0] in PACKAGE_DIRS:  # `ops/merge.py` names xgblora_fast/ops/merge.py
        path = f"xgblora_fast/{path}"
    return (ROOT / path).exists()


def problems(markdown: str, source: Path) -> list[str]:
    """Broken links, anchors, backticked paths and modules of ``markdown``, read as the file
    ``source`` (relative links resolve from its folder); one line per problem."""
    text = FENCED.sub("", markdown)
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (source.parent / file_part).resolve() if file_part else source
        if file_part and not linked.exists():
            found.append(f"link to a missing file: {target}")
        elif anchor and linked.suffix == ".md":
            page = markdown if linked == source else linked.read_text()
            if anchor not in anchors(page):
                found.append(f"link to a missing heading: {target}")
    for span in CODE_SPAN.findall(text):
        for path in REPO_PATH.findall(span):
            if not _path_exists(path):
                found.append(f"backticked path does not exist: {path}")
        for module in MODULE.findall(span):
            if not _module_exists(module):
                found.append(f"module does not exist: {module}")
    return found


@pytest.mark.parametrize("doc", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_links_and_paths_exist(doc: Path):
    assert problems(doc.read_text(), doc) == []


def test_no_shipped_file_mentions_a_shared_folder():
    """Code, build files, benchmarks and docs stand alone: no file cites a ``shared/`` folder."""
    shipped = [
        *DOC_FILES,
        *(ROOT / name for name in ("Makefile", "pyproject.toml", "setup.py", "MANIFEST.in")),
        *(ROOT / "xgblora_fast").rglob("*.py"),
        *(ROOT / "csrc").iterdir(),
        *(ROOT / "bench").glob("*.py"),
    ]
    assert len(shipped) > 60
    assert [str(f.relative_to(ROOT)) for f in shipped if "shared/" in f.read_text()] == []


def test_checker_reports_what_is_broken():
    source = ROOT / "docs" / "synthetic.md"
    text = "\n".join(
        [
            "# A page",
            "## Merging part of the booster (`booster_keep`)",
            "[ok](../README.md) [ok](#a-page) [ok](#merging-part-of-the-booster-booster_keep)",
            "[web](https://example.com) `tests/test_readme.py` `ops/merge.py`",
            "[gone](missing.md) [gone](../README.md#no-such-heading) [gone](#nowhere)",
            "`tests/boosting/test_nothing.py` `kernels/rank1_gemm.py`",
            "`python -m xgblora_fast.inspect` `python -m xgblora_fast.tools.kernel_report`",
            "```",
            "[in a code block](not-checked.md) `tests/not_checked.py`",
            "```",
        ]
    )
    assert problems(text, source) == [
        "link to a missing file: missing.md",
        "link to a missing heading: ../README.md#no-such-heading",
        "link to a missing heading: #nowhere",
        "backticked path does not exist: tests/boosting/test_nothing.py",
        "backticked path does not exist: kernels/rank1_gemm.py",
        "module does not exist: xgblora_fast.inspect",
    ]


def test_github_slug():
    assert github_slug("Weight decay 0.3: the default") == "weight-decay-03-the-default"
    assert github_slug("Install | Quick start") == "install--quick-start"
    assert anchors("# Tests\n## Tests\n```\n# not a heading\n```\n") == {"tests", "tests-1"}
