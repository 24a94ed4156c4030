#!/usr/bin/env python3
"""Two `cupyflash bench` JSON reports, cell by cell: the ratio new / old of each implementation's
TFLOP/s per (dtype, head dim, seqlen, causal, pass), summarised per (pass, implementation), and
the cupyflash cells outside a band. The peers' own ratios show how much two runs differ with no
code change (another machine, another moment).

    python scripts/compare_runs.py OLD.json NEW.json [--band 0.05]
"""
import argparse
import json
import statistics


def cells(path: str) -> dict[tuple, float]:
    rows = json.load(open(path))["rows"]
    return {(r["dtype"], r["head_dim"], r["seqlen"], r["causal"], r["pass"], r["impl"]): r["tflops"]
            for r in rows if r.get("tflops")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--band", type=float, default=0.05)
    args = parser.parse_args()
    old, new = cells(args.old), cells(args.new)
    print("| pass | impl | cells | min new/old | median | max | outside the band |")
    print("|---|---|---|---|---|---|---|")
    outside = []
    for pass_ in ("fwd", "bwd"):
        for impl in sorted({k[5] for k in old}):
            keys = [k for k in old if k[4] == pass_ and k[5] == impl and k in new]
            if not keys:
                continue
            ratios = {k: new[k] / old[k] for k in keys}
            far = [k for k, r in ratios.items() if abs(r - 1) > args.band]
            outside += [(k, ratios[k]) for k in far if impl.startswith("cupyflash")]
            values = list(ratios.values())
            print(f"| {pass_} | {impl} | {len(keys)} | {min(values):.3f} | {statistics.median(values):.3f} | "
                  f"{max(values):.3f} | {len(far)} |")
    for key, ratio in outside:
        print(f"{key[5]} {key[4]} {key[0]} d{key[1]} s{key[2]} {'causal' if key[3] else 'full'}: {ratio:.3f}")


if __name__ == "__main__":
    main()
