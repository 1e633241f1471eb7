"""Run the benchmarks: ``python -m bench [NAME ...]``.

Every ``bench/bench_<name>.py`` module has a ``main() -> None`` that prints its
figures as ``<metric>: <number> <unit>`` lines (plus a target where an issue
names one).  Without arguments all benchmarks run in name order.
"""

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem[6:] for p in Path(__file__).parent.glob("bench_*.py"))
    failed = 0
    for name in names:
        print(f"== bench {name}", flush=True)
        start = time.monotonic()
        module = importlib.import_module(f"bench.bench_{name}")
        try:
            module.main()
        except Exception as e:  # one broken bench must not hide the others' figures
            failed += 1
            print(f"bench {name} FAILED: {e!r}", flush=True)
        print(f"== bench {name} took {time.monotonic() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
