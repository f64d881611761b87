"""Dataset scale: segment millions of images on a Ray cluster, resumable, with nothing lost.

Ray Data streams the work: CPU tasks read and decode images (local paths or any URI pyarrow or fsspec resolves)
and prepare the UNet's input; a pool of actors, each holding one pipeline, runs the model and writes label PNGs
(atomically, named as `diffseg segment` names them). The driver records every image in `OUTPUT/manifest.parquet`
(path, output, size, segments, status, error), rewritten atomically as results stream in, so a re-run skips what is
done and retries only what failed or was never reached. Ray restarts a killed actor and retries its batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backbones.devices import resolve_device
from ..backbones.families import read_backbone
from ..backbones.types import Backbone
from ..preflight import preflight
from ..config import DEFAULT_MODEL, EncodeConfig
from ..io.images import crop as crop_image
from ..io.images import decode_image, find_images, to_model_input
from ..io.outputs import CONCEPT_WRITERS, WRITERS, OutputFolder, atomic_path, read_labels
from ..methods.registry import METHODS, method_named, register
from ..methods.spec import Method
from .runner import Job, JobConfig, Outcome, deliver, pending

MANIFEST = "manifest.parquet"
LIST_SUFFIXES = (".txt", ".lst", ".parquet")


@dataclass
class JobSummary:
    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------------ inputs


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _names(paths: list[str]) -> list[str]:
    """Output names: each path relative to the deepest folder all share, without suffix (as for a folder input)."""
    parts = [p.replace(os.sep, "/").split("/") for p in paths]
    folders = [p[:-1] for p in parts]
    shared = 0
    while all(len(f) > shared for f in folders) and len({f[shared] for f in folders}) == 1:
        shared += 1
    return [posixpath.splitext("/".join(p[shared:]))[0] for p in parts]


def list_inputs(source: str | os.PathLike) -> list[tuple[str, str]]:
    """(path or URI, output name) pairs from a folder, a glob, or a .txt/.lst/.parquet list of paths or URIs."""
    source = str(source)
    if source.endswith(LIST_SUFFIXES) and not _is_uri(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"Input list `{source}` does not exist.")
        if source.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(source)
            column = next((c for c in ("path", "uri", "image", "url") if c in table.column_names), None)
            if column is None:
                raise ValueError(
                    f"`{source}` needs a column named path, uri, image or url; it has {table.column_names}."
                )
            paths = [str(p) for p in table.column(column).to_pylist() if p]
        else:
            paths = [
                line.strip()
                for line in Path(source).read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
        if not paths:
            raise ValueError(f"Input list `{source}` names no images.")
        pairs = list(zip(paths, _names(paths)))
    else:
        found, missing = find_images([source])
        if not found:
            raise FileNotFoundError(
                f"No images found at `{source}` ({missing[0][1] if missing else 'nothing matched'})."
            )
        pairs = [(str(path), name) for path, name in found]
    seen: dict[str, str] = {}
    for path, name in pairs:
        if name in seen and seen[name] != path:
            raise ValueError(f"Inputs `{seen[name]}` and `{path}` would both be written as `{name}`.")
        seen[name] = path
    return list(dict.fromkeys(pairs))


def read_bytes(path: str) -> bytes:
    """Bytes of a local path or of a URI (pyarrow's filesystems: s3://, gs://, hdfs://...; fsspec for the rest)."""
    if not _is_uri(path):
        with open(path.removeprefix("file://"), "rb") as f:
            return f.read()
    try:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    except Exception as pyarrow_error:  # noqa: BLE001 - fall back to fsspec for schemes pyarrow lacks
        try:
            import fsspec
        except ImportError:
            raise pyarrow_error from None
        with fsspec.open(path, "rb") as f:
            return f.read()


# ------------------------------------------------------------------------------------------------ manifest

# The manifest's columns and their Arrow types, in order: spelled once.
COLUMNS = {
    "path": "string",
    "name": "string",
    "output": "string",
    "height": "int64",
    "width": "int64",
    "num_segments": "int64",
    "labels": "string",  # segment id -> word, as JSON, when segments are named
    "status": "string",  # "done" or "failed"
    "error": "string",
}


def read_manifest(output: Path) -> dict[str, dict]:
    path = Path(output) / MANIFEST
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    return {row["name"]: row for row in pq.read_table(path).to_pylist()}


def writers(config: JobConfig, formats) -> tuple:
    """The writers of `formats` (keys of `outputs.WRITERS`) for the job's method: concept maps have their own files."""
    table = CONCEPT_WRITERS if method_named(config.method).concepts else WRITERS
    return tuple(table[f] for f in formats)


class Manifest:
    """`OUTPUT/manifest.parquet`: one row per input, and the job's resume sink. An input is done when its files are
    (`OutputFolder.done`); a label PNG whose row a killed run never wrote is adopted into the manifest."""

    def __init__(self, files: OutputFolder, rows: dict[str, dict] | None = None) -> None:
        self.files, self.folder = files, Path(files.folder)
        self.rows = read_manifest(self.folder) if rows is None else rows

    def done(self, name: str, source: str) -> bool:
        if not self.files.done(name, source):
            return False
        row = self.rows.get(name)
        if row is None or row["status"] != "done" or row["path"] != source:  # written by a run that died first
            adopted = read_labels(self.label_path(name))
            labels = row["labels"] if row is not None else None
            self.rows[name] = self.row(source, name, adopted.shape, int(adopted.max()) + 1, labels)
        return True

    def label_path(self, name: str) -> Path:
        return self.files.writers[0].path(self.folder, name)

    def row(self, source: str, name: str, shape=None, num_segments=None, labels=None, error: str = "") -> dict:
        height, width = shape if shape is not None else (None, None)
        return {
            "path": source,
            "name": name,
            "output": str(self.label_path(name)),
            "height": height,
            "width": width,
            "num_segments": num_segments,
            "labels": labels,
            "status": "failed" if error else "done",
            "error": error,
        }

    def outcome_row(self, outcome) -> dict:
        """The row of a job runner's `Outcome`."""
        if not outcome.ok:
            return self.row(outcome.source, outcome.name, error=outcome.error)
        result = outcome.result
        names = json.dumps({str(s.id): s.label for s in result.names}) if result.names is not None else None
        return self.row(outcome.source, outcome.name, result.labels.shape, result.num_segments, names)

    def record(self, row: dict) -> None:
        self.rows[row["name"]] = {c: _none_if_nan(row[c]) for c in COLUMNS}

    def save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(column, getattr(pa, kind)()) for column, kind in COLUMNS.items()])
        table = pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in self.rows.values()], schema=schema)
        with atomic_path(self.folder / MANIFEST) as tmp:
            pq.write_table(table, tmp)


