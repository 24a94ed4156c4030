#!/usr/bin/env python3
"""The sanitizer sweep: every case of cupyflash.memory_sweep in its own process under
compute-sanitizer, so that one report cannot hide the next (a kernel that faults leaves its CUDA
context unusable).

    python scripts/sanitize.py                   # memcheck over the sweep, racecheck and synccheck over the small one
    python scripts/sanitize.py --tool memcheck --jobs 8 --log sanitize.log
    python scripts/sanitize.py --list            # the case ids
    python scripts/sanitize.py --match=-kv-      # only the cases whose id contains -kv- (decoding)
    python scripts/sanitize.py --case ID         # one case in this process (what each sanitized process runs)

First every case runs once without the sanitizer, which compiles its kernels into the disk cache
(CUPYFLASH_CACHE_DIR) and shows that the case runs at all. Any sanitizer report, or a process
that fails, fails the sweep (exit 1). The log holds every process's output, case by case; the
last lines printed are the summary table. The sanitized processes allocate without CuPy's
memory pool, so each array is its own allocation and memcheck sees an overrun of any of them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sanitize this checkout, installed or not

from cupyflash import memory_sweep  # noqa: E402

TOOLS = ("memcheck", "racecheck", "synccheck")
# memcheck and synccheck end with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK SUMMARY:
# N hazards displayed (E errors, W warnings)", where a warning is a hazard too.
ERRORS = re.compile(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard")
REPORT_EXIT = 99  # compute-sanitizer's exit code when it reported anything


def run_one(case_id: str) -> None:
    import cupy

    cupy.cuda.set_allocator(None)  # no pool: every array is its own cudaMalloc
    memory_sweep.run(memory_sweep.by_id(case_id), check=False)
    cupy.cuda.Device().synchronize()


def warm_up(case_ids: list[str]) -> list[str]:
    """Every case once, in this process, without the sanitizer: compiles the kernels."""
    failed = []
    for case_id in case_ids:
        try:
            memory_sweep.run(memory_sweep.by_id(case_id), check=False)
        except Exception as error:  # reported, and the sweep fails
            failed.append(f"{case_id}: {type(error).__name__}: {error}")
    return failed


def sanitize(sanitizer: str, tool: str, case_id: str) -> tuple[str, str, int | None, str]:
    """(tool, case, errors reported or None when the process failed otherwise, its output)."""
    command = [sanitizer, "--tool", tool, "--error-exitcode", str(REPORT_EXIT), "--print-limit", "20",
               sys.executable, str(Path(__file__).resolve()), "--case", case_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    summary = ERRORS.search(output)
    errors = int(summary.group(1) or summary.group(2)) if summary else None
    if done.returncode not in (0, REPORT_EXIT):
        errors = None  # the program itself failed: counted apart from sanitizer reports
    return tool, case_id, errors, output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=(*TOOLS, "all"), default="all")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes at once")
    parser.add_argument("--log", type=Path, help="write every process's output here")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument("--case", help="run this one case here, without the sanitizer, and exit")
    parser.add_argument("--match", default="", help="only the cases whose id contains this text (e.g. -kv- for decoding)")
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.case:
        run_one(args.case)
        return 0
    if args.list:
        ids = dict.fromkeys(c.id for c in (*memory_sweep.cases(), *memory_sweep.cases(small=True)))
        print("\n".join(i for i in ids if args.match in i))  # the sweep, then the small set's own cases
        return 0
    sanitizer = (os.environ.get("COMPUTE_SANITIZER") or shutil.which("compute-sanitizer")
                 or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None))
    if sanitizer is None:
        print("compute-sanitizer not found (set COMPUTE_SANITIZER or put it on PATH)", file=sys.stderr)
        return 2
    tools = TOOLS if args.tool == "all" else (args.tool,)
    work = [(tool, c.id) for tool in tools for c in memory_sweep.cases(small=tool != "memcheck") if args.match in c.id]
    started = time.monotonic()
    failed_warm_up = warm_up(sorted({case_id for _, case_id in work}))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda item: sanitize(sanitizer, *item), work))
    if args.log:
        with args.log.open("w") as log:
            for tool, case_id, errors, output in results:
                log.write(f"===== {tool} {case_id}: {'process failed' if errors is None else f'{errors} reports'}\n")
                log.write(output + "\n")
            log.write("\n".join(["===== warm-up failures"] + failed_warm_up) + "\n")
    return report(tools, results, failed_warm_up, time.monotonic() - started)


def report(tools: tuple[str, ...], results: list[tuple[str, str, int | None, str]], failed_warm_up: list[str],
           seconds: float) -> int:
    print(f"| tool | cases | clean | with reports | process failed |  ({seconds:.0f} s, {len(failed_warm_up)} "
          "cases failed without the sanitizer)")
    print("|---|---|---|---|---|")
    bad = []
    for tool in tools:
        mine = [r for r in results if r[0] == tool]
        reported = [r for r in mine if r[2]]
        crashed = [r for r in mine if r[2] is None]
        bad += reported + crashed
        print(f"| {tool} | {len(mine)} | {len(mine) - len(reported) - len(crashed)} | {len(reported)} | {len(crashed)} |")
    for tool, case_id, errors, _ in bad:
        print(f"  {tool} {case_id}: {'process failed' if errors is None else f'{errors} reports'}")
    for line in failed_warm_up:
        print(f"  warm-up {line}")
    return 1 if bad or failed_warm_up else 0


if __name__ == "__main__":
    sys.exit(main())
