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
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backbones.families import Backbone, target_size
from ..backbones.families import read_backbone
from ..config import DEFAULT_MODEL, METHOD_DEFAULT, EncodeConfig, encode_settings
from ..io.images import crop as crop_image
from ..io.images import decode_image, find_images, to_model_input
from ..io.outputs import WRITERS, atomic_path, outputs_done, read_labels

_ENCODE = EncodeConfig()
MANIFEST = "manifest.parquet"
COLUMNS = ("path", "name", "output", "height", "width", "num_segments", "labels", "status", "error")
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


def read_manifest(output: Path) -> dict[str, dict]:
    path = output / MANIFEST
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    return {row["name"]: row for row in pq.read_table(path).to_pylist()}


def write_manifest(output: Path, rows: dict[str, dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [{c: row.get(c) for c in COLUMNS} for row in rows.values()],
        schema=pa.schema(
            [
                ("path", pa.string()),
                ("name", pa.string()),
                ("output", pa.string()),
                ("height", pa.int64()),
                ("width", pa.int64()),
                ("num_segments", pa.int64()),
                ("labels", pa.string()),
                ("status", pa.string()),
                ("error", pa.string()),
            ]
        ),
    )
    with atomic_path(output / MANIFEST) as tmp:
        pq.write_table(table, tmp)


def _failed(path: str, name: str, output: Path, error: str) -> dict:
    return {
        "path": path,
        "name": name,
        "output": str(WRITERS["labels"].path(output, name)),
        "height": None,
        "width": None,
        "num_segments": None,
        "labels": None,
        "status": "failed",
        "error": error,
    }


# ------------------------------------------------------------------------------------------------ Ray stages


def decode_row(row: dict, crop: str | None, resolution: int | None, resize: str, backbone: Backbone) -> dict:
    """CPU stage (a Ray task per row): read, decode and crop one image, and resize it into the UNet's input, float32,
    as `diffseg segment` prepares it (`backbones.target_size`, with the family the driver read from the checkpoint's
    configs). The cropped image travels too: the label map covers it, the overlay is drawn on it. A failure is
    carried as the row's error, never raised."""
    try:
        image = crop_image(np.asarray(decode_image(read_bytes(row["path"]), row["path"])), crop)
        size = target_size(image.shape[:2], backbone, resolution, resize)
        pixels = to_model_input([image], size)[0].numpy()
        return {**row, "pixels": pixels, "image": image, "height": image.shape[0], "width": image.shape[1], "error": ""}
    except (OSError, ValueError) as error:
        empty = np.zeros((3, backbone.size_multiple, backbone.size_multiple), np.float32)
        return {
            **row,
            "pixels": empty,
            "image": np.zeros((1, 1, 3), np.uint8),
            "height": 0,
            "width": 0,
            "error": str(error),
        }


class SegmentWorker:
    """GPU (or CPU) stage: one pipeline per actor. Encodes a batch (one UNet call per input shape in it), then
    segments and writes each image as `diffseg segment` does: the job runner's segment stage and error policy
    (`jobs.Job.finish`), the same writers."""

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        encode: dict,
        segment: dict,
        output: str,
        formats: list[str],
        labels: str | None = None,
    ) -> None:
        from ..io.outputs import WRITERS
        from ..pipeline import DiffSegPipeline
        from .runner import Job

        self.pipe = DiffSegPipeline.from_pretrained(model, device=device, dtype=dtype)
        self.encode = {k: encode[k] for k in ("method", "timestep", "noise_seed") if k in encode}
        self.job = Job(self.pipe, encode=encode, segment=segment, labels=labels)
        self.vocabulary = self.pipe.vocabulary(labels) if labels is not None else None
        self.output, self.writers = Path(output), [WRITERS[f] for f in formats]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from ..io.outputs import write_outputs
        from .runner import MODEL_ERRORS, encoding_failed

        n = len(batch["path"])
        rows = [_failed(batch["path"][i], batch["name"][i], self.output, str(batch["error"][i])) for i in range(n)]
        good = [i for i in range(n) if not batch["error"][i]]
        shapes = {i: tuple(np.shape(batch["pixels"][i])) for i in good}
        for shape in dict.fromkeys(shapes.values()):  # images of one input shape share a UNet call
            group = [i for i in good if shapes[i] == shape]
            items = [(str(batch["path"][i]), str(batch["name"][i])) for i in group]
            try:
                pixels = torch.from_numpy(np.stack([np.asarray(batch["pixels"][i], np.float32) for i in group]))
                images = [np.asarray(batch["image"][i], np.uint8) for i in group]
                bundles = self.pipe.encode_pixels(pixels, images, vocabulary=self.vocabulary, **self.encode)
                outcomes = self.job.finish(items, bundles)
            except MODEL_ERRORS as error:  # e.g. out of memory: the group fails, the job goes on
                outcomes = encoding_failed(items, error)
            for i, outcome in zip(group, outcomes):
                if outcome.ok:
                    try:
                        write_outputs(outcome, self.output, self.writers)
                    except (OSError, ValueError, ImportError) as error:
                        outcome.error = f"writing failed: {error}"
                if not outcome.ok:
                    rows[i]["error"] = outcome.error
                    continue
                result = outcome.result
                names = json.dumps({str(s.id): s.label for s in result.names}) if result.names is not None else None
                rows[i].update(
                    height=int(result.labels.shape[0]),
                    width=int(result.labels.shape[1]),
                    num_segments=result.num_segments,
                    labels=names,
                    status="done",
                    error="",
                )
        return {c: [row[c] for row in rows] for c in COLUMNS}