def _none_if_nan(value):
    return None if isinstance(value, float) and np.isnan(value) else value


# ------------------------------------------------------------------------------------------------ Ray stages


def decode_row(row: dict, encode: EncodeConfig, backbone: Backbone) -> dict:
    """CPU stage (a Ray task per row): read, decode and crop one image, and resize it into the UNet's input, float32,
    as `diffseg segment` prepares it (`Geometry.target_size`, with the family the driver read from the checkpoint's
    configs). The cropped image travels too: the label map covers it, the overlay is drawn on it. A failure is
    carried as the row's error, never raised."""
    try:
        image = crop_image(np.asarray(decode_image(read_bytes(row["path"]), row["path"])), encode.crop)
        size = backbone.geometry.target_size(image.shape[:2], encode.resolution, encode.resize)
        pixels = to_model_input([image], size, encode.padding)[0].numpy()
        return {**row, "pixels": pixels, "image": image, "error": ""}
    except (OSError, ValueError) as error:
        empty = np.zeros((3, backbone.size_multiple, backbone.size_multiple), np.float32)
        return {**row, "pixels": empty, "image": np.zeros((1, 1, 3), np.uint8), "error": str(error)}


class SegmentWorker:
    """GPU (or CPU) stage: one pipeline per actor, running the job runner on the batches the decode tasks prepared
    (`Job.segment_prepared`: one UNet call per input shape, its error policy) into the same sinks as `diffseg
    segment` (`OutputFolder`); returns each input's manifest row."""

    def __init__(
        self, model: str, device: str, dtype: str, config: JobConfig, output: str, formats: list[str], offload=False,
        method: Method | None = None,
    ) -> None:  # fmt: skip
        from ..pipeline import DiffSegPipeline

        if method is not None and method.name not in METHODS:  # a method the driver registered (`register`)
            register(method)
        self.job = Job(DiffSegPipeline.from_pretrained(model, device=device, dtype=dtype, offload=offload), config)
        self.files = OutputFolder(Path(output), writers(config, formats))
        self.manifest = Manifest(self.files, rows={})  # the rows are the driver's; a worker only makes its own

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["path"])
        items = [(str(batch["path"][i]), str(batch["name"][i])) for i in range(n)]
        good = [i for i in range(n) if not batch["error"][i]]
        outcomes = {i: Outcome(*items[i], error=str(batch["error"][i])) for i in range(n) if i not in good}
        made = self.job.segment_prepared(
            [items[i] for i in good],
            [batch["pixels"][i] for i in good],
            [np.asarray(batch["image"][i], np.uint8) for i in good],
        )
        for i, outcome in zip(good, made):
            outcomes[i] = deliver(outcome, [self.files])
        rows = [self.manifest.outcome_row(outcomes[i]) for i in range(n)]
        return {c: [row[c] for row in rows] for c in COLUMNS}


