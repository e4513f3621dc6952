"""``python -m bench report``: docs/benchmarks.md from the newest result of each benchmark.

Each benchmark writes ``bench/results/<date>-<device>-<name>.{json,md}`` (+ PNG plots); this page
puts the newest Markdown of each (GPU and CPU runs apart) under one roof, with the plots, so that
the numbers quoted in README.md can be traced to a file.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
ORDER = [("gpu", "accelshim vs the naive per-function GPU setup (`python -m bench gpu`)"),
         ("kaas", "Kernel-as-a-Service (`python -m bench kaas`)"),
         ("overhead", "Request path overhead (`python -m bench overhead`)"),
         ("load", "Load (`python -m bench load`)"),
         ("load-kill", "Load with kill -9 of the shim (`python -m bench load --kill-every S`)")]
STEM = re.compile(r"^(\d{4}-\d{2}-\d{2})-(.+)-(gpu|kaas|overhead|load|load-kill)$")


def newest(results: Path) -> dict[tuple[str, str], Path]:
    """(name, device) -> the newest Markdown result of that benchmark on that device."""
    found: dict[tuple[str, str], Path] = {}
    for md in sorted(results.glob("*.md")):
        match = STEM.match(md.stem)
        if match:
            found[(match.group(3), match.group(2))] = md  # sorted by date: the last one wins
    return found


def render(results: Path = RESULTS) -> str:
    found = newest(results)
    parts = ["# Benchmarks\n\nMade by `python -m bench report` from the newest file of each benchmark in "
             "`bench/results/` (the JSON beside each has every sample, the environment and the versions).\n"]
    notes = results / "NOTES.md"
    if notes.is_file():
        parts.append(notes.read_text(encoding="utf-8"))
    for name, title in ORDER:
        for (kind, device), md in sorted(found.items()):
            if kind != name:
                continue
            body = md.read_text(encoding="utf-8").strip()
            body = re.sub(r"^# ", "### ", body, flags=re.M)
            body = re.sub(r"^## ", "#### ", body, flags=re.M)
            parts.append(f"## {title}, {device}\n\nSource: `bench/results/{md.name}`\n\n{body}\n")
            for png in sorted(results.glob(f"{md.stem}-*.png")):
                parts.append(f"![{png.stem}](../bench/results/{png.name})\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
