"""Sum py-spy's collapsed stacks (``--format raw --threads``, from ``bench/worker_ab.py spy``).

    python bench/spy_report.py FILE... [--top N]

For each file: the samples, each kind of thread's share (threads of one name together), and in
each kind that has at least 2% the functions in most of its samples (inclusive: a function counts
once per stack), as shares of all samples. A ``--gil`` recording samples only the thread that
holds the interpreter lock, so its shares are of the time the lock was held (and sampled); an
``--idle`` one every thread, waiting or not, so a function's share there is wall time.
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_THREAD = re.compile(r"^thread \((?:0x[0-9a-fA-F]+|\d+)\)(?::\s*)?")
_NUMBERED = re.compile(r"[-_]\d+$")


def _thread_kind(frame: str) -> str | None:
    """A thread's name without its id and number (``link-call-3`` -> ``link-call``), or None."""
    if not _THREAD.match(frame):
        return None
    return _NUMBERED.sub("", _THREAD.sub("", frame).strip()) or "(unnamed)"


def summed(path: Path) -> tuple[int, collections.Counter[str], dict[str, collections.Counter[str]]]:
    """(samples, thread kind -> samples, thread kind -> function -> samples whose stack holds it)."""
    total, kinds = 0, collections.Counter[str]()
    functions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        kind = next((k for k in map(_thread_kind, frames[:2]) if k), "(any)")
        n = int(count)
        total += n
        kinds[kind] += n
        for frame in {_LINE.sub(")", f) for f in frames if not _thread_kind(f) and not f.startswith("process ")}:
            functions[kind][frame] += n
    return total, kinds, functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        if not path.is_file():
            print(f"## {path}: no such file (its recording failed?)\n")
            continue
        total, kinds, functions = summed(path)
        print(f"## {path.name}: {total} samples")
        for kind, count in kinds.most_common():
            print(f"{100 * count / max(total, 1):5.1f}%  {count:6d}  thread {kind}")
        for kind, count in kinds.most_common():
            if count < 0.02 * total:
                break
            print(f"\n### thread {kind}: {100 * count / max(total, 1):.1f}%")
            for frame, n in functions[kind].most_common(args.top):
                if not frame.startswith("Thread._bootstrap") and not frame.startswith("Thread.run "):
                    print(f"{100 * n / max(total, 1):5.1f}%  {n:6d}  {frame}")
        print()


if __name__ == "__main__":
    main()
