"""How fast `data=files` reads corpora as users bring them, in one run: a directory of many
small files (the per-file cost: open, read, NUL probe, decode, split hash), and one large file
in one line (chunked for the held-out split). Characters/s through `sae.lm.text.documents`,
both splits together (the cache task reads each split in its own pass).

    python benchmarks/bench_text.py   # writes the Text section of BENCHMARKS.md
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

from benchmd import ROOT, cpu, main

sys.path.insert(0, str(ROOT))
from sae.lm.text import documents

START, END = "<!-- bench_text:start -->", "<!-- bench_text:end -->"


def rate(paths: list[str]) -> tuple[float, float, int]:
    """(seconds, characters/s, documents or chunks) reading both splits of `paths`."""
    t, chars, n = time.perf_counter(), 0, 0
    for split in ("train", "eval"):
        docs = documents("files", split, paths=paths)
        chars += sum(len(text) for text in docs)
        n = docs.read
    seconds = time.perf_counter() - t
    return seconds, chars / seconds, n


def run(repeats: int) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        small.mkdir()
        for i in range(5000):
            (small / f"f{i:05d}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
        big = Path(tmp) / "big.txt"
        big.write_text("".join(f"x{i} = f(x{i - 1}) + {i}; " for i in range(1, 1_000_000)))
        for name, paths in [
            ("5,000 files of ~1 KB (a directory)", [str(small)]),
            (f"one {big.stat().st_size / 1e6:.0f} MB file in one line", [str(big)]),
        ]:
            best = min((rate(paths) for _ in range(repeats)), key=lambda r: r[0])
            rows.append(f"| {name} | {best[2]:,} | {best[0]:.2f} | {best[1] / 1e6:.1f} M |")
    head = (
        f"{datetime.date.today()}, {cpu()}. Both splits read through `sae.lm.text.documents` "
        f"(best of {repeats}; files in the page cache); tokenising is not included."
    )
    table = "| corpus | documents/chunks | seconds | characters/s |\n|---|---|---|---|\n"
    return (
        f"{START}\n## Text corpora (`python benchmarks/bench_text.py`)\n\n{head}\n\n{table}"
        + "\n".join(rows)
        + f"\n\n{END}\n"
    )


if __name__ == "__main__":
    main(__doc__, run, START, END, repeats=3)
