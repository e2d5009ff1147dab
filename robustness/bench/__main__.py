"""Run every benchmark module (or those named on the command line) and print its rows as a table."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback

import torch

import robustness.bench as bench_package
from robustness.reporting.base import markdown_table


def main(argv: list[str] | None = None) -> int:
    available = sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__) if not m.name.startswith("_"))
    parser = argparse.ArgumentParser(prog="python -m robustness.bench", description=__doc__)
    parser.add_argument("modules", nargs="*", choices=available + [[]], help=f"subset to run (default: all of {', '.join(available)})")
    args = parser.parse_args(argv)
    device = "cuda (" + torch.cuda.get_device_name() + ")" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# robustness benchmarks on {device}, torch {torch.__version__}\n")
    failed = 0
    for name in args.modules or available:
        start = time.perf_counter()
        try:
            rows = importlib.import_module(f"robustness.bench.{name}").run()
        except Exception:  # one broken benchmark must not hide the others
            failed += 1
            print(f"## {name}: FAILED\n```\n{traceback.format_exc()}```\n", flush=True)
            continue
        print(f"## {name} ({time.perf_counter() - start:.0f} s)\n")
        print(markdown_table(rows), flush=True)
        notes = getattr(rows, "notes", [])  # a module's legend and met/missed targets, under its table
        if notes:
            print("\n".join(notes) + "\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
