#!/usr/bin/env python3
"""Benchmark cupyflash against naive CuPy attention and PyTorch SDPA on this GPU.

    python scripts/bench.py --quick            # float16, head_dim 64/128, seqlen 1024/4096
    python scripts/bench.py                    # the FlashAttention papers' grid (all of it)
    python scripts/bench.py --dtype bfloat16 --head-dim 128 --seqlen 2048 --seqlen 8192 --passes fwd

Writes <stem>.json, <stem>.md and one PNG per (dtype, causal) to benchmarks/results/ (or --out;
--plot FILE draws one PNG there instead), then prints the tables. All the work is in cupyflash.bench; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark this checkout, installed or not

from cupyflash import bench, environment  # noqa: E402

CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick grid (overrides the grid options)")
    parser.add_argument("--dtype", dest="dtypes", action="append", choices=bench.DTYPES,
                        help="repeatable; default: float16 and bfloat16")
    parser.add_argument("--head-dim", dest="head_dims", action="append", type=int,
                        help="repeatable; default: 64, 128, 256")
    parser.add_argument("--seqlen", dest="seqlens", action="append", type=int,
                        help="repeatable; default: 512 ... 16384")
    parser.add_argument("--causal", choices=sorted(CAUSAL), default="both")
    parser.add_argument("--passes", nargs="+", choices=bench.PASSES, default=list(bench.PASSES))
    parser.add_argument("--impls", nargs="+", choices=bench.IMPLS,
                        help="default: every implementation whose library is installed")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--stem", help="file name stem; default: bench-<gpu>-<date>")
    parser.add_argument("--commit", help="git commit to record when this copy is not a git checkout")
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument("--plot", type=Path, metavar="PNG",
                       help="one plot at this path (float16 non-causal when measured) instead of one per "
                            "(dtype, causal) in --out")
    plots.add_argument("--no-plot", dest="no_plot", action="store_true", help="no plots")
    parser.add_argument("--no-compile-times", dest="compile_times", action="store_false",
                        help="skip timing NVRTC on every default kernel (about a second each)")
    return parser


def _grid(args: argparse.Namespace) -> list[bench.BenchShape]:
    if args.quick:
        return bench.quick_grid()
    options = {"dtypes": args.dtypes, "head_dims": args.head_dims, "seqlens": args.seqlens}
    return bench.paper_grid(causal=CAUSAL[args.causal], **{k: v for k, v in options.items() if v})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = environment.record()  # printed first: a run that fails still says where it ran
    env.update({"git_commit": args.commit} if args.commit else {})
    print(environment.describe(env), flush=True)
    try:
        report = bench.run(_grid(args), passes=args.passes, impls=args.impls, runs=args.runs, warmup=args.warmup,
                           progress=lambda message: print(message, flush=True), compile_times=args.compile_times)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report["environment"].update({"git_commit": args.commit} if args.commit else {})
    stem = args.stem or bench.default_stem(report)
    paths = bench.save(report, args.out, stem)
    if not args.no_plot:
        try:
            paths += [bench.plot(report, args.plot)] if args.plot else bench.save_plots(report, args.out, stem)
        except (RuntimeError, ValueError) as error:  # no matplotlib, or nothing valid to draw: numbers are saved
            print(f"no plot: {error}", file=sys.stderr)
    print("\nsaved: " + ", ".join(str(p) for p in paths) + "\n")
    print(bench.format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