# ------------------------------------------------------------------------------------------------ driver


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
    *,
    ray_address: str = "local",
    batch_size: int = 4,
    num_gpus_per_worker: float | None = None,
    concurrency: int = 1,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    method: str = "diffseg",
    timestep: int = METHOD_DEFAULT,
    crop: str | None = _ENCODE.crop,
    resolution: int | None = METHOD_DEFAULT,
    resize: str = _ENCODE.resize,
    noise_seed: int | None = METHOD_DEFAULT,
    segment_kwargs: dict | None = None,
    labels: str | None = None,
    label_kwargs: dict | None = None,
    formats: tuple[str, ...] = ("labels",),
    progress: bool = True,
) -> JobSummary:
    """Segment every image of `source` into `output` with Ray Data; see the module docstring.

    Args:
        source: a folder, a glob, or a .txt/.lst/.parquet file listing image paths or URIs.
        output: folder for `labels/NAME.png` and `manifest.parquet`; re-use it to resume.
        ray_address: "local" starts Ray on this machine (unless it is already initialised), "auto" joins the
            cluster this machine belongs to, "ray://host:10001" a remote one.
        batch_size: images per UNet batch on each worker.
        num_gpus_per_worker: GPUs per actor (fractions share a GPU); None: 1 if the cluster has GPUs, else 0.
        concurrency: number of actors.
        method: "diffseg" or "diffcut"; `timestep` and `resolution` default to the method's (see
            `config.ENCODE_DEFAULTS`); `segment_kwargs` are its segmenter's settings.
        resize: "native" (aspect ratio kept) or "square" (the paper's); see `DiffSegPipeline.encode`.
        labels: comma-separated words to name segments with; the manifest's `labels` column then holds each
            image's segment id -> word as JSON.
        formats: keys of `outputs.WRITERS` to write besides the label PNG ("overlay", "npy", "names", "coco").
    """
    from tqdm import tqdm

    # 1. Check inputs; read back what is done.
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"`batch_size` and `concurrency` must be at least 1 but are {batch_size} and {concurrency}.")
    segment_kwargs = dict(segment_kwargs or {})
    settings = encode_settings(method, timestep=timestep, resolution=resolution, noise_seed=noise_seed)
    timestep, resolution, noise_seed = settings.timestep, settings.resolution, settings.noise_seed
    backbone = read_backbone(str(model))  # the family's sizes, read from its configs before any worker starts
    target_size((1, 1), backbone, resolution, resize)  # a bad resolution or resize fails here, not in every task
    output = Path(output)
    items = list_inputs(source)
    output.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(output)
    summary = JobSummary()
    todo = []
    writers = [WRITERS[f] for f in dict.fromkeys(("labels", *formats))]
    for path, name in items:
        target = WRITERS["labels"].path(output, name)
        row = manifest.get(name)
        if not outputs_done(output, name, writers, path):  # every format asked for, made from this input
            todo.append({"path": path, "name": name})
        elif row is not None and row["status"] == "done" and row["path"] == path:
            summary.skipped += 1
        else:
            adopted = read_labels(target)  # written by a run that died before its manifest update
            manifest[name] = {
                "path": path,
                "name": name,
                "output": str(target),
                "height": adopted.shape[0],
                "width": adopted.shape[1],
                "num_segments": int(adopted.max()) + 1,
                "labels": row["labels"] if row is not None else None,
                "status": "done",
                "error": "",
            }
            summary.skipped += 1
    if not todo:
        write_manifest(output, manifest)
        return summary

    # 2. Connect to Ray and describe the stream: decode on CPUs, segment on the actors.
    ray = _connect(ray_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our bar counts images; Ray's would interleave with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    data = ray.data.from_items(todo)
    # Half a CPU per decode task: more decodes run beside the workers, and (unlike the workers' one CPU) it keeps
    # Ray from fusing decoding into the model actors, so the accelerator is not kept waiting on JPEG decoding.
    decode = {"crop": crop, "resolution": resolution, "resize": resize, "backbone": backbone}
    data = data.map(decode_row, fn_kwargs=decode, num_cpus=0.5)
    data = data.map_batches(
        SegmentWorker,
        fn_constructor_kwargs={
            "model": str(model),
            "device": device,
            "dtype": dtype,
            "encode": {"method": method, "timestep": timestep, "noise_seed": noise_seed},
            "segment": {**segment_kwargs, **(label_kwargs or {})},
            "output": str(output),
            "formats": ["labels", *(f for f in formats if f != "labels")],
            "labels": labels,
        },
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=1,
        num_gpus=num_gpus_per_worker,
        batch_format="numpy",
    )

    # 3. Stream results into the manifest.
    start = time.perf_counter()
    pending = {row["name"]: row for row in todo}
    last_write = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="segment-dataset", disable=not progress, dynamic_ncols=True)
    try:
        for batch in data.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                row = {c: (None if isinstance(row[c], float) and np.isnan(row[c]) else row[c]) for c in COLUMNS}
                manifest[row["name"]] = row
                pending.pop(row["name"], None)
                if row["status"] == "done":
                    summary.done += 1
                else:
                    summary.failed.append({"path": row["path"], "error": row["error"]})
                    bar.write(f"diffseg: failed {row['path']}: {row['error']}", file=sys.stderr)
                bar.update(1)
            bar.set_postfix(done=summary.done, failed=len(summary.failed))
            if time.perf_counter() - last_write > 10:
                write_manifest(output, manifest)
                last_write = time.perf_counter()
    except Exception as error:  # noqa: BLE001 - the job stopped: record what was not reached, then re-raise
        for row in pending.values():
            manifest[row["name"]] = _failed(row["path"], row["name"], output, f"job stopped before this image: {error}")
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        write_manifest(output, manifest)
    return summary
