"""``python -m msif.worldfacts [--size full|tiny] [--world standard|hard] [--seed 0] [--cache-dir DIR] [--rebuild]``

Builds the bundled world if it is not cached yet and prints where it is and its summary (stats,
timings per stage, accuracies, number of test facts) as JSON.
"""

from __future__ import annotations

import argparse
import json

from msif.worldfacts.build import SIZES, WORLDS, load_world


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msif.worldfacts", description=__doc__.split("\n\n")[1])
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--world", default="standard", choices=WORLDS, help="world variant (default: standard)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="cache root (default: $MSIF_CACHE or ~/.cache/msif)")
    ap.add_argument("--rebuild", action="store_true", help="build afresh and replace the cached world")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or stage log")
    args = ap.parse_args(argv)
    w = load_world(seed=args.seed, cache_dir=args.cache_dir, progress=not args.quiet, size=args.size,
                   rebuild=args.rebuild, world=args.world)
    m = w.meta
    print(json.dumps({
        "path": str(w.path),
        "world": w.kind,
        "corpus": str(w.corpus_path),
        "facts": str(w.facts_path),
        "stats": m["stats"],
        "timings_s": {k: round(v, 1) for k, v in m["timings_s"].items()},
        "accuracy": m["accuracy"],
        "test_facts": len(m["test_facts"]),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
