"""How ``weighted_colsum_triton`` splits its rows (pure Python, no Triton import).

The launcher (``kernels/rank1_reduce.py``), the roofline model and ``bench/memory.py`` share it,
so the fp32 partial rows they count are the ones the kernel writes.
"""

from __future__ import annotations

# Compiled kernel: 32 rows x 128 columns a tile, ~1024 programs to fill ~132 SMs several times.
BLOCK_N = 32
BLOCK_C = 128
TARGET_PROGRAMS = 1024
# Each split covers at least this many rows: two [split, C] fp32 partials (db and dbias) stay
# under 1/128 of the [N, C] bf16 input's bytes (4 split / N), and a split still streams enough
# rows to be bandwidth-bound.
MIN_ROWS_PER_SPLIT = 512


def colsum_split(
    n: int,
    c: int,
    block_n: int = BLOCK_N,
    block_c: int = BLOCK_C,
    target_programs: int = TARGET_PROGRAMS,
    min_rows: int = MIN_ROWS_PER_SPLIT,
) -> tuple[int, int]:
    """``(split, rows_per_split)`` for an ``[n, c]`` input: ``split`` programs per column block,
    each summing ``rows_per_split`` rows (a multiple of ``block_n``) into one partial row."""
    col_blocks = -(-c // block_c)
    row_blocks = max(-(-n // block_n), 1)
    split = max(1, min(row_blocks, target_programs // col_blocks, n // min_rows))
    rows_per_split = -(-row_blocks // split) * block_n
    return max(1, -(-n // rows_per_split)), rows_per_split
