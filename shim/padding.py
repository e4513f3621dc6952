"""The batch sizes a GPU run pads to: few shapes, each with a warmed session (and CUDA graph)."""
from __future__ import annotations


def padded_batch(rows: int) -> int:
    """The batch size a GPU run of ``rows`` rows uses, so that batches of any size run as one of a few
    shapes, each with a warmed session (the padding rows are zeros, dropped): the next power of two,
    or three quarters of it from 6 on (1, 2, 4, 6, 8, 12, 16, 24, 32, ...): a batch runs as fewer
    than 1.5 times its rows (17 as 24, not 32), where the GPU's time grows with the rows
    (efficientnet-lite0's graph replays on the H200: 1.1 ms for 8 rows, 3.3 for 32)."""
    power = 1 << max(0, rows - 1).bit_length()
    three_quarters = power // 4 * 3
    return three_quarters if power >= 8 and rows <= three_quarters else power


def padded_sizes(rows: int) -> list[int]:
    """Every size ``padded_batch`` gives for 1 to ``rows`` rows, smallest first: what a warm-up runs."""
    top, sizes = padded_batch(rows), [1]
    while sizes[-1] < top:
        sizes.append(padded_batch(sizes[-1] + 1))
    return sizes