# ------------------------------------------------------------------------------------------------ driver


def _check_cluster_settings(address: str, num_gpus: float | None) -> None:
    """The Ray address and GPU share checked before Ray starts (Ray's own errors name neither)."""
    if address not in ("local", "auto") and not re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", address):
        raise ValueError(
            f"`--ray-address` must be local, auto, ray://HOST:PORT or HOST:PORT (a cluster's head) but is {address!r}."
        )
    if num_gpus is not None and not (
        math.isfinite(num_gpus) and 0 <= num_gpus and (num_gpus <= 1 or num_gpus == int(num_gpus))
    ):
        raise ValueError(
            "`--num-gpus-per-worker` must be a fraction of one GPU (0 to 1) or a whole number of GPUs but is "
            f"{num_gpus}."
        )


def _connect(address: str):
    import ray

    if ray.is_initialized():
        return ray
    if address == "local":  # always a new local instance, whatever RAY_ADDRESS says
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def segment_dataset(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: JobConfig | None = None,
    *,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    offload: bool = False,
    ray_address: str = "local",
    batch_size: int = 4,
    num_gpus_per_worker: float | None = None,
    concurrency: int = 1,
    formats: tuple[str, ...] = ("labels",),
    progress: bool = True,
) -> JobSummary:
    """Segment every image of `source` into `output` with Ray Data; see the module docstring.

    Args:
        source: a folder, a glob, or a .txt/.lst/.parquet file listing image paths or URIs.
        output: folder for `labels/NAME.png` and `manifest.parquet`; re-use it to resume.
        config: the job's settings (method, encode, segment, naming words), as `diffseg segment` takes them; with
            words, the manifest's `labels` column holds each image's segment id -> word as JSON. Default: DiffSeg's.
        offload: keep each worker's UNet or transformer in CPU memory, run on its GPU a block at a time.
        ray_address: "local" starts Ray on this machine (unless it is already initialised), "auto" joins the
            cluster this machine belongs to, "ray://host:10001" a remote one.
        batch_size: images per UNet batch on each worker.
        num_gpus_per_worker: GPUs per actor (fractions share a GPU); None: 1 if the cluster has GPUs, else 0.
        concurrency: number of actors.
        formats: keys of `outputs.WRITERS` to write besides the label PNG ("overlay", "npy", "names", "coco"); concept
            maps write `outputs.CONCEPT_WRITERS`' files under the same keys.
    """
    # 1. Check inputs; read back what is done.
    config = config or JobConfig()
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"`batch_size` and `concurrency` must be at least 1 but are {batch_size} and {concurrency}.")
    _check_cluster_settings(ray_address, num_gpus_per_worker)
    if ray_address == "local":  # the workers run here: a device this machine lacks fails now, not in each worker
        resolve_device(device)
    backbone = read_backbone(str(model))  # the family's sizes, read from its configs before any worker starts
    preflight(backbone, config.method, config.encode, config.segment)  # fails here, not in every task
    output = Path(output)
    items = list_inputs(source)
    output.mkdir(parents=True, exist_ok=True)
    formats = tuple(dict.fromkeys(("labels", *formats)))
    manifest = Manifest(OutputFolder(output, writers(config, formats)))
    todo = pending(items, [manifest])
    summary = JobSummary(skipped=len(items) - len(todo))
    if not todo:
        manifest.save()
        return summary

    # 2. Describe the stream: decode on CPUs, segment on the actors.
    worker = {"model": str(model), "device": device, "dtype": dtype, "offload": offload, "config": config}
    worker["method"] = method_named(config.method)  # its row travels: a method registered here runs there too
    worker["output"] = str(output)
    data = _stream(_connect(ray_address), todo, backbone, {**worker, "formats": list(formats)}, batch_size,
                   concurrency, num_gpus_per_worker)  # fmt: skip

    # 3. Stream results into the manifest.
    _collect(data, manifest, {name: source for source, name in todo}, summary, progress)
    return summary


