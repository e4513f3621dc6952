"""Sum py-spy's collapsed stacks (``--format raw``, from ``bench/worker_ab.py spy``).

    python bench/spy_report.py FILE... [--top N]

For each file: the samples, and the frames that appear in most of them (inclusive: a frame counts
once per stack; its line numbers dropped), with the share of all samples. A ``--gil`` recording samples only the thread that
holds the interpreter lock, so its shares are of the time the lock was held (and sampled).
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


_LINE = re.compile(r":\d+\)$")


def inclusive(path: Path) -> tuple[int, collections.Counter[str]]:
    """(samples, frame -> samples whose stack holds it) of one collapsed-stacks file."""
    total, counts = 0, collections.Counter[str]()
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for frame in {_LINE.sub(")", f) for f in stack.split(";")}:  # per function, not per line
            counts[frame] += int(count)
    return total, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args()
    for path in args.files:
        total, counts = inclusive(path)
        print(f"## {path.name}: {total} samples")
        for frame, count in counts.most_common(args.top):
            print(f"{100 * count / max(total, 1):5.1f}%  {count:6d}  {frame}")
        print()


if __name__ == "__main__":
    main()
