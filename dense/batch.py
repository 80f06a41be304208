"""Batch prediction over many images with Ray Data: ``dense predict ... --engine ray``.

Ray does all the scheduling. Ray Data reads the inputs (local files and folders, or object
storage through pyarrow's filesystems, e.g. ``s3://bucket/prefix``) as bytes, and
``map_batches`` hands them to a fixed pool of long-lived actors that each load the model once.
Each actor calls the task's own ``predict_one`` (the function the serial loop calls), so the
files it writes are byte-equal to the serial command's. Every input becomes one row of
``index.jsonl`` in the output folder: input, outputs (relative to that folder), status ``ok`` or
``error``, the error, and the classes (seg) or people (pose) found. A failed image is an error
row, never a failed job; a rerun skips the inputs the index says are done whose outputs exist.

Outputs are written by the workers to ``--out`` as a local path: on a cluster of several
machines it must be a folder they all share (NFS and the like).

``ray`` is not a dependency of the app: ``pip install -r requirements-scale.txt``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

INDEX_NAME = "index.jsonl"

# Task name on the command line → the module with load_for_predict / predict_options /
# predict_one (the engine-agnostic adapter: every task speaks the same three functions).
TASK_MODULES = {"seg": "dense.tasks.segmentation", "pose": "dense.tasks.group_pose",
                "sr": "dense.tasks.restoration", "deblur": "dense.tasks.restoration"}
# Reads wait on storage, not on a core, and ask for none: asking even a fraction deadlocks a
# machine whose CPUs all went to model workers (2 on 2 CPUs: the actors hold both).
READ_CPUS = 0


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--engine`` and the Ray flags, shared by the four predict commands."""
    g = p.add_argument_group("batch engine")
    g.add_argument("--engine", choices=("serial", "ray"), default="serial",
                   help="serial: one image after another in this process (default); ray: Ray "
                        "Data over a pool of workers, with an index.jsonl and resumable reruns "
                        "(pip install -r requirements-scale.txt)")
    g.add_argument("--address", default=None,
                   help="ray: the cluster to join (e.g. ray://host:10001 or auto); default: "
                        "start a local one")
    g.add_argument("--workers", type=int, default=1,
                   help="ray: model workers, each loading the model once (default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="ray: GPUs per worker (fractions share one GPU; default 0: CPU)")
    g.add_argument("--batch-size", type=int, default=4,
                   help="ray: images handed to a worker at a time (default 4)")


def import_ray() -> ModuleType:
    """``ray`` (with Ray Data), or a SystemExit that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as err:
        raise SystemExit(f"error: --engine ray needs Ray Data ({err}); "
                         "pip install -r requirements-scale.txt") from None
    return ray


# ---------------------------------------------------------------------------------------------
# Inputs: local paths or URIs → files, through pyarrow's filesystems


def _filesystem(source: str) -> tuple[Any, str, str]:
    """(filesystem, path inside it, prefix that turns such a path back into the user's form)."""
    from pyarrow import fs

    if "://" in source:
        # from_uri reads credentials, region and AWS_ENDPOINT_URL from the environment once,
        # here; the filesystem object then travels (pickled) to Ray's read tasks.
        filesystem, path = fs.FileSystem.from_uri(source)
        return filesystem, path, source.split("://", 1)[0] + "://"
    return fs.LocalFileSystem(), str(Path(source).absolute()), ""


def list_inputs(sources: list[str], byte_limit: int
                ) -> tuple[dict[str, tuple[Any, list[str]]], list[dict]]:
    """The image files named by ``sources`` (files, or folders searched recursively for image
    suffixes), grouped by filesystem: {prefix: (filesystem, [paths])}; and the error rows of
    sources that do not exist or exceed the file size limit (refused before reading them)."""
    from pyarrow import fs

    from dense.images import IMAGE_SUFFIXES

    groups: dict[str, tuple[Any, list[str]]] = {}
    errors: list[dict] = []
    for source in sources:
        filesystem, path, prefix = _filesystem(source)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.Directory:
            found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
            files = sorted((f for f in found if f.type == fs.FileType.File
                            and f.path.lower().endswith(IMAGE_SUFFIXES)), key=lambda f: f.path)
        elif info.type == fs.FileType.File:
            files = [info]
        else:
            errors.append(error_row(source, f"There is no file '{source}'."))
            continue
        group = groups.setdefault(prefix, (filesystem, []))[1]
        for f in files:
            if f.size is not None and f.size > byte_limit:
                errors.append(error_row(prefix + f.path, f"'{Path(f.path).name}' is "
                                        f"{f.size / 1e6:,.1f} MB, above the "
                                        f"{byte_limit / 1e6:,.1f} MB limit (set "
                                        "DENSE_MAX_FILE_BYTES to change it)."))
            elif prefix + f.path not in group:
                group.append(f.path)
    return groups, errors


def error_row(source: str, message: str) -> dict:
    return {"input": source, "outputs": [], "status": "error", "error": message}


# ---------------------------------------------------------------------------------------------
# The index: append-only JSON lines, the last row of an input wins


def read_index(out_dir: Path) -> dict[str, dict]:
    """{input: its last row} from ``out_dir/index.jsonl`` (empty if there is none). A line cut
    short by a crash is ignored: its input simply runs again."""
    rows: dict[str, dict] = {}
    path = out_dir / INDEX_NAME
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["input"]] = row
    return rows


def is_done(row: dict | None, out_dir: Path) -> bool:
    return (row is not None and row.get("status") == "ok"
            and all((out_dir / o).is_file() for o in row.get("outputs", [])))


# ---------------------------------------------------------------------------------------------
# The worker: one per actor, the model loaded once


class Predictor:
    """Ray Data's callable class: loads the task's model in ``__init__`` (once per actor), then
    turns batches of {path, bytes} into batches of index rows (JSON strings: Arrow needs no
    schema for the tasks' differing, nested fields)."""

    def __init__(self, task: str, options: dict, out_dir: str) -> None:
        self.module = importlib.import_module(TASK_MODULES[task])
        self.model = self.module.load_for_predict(options)
        self.options = options
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for path, data, prefix in zip(batch["path"], batch["bytes"], batch["prefix"],
                                      strict=True):
            source = str(prefix) + str(path)
            try:
                row = self.module.predict_one(self.model, bytes(data), Path(path).name,
                                              self.out_dir, self.options)
            except Exception as err:  # noqa: BLE001  (one image's failure must not end the job)
                row = error_row(source, f"{type(err).__name__}: {err}")
            rows.append(json.dumps({**row, "input": source}))
        return {"row": np.array(rows, dtype=object)}


# ---------------------------------------------------------------------------------------------
# The command


def run_ray(task: str, args: argparse.Namespace) -> int:
    """``dense predict <task> ... --engine ray``: 0 when every input is done, 1 when some
    failed (their rows say why), 2 on a usage error."""
    from dense.images import file_byte_limit

    if args.workers < 1 or args.batch_size < 1 or args.gpus_per_worker < 0:
        print("error: --workers and --batch-size must be at least 1, --gpus-per-worker at "
              "least 0", file=sys.stderr)
        return 2
    ray = import_ray()
    module = importlib.import_module(TASK_MODULES[task])
    options = module.predict_options(args)
    if args.gpus_per_worker > 0 and options.get("device") in ("auto", "cpu"):
        options["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the worker's GPUs
    elif args.gpus_per_worker == 0 and options.get("device") == "auto":
        options["device"] = "cpu"  # a CPU worker must not take a GPU Ray did not give it
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    groups, errors = list_inputs(list(args.images), file_byte_limit())
    index = read_index(out_dir)
    skipped = 0
    todo: dict[str, tuple[Any, list[str]]] = {}
    for prefix, (filesystem, paths) in groups.items():
        left = [p for p in paths if not is_done(index.get(prefix + p), out_dir)]
        skipped += len(paths) - len(left)
        if left:
            todo[prefix] = (filesystem, left)
    total = sum(len(p) for _, p in todo.values())

    counts = {"ok": 0, "error": 0}
    start = time.perf_counter()
    with (out_dir / INDEX_NAME).open("a") as index_file:
        def record(row: dict) -> None:
            # One line per input as it finishes, flushed: a crash loses no finished work.
            index_file.write(json.dumps(row) + "\n")
            index_file.flush()
            counts[row["status"]] += 1
            if row["status"] != "ok":
                print(f"error: {row['input']}: {row['error']}", file=sys.stderr)

        for row in errors:
            record(row)
        if total:
            for row in _run_dataset(ray, task, options, args, todo):
                record(row)
    seconds = time.perf_counter() - start
    print(f"{counts['ok']} ok, {counts['error']} failed, {skipped} already done; "
          f"{total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.2f} images/s) "
          f"with {args.workers} worker(s); index: {out_dir / INDEX_NAME}")
    return 1 if counts["error"] else 0


def _run_dataset(ray: ModuleType, task: str, options: dict, args: argparse.Namespace,
                 todo: dict[str, tuple[Any, list[str]]]) -> Iterator[dict]:
    import pyarrow as pa

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address, log_to_driver=False)
    try:
        datasets = [
            ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True,
                                       num_cpus=READ_CPUS)
            # Ray's paths lose the scheme (s3://); the rows keep it, so the index names inputs
            # as the user did and a rerun finds them.
            .add_column("prefix", lambda t, p=prefix: pa.array([p] * len(t)),
                        batch_format="pyarrow", num_cpus=READ_CPUS)
            for prefix, (filesystem, paths) in todo.items()]
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"task": task, "options": options,
                                   "out_dir": str(args.out.absolute())},
            batch_size=args.batch_size,
            # A fixed pool of actors, each with its model loaded (concurrency=N before 2.51).
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            # One CPU each: a worker asking for every CPU would leave none for the reads.
            num_cpus=1,
            num_gpus=args.gpus_per_worker or None,
        )
        for item in ds.iter_rows():
            yield json.loads(item["row"])
    finally:
        if started_here:
            ray.shutdown()
