"""`dense backends`: the backend chosen for each model on this machine, measured or forced.

Beside the serving layer rather than in :mod:`dense.serve.measure`, because listing loads
models through :mod:`dense.serve.served`, which itself uses the measurement.
"""

from __future__ import annotations

import argparse
import json
import os

from dense.serve.measure import cache_path, machine_choices, machine_key, measuring
from dense.serve.served import load_served


def backends_main(args: argparse.Namespace) -> int:
    """List this machine's backend choices (after loading ``args.models``, which measures
    those not measured yet)."""
    forced = os.environ.get("DENSE_BACKEND", "auto")
    loaded = {}
    for name in args.models:
        served = load_served(name, device="cpu")
        loaded[served.config.get("id", name)] = served
    key, about = machine_key()
    rows = [e for e in machine_choices().values()
            if not args.models or e.get("model") in loaded
            or any(e.get("model", "").startswith(f"{m}-") for m in loaded)]
    if args.json:
        print(json.dumps({"machine": {**about, "key": key}, "cache": str(cache_path()),
                          "forced": None if forced == "auto" else forced,
                          "measuring": measuring(), "choices": rows}, indent=1))
        return 0
    print(f"# {about['cpu']}; flags: {about['flags']}")
    print(f"# cache: {cache_path()}")
    if forced != "auto":
        print(f"# DENSE_BACKEND={forced} forces every model's backend (nothing is measured)")
    elif not measuring():
        print("# DENSE_BACKEND_MEASURE=0: the rule of dense.serve.backends chooses")
    for model_id, served in loaded.items():
        choice = getattr(served, "choice", None)
        print(f"{model_id:28} {served.backend}" + (f"  ({choice.how})" if choice else ""))
    if rows:
        print(f"{'model':28} {'input':>9} {'thr':>3}  {'backend':14} {'how':9} timings (median)")
    for e in sorted(rows, key=lambda e: (e.get("model", ""), e.get("threads", 0))):
        times = "  ".join(f"{b} {ms:.2f} ms" for b, ms in
                          sorted(e.get("median_ms", {}).items(), key=lambda item: item[1]))
        extra = "; ".join(s for s in (", ".join(f"{b} refused" for b in e.get("failed", {})),
                                      e.get("note", "")) if s)
        size = "x".join(map(str, e.get("input", ())))
        print(f"{e.get('model', '?'):28} {size:>9} {e.get('threads', 0):>3}  "
              f"{e['backend']:14} {e['how']:9} {times}" + (f"  ({extra})" if extra else ""))
    if not rows and not loaded:
        print("nothing measured on this machine yet: `dense backends MODEL...` measures")
    return 0


def add_backends_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("backends", help="the backend chosen for each model on this "
                                               "machine, measured or forced, with its timings")
    p.add_argument("models", nargs="*", help="load these first (measuring where not cached)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=backends_main)
