"""Benchmark regression check: ratios measured within one pytest-benchmark run (policy vs
full cache, kernel vs copy bandwidth, ...) against the stored baselines.

    python benchmarks/regression.py RUN.json              # check; exit 1 on a regression
    python benchmarks/regression.py RUN.json --update     # rewrite the baselines from RUN.json

Only dimensionless ``extra_info`` entries are compared (names ending in ``_ratio``,
``speedup`` or ``overhead``, or containing ``_of_``): both sides of a ratio share the machine's
load, so they travel between runs far better than absolute times on a noisy 2-core box.
Each baseline entry says which way is better (``higher``, ``lower`` or ``either``) and may
set its own ``tolerance``; a value may be worse than its baseline by the factor
1 + tolerance before the check fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

DEFAULT_BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline.json")
DEFAULT_TOLERANCE = 1.0  # twice as bad fails: same-run ratios still swing on a shared 2-core box


def is_ratio(key: str) -> bool:
    return key.endswith(("_ratio", "speedup", "overhead")) or "_of_" in key


def comparable(key: str, value: float) -> float:
    """An ``overhead`` is ``policy / plain - 1`` (near 0, may be negative): compare 1 + it."""
    return 1.0 + value if key.endswith("overhead") else value


def better_direction(key: str) -> str:
    """A guess from the name, stored in the baseline for people to correct."""
    if any(w in key for w in ("speedup", "fraction_of_", "throughput", "bandwidth")):
        return "higher"
    if any(w in key for w in ("time", "latency", "memory", "bytes", "overhead", "slowdown", "extra")):
        return "lower"
    return "either"


def measured_ratios(run: dict) -> dict[str, dict[str, float]]:
    """{benchmark fullname: {key: value}} for the ratio entries of a --benchmark-json file."""
    out = {}
    for bench in run.get("benchmarks", []):
        ratios = {k: float(v) for k, v in (bench.get("extra_info") or {}).items()
                  if is_ratio(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if ratios:
            out[bench["fullname"]] = ratios
    return out


def worse_by(value: float, base: float, better: str) -> float:
    """How many times worse ``value`` is than ``base`` (1.0 = equal or better)."""
    if value <= 0 or base <= 0:
        return 1.0 if value == base else float("inf")
    up, down = value / base, base / value
    return {"higher": down, "lower": up, "either": max(up, down)}[better]


def check(run: dict, baseline: dict) -> tuple[list[str], list[str]]:
    """(failures, notes): one line per regressed entry, and what could not be compared."""
    measured = measured_ratios(run)
    default_tol = baseline.get("tolerance", DEFAULT_TOLERANCE)
    failures, notes = [], []
    for name, entries in sorted(baseline.get("benchmarks", {}).items()):
        for key, entry in sorted(entries.items()):
            value = measured.get(name, {}).get(key)
            if value is None:
                notes.append(f"not measured in this run: {name} {key}")
                continue
            tol = entry.get("tolerance", default_tol)
            factor = worse_by(comparable(key, value), comparable(key, entry["value"]),
                              entry.get("better", "either"))
            if factor > 1 + tol:
                failures.append(
                    f"REGRESSION {name}: {key} = {value:.4g}, baseline {entry['value']:.4g} "
                    f"({entry.get('better', 'either')} is better): {factor:.2f}x worse, "
                    f"tolerance {1 + tol:.2f}x")
    for name, ratios in sorted(measured.items()):
        for key in sorted(set(ratios) - set(baseline.get("benchmarks", {}).get(name, {}))):
            notes.append(f"no baseline (run with --update to add): {name} {key}")
    return failures, notes


def updated(run: dict, baseline: dict) -> dict:
    """The baseline with every measured ratio's value replaced (directions and tolerances kept)."""
    benchmarks = {name: dict(entries) for name, entries in baseline.get("benchmarks", {}).items()}
    for name, ratios in measured_ratios(run).items():
        entries = benchmarks.setdefault(name, {})
        for key, value in ratios.items():
            old = entries.get(key, {"better": better_direction(key)})
            entries[key] = {**old, "value": round(value, 6)}
    machine = run.get("machine_info", {})
    return {"machine": f"{machine.get('machine', platform.machine())}, {os.cpu_count()} CPU cores, "
                       f"{machine.get('cpu', {}).get('brand_raw', 'unknown CPU')}",
            "date": datetime.date.today().isoformat(),
            "tolerance": baseline.get("tolerance", DEFAULT_TOLERANCE),
            "benchmarks": dict(sorted(benchmarks.items()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a pytest --benchmark-json file")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="baseline JSON (default: %(default)s)")
    p.add_argument("--update", action="store_true", help="rewrite the baseline from this run")
    args = p.parse_args(argv)
    with open(args.run) as f:
        run = json.load(f)
    baseline = {}
    if os.path.exists(args.baseline):
        with open(args.baseline) as f:
            baseline = json.load(f)
    if args.update:
        new = updated(run, baseline)
        with open(args.baseline, "w") as f:
            json.dump(new, f, indent=1)
            f.write("\n")
        count = sum(len(e) for e in new["benchmarks"].values())
        print(f"wrote {count} baseline ratios to {args.baseline}")
        return 0
    failures, notes = check(run, baseline)
    for line in notes:
        print(f"note: {line}")
    for line in failures:
        print(line, file=sys.stderr)
    compared = sum(len(e) for e in baseline.get("benchmarks", {}).values())
    print(f"benchmark regression check: {len(failures)} regression(s) in {compared} baseline ratios")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
