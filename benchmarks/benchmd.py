"""What the benchmark scripts share: the machine's description and their BENCHMARKS.md section.

Each script owns the part of BENCHMARKS.md between its own start and end markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    """'AMD EPYC …, 2 cores (avx2)': the CPU model and the SIMD flags that matter for matmuls."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    name = found.group(1).strip() if found else (platform.processor() or "unknown CPU")
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", text))
    return f"{name}, {os.cpu_count()} cores ({', '.join(sorted(flags)) or 'no AVX2'})"


def write_section(section: str, start: str, end: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the section between `start` and `end` in BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(doc: str, run: Callable[[int], str], start: str, end: str, repeats: int) -> None:
    """The command line of a script whose `run(repeats)` makes its section: print it, and
    write it into BENCHMARKS.md unless --print."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--print", action="store_true", help="print only, do not write")
    args = p.parse_args()
    section = run(args.repeats)
    print(section)
    if not args.print:
        write_section(section, start, end)
