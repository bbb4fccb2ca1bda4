"""`make bench`: run every benchmark and print one table (medians of several runs)."""

from __future__ import annotations

import argparse
import os
import platform
import time

from ledger.run import logs
from tests.bench import (
    bench_ceiling,
    bench_cluster,
    bench_counters,
    bench_gateway,
    bench_lag,
    bench_replay,
    bench_store,
)

BENCHES = {
    "store": bench_store.main,
    "counters": bench_counters.main,
    "gateway": bench_gateway.main,
    "replay": bench_replay.main,
    "lag": bench_lag.main,
    "ceiling": bench_ceiling.main,
    "cluster": bench_cluster.main,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHES, []], help="benchmarks to run (default: all)")
    args = parser.parse_args()
    logs.configure("console", "warning")
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"# machine: {machine}, Python {platform.python_version()}")
    for name in names:
        started = time.perf_counter()
        print(f"\n## {name}")
        for label, value in BENCHES[name]():
            # ratios are small: three decimals, not one
            print(f"{label:70s} {value:12,.1f}" if abs(value) >= 10 else f"{label:70s} {value:12.3f}")
        print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