def _stream(ray, todo, backbone: Backbone, worker: dict, batch_size: int, concurrency: int, num_gpus):
    """The Ray Data stream: decode tasks on CPUs, then `SegmentWorker` actors."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our bar counts images; Ray's would interleave with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    data = ray.data.from_items([{"path": source, "name": name} for source, name in todo])
    # Half a CPU per decode task: more decodes run beside the workers, and (unlike the workers' one CPU) it keeps
    # Ray from fusing decoding into the model actors, so the accelerator is not kept waiting on JPEG decoding.
    data = data.map(decode_row, fn_kwargs={"encode": worker["config"].encode, "backbone": backbone}, num_cpus=0.5)
    return data.map_batches(
        SegmentWorker,
        fn_constructor_kwargs=worker,
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=1,
        num_gpus=num_gpus,
        batch_format="numpy",
    )


def _collect(data, manifest: Manifest, pending_items: dict[str, str], summary: JobSummary, progress: bool) -> None:
    """Record each row as it streams in (the manifest rewritten every 10 s and at the end); if the job stops, the
    inputs never reached are recorded as failed with the reason, then the error goes on."""
    from tqdm import tqdm

    start = last_write = time.perf_counter()
    bar = tqdm(total=len(pending_items), unit="img", desc="segment-dataset", disable=not progress, dynamic_ncols=True)
    try:
        for batch in data.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                manifest.record(row)
                pending_items.pop(row["name"], None)
                if row["status"] == "done":
                    summary.done += 1
                else:
                    summary.failed.append({"path": row["path"], "error": row["error"]})
                    bar.write(f"diffseg: failed {row['path']}: {row['error']}", file=sys.stderr)
                bar.update(1)
            bar.set_postfix(done=summary.done, failed=len(summary.failed))
            if time.perf_counter() - last_write > 10:
                manifest.save()
                last_write = time.perf_counter()
    except Exception as error:  # noqa: BLE001 - the job stopped: record what was not reached, then re-raise
        for name, source in pending_items.items():
            manifest.record(manifest.row(source, name, error=f"job stopped before this image: {error}"))
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        manifest.save()
