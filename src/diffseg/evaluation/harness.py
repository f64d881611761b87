"""The evaluation harness: score a method (or any method's label PNGs) on a benchmark under a protocol.

An evaluation run lives in one folder:
    settings.json    what was run (dataset, parameters); a resumed run must match it
    results.jsonl    one line per scored image, appended and flushed as each is scored
    summary.json     the accumulated metrics, rewritten (atomically) as the run goes and at its end
Re-running into the same folder resumes: scored images are read back, not recomputed. A run killed at any moment
leaves a valid results file (a torn last line is dropped on resume).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import METHOD_DEFAULT, ConceptConfig, DiffCutConfig, SegmentConfig, anchor_points, encode_settings
from ..io.images import load_image
from ..io.outputs import atomic_path, read_labels
from .datasets import BENCHMARKS, Benchmark, Sample, published
from .metrics import Scores
from .protocols import PROTOCOLS, Protocol


@dataclass
class Summary:
    dataset: str
    images: int
    pixel_accuracy: float
    miou: float
    iou: list[float]
    seconds_per_image: float
    skipped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    published: list[dict] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


class ResultsFile:
    """Append-only JSON lines of per-image scores, safe to kill at any moment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            valid = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.records[record["id"]] = record
                    valid.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a kill: the image is simply scored again
            with atomic_path(path) as tmp:  # rewrite without torn lines before appending
                tmp.write_text("".join(f"{line}\n" for line in valid), encoding="utf-8")
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["id"]] = record

    def close(self) -> None:
        self._file.close()


def record_scores(num_classes: int, *records: dict) -> Scores:
    """The scores of per-image records, summed."""
    total = Scores.zeros(num_classes)
    for r in records:
        total += Scores(np.array(r["tp"]), np.array(r["fp"]), np.array(r["fn"]), r["all"], 1)
    return total


class Scorer:
    """The evaluation's sink (`jobs.runner.Sink`): each outcome scored against its label under the protocol and
    appended to `results.jsonl`; an image is done once its line is there.

    With `pamr`, the protocol's PAMR refines each prediction after the background step (DiffCut's evaluation)."""

    def __init__(self, results: ResultsFile, bench: Benchmark, protocol: Protocol, pamr: bool = False) -> None:
        self.results, self.bench, self.protocol, self.pamr = results, bench, protocol, pamr
        self.expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # what the next outcomes are scored against
        self.seconds = 0.0  # per image, of the batch being scored
        self.running = record_scores(bench.num_classes, *results.records.values())

    def done(self, name: str, source: str) -> bool:
        return name in self.results.records

    def expect(self, sample: Sample, image: np.ndarray, label: np.ndarray) -> None:
        self.expected[sample.id] = (image if self.pamr else None, label)

    def write(self, outcome) -> None:
        image, label = self.expected.pop(outcome.name)
        pred = outcome.result.labels
        scores = self.protocol.score(self.bench, label, pred, refine_with=image)
        record = {
            "id": outcome.name,
            "tp": scores.tp.tolist(),
            "fp": scores.fp.tolist(),
            "fn": scores.fn.tolist(),
            "all": scores.all,
            "segments": int(len(np.unique(pred))),
            "seconds": round(self.seconds, 4),
        }
        self.results.append(record)
        self.running += record_scores(self.bench.num_classes, record)


def evaluate(
    benchmark: str | Benchmark,
    root: str | Path,
    output: str | Path,
    *,
    pipeline=None,
    predictions: str | Path | None = None,
    config: SegmentConfig | DiffCutConfig | None = None,
    timestep: int = METHOD_DEFAULT,
    blocks: tuple[int, int] | None = None,
    protocol: str = "diffseg",
    batch_size: int = 1,
    limit: int | None = None,
    concepts: ClassConcepts | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> Summary:
    """Score a benchmark, resuming from `output` if it holds an earlier run of the same settings.

    Exactly one of `pipeline` (segment with the method whose settings `config` is: a `SegmentConfig` for DiffSeg,
    the default, or a `DiffCutConfig`) and `predictions` (a folder of label PNGs named `ID.png`, any method, at the
    protocol's score size or at the image's size) is given. The protocol crops each image and the method sees that
    square resized to its input (DiffSeg 512², DiffCut 1024²), as both references do.

    `protocol` (`protocols.PROTOCOLS`): "diffseg" (the DiffSeg paper's, default) scores at 512×512; "diffcut"
    (DiffCut's `eval_diffcut.py`) at 128×128, with its crop, its background step and PAMR after it when the
    `DiffCutConfig` asks for PAMR. `blocks` chooses an SD3 / Flux backbone's blocks; the run records them.
    """
    # 1. Check inputs and settings; a resumed run must have the same.
    bench = BENCHMARKS[benchmark] if isinstance(benchmark, str) else benchmark
    _check_run(bench, pipeline, predictions, protocol, batch_size, concepts)
    rules = PROTOCOLS[protocol]
    samples = bench.samples(root)[:limit]
    if pipeline is not None:
        job_settings = (config, timestep, blocks, batch_size)
        predict, settings, pamr = _model_predictor(bench, rules, protocol, pipeline, job_settings, concepts)
    else:
        predict, pamr = _read_predictions(Path(predictions), rules), False
        settings = _run_settings(bench, protocol, None, f"predictions:{Path(predictions).resolve()}")
    output = Path(output)
    settings = _open_run(output, settings)
    # 2. and 3. Score what is not scored yet.
    run = (bench, rules, samples, settings, output)
    return _score_run(run, predict, pamr, batch_size, progress, log)


def _check_run(bench: Benchmark, pipeline, predictions, protocol: str, batch_size: int, concepts) -> None:
    """A ValueError (or FileNotFoundError) for a run `evaluate` cannot make, before anything is read."""
    if (pipeline is None) == (predictions is None):
        raise ValueError("Pass exactly one of `pipeline` and `predictions`.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {tuple(PROTOCOLS)} but is {protocol!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1 but is {batch_size}.")
    if predictions is not None and not Path(predictions).is_dir():
        raise FileNotFoundError(f"Predictions folder `{predictions}` does not exist.")
    if protocol == "concepts" and not bench.background:
        raise ValueError(
            f"Open-vocabulary scoring is for a benchmark with a background class (voc20, context59, cocoobject), not "
            f"{bench.name}."
        )
    if (concepts is not None) != (protocol == "concepts" and pipeline is not None):
        raise ValueError(
            "Open-vocabulary scoring of a model takes `concepts` (the class names as words) and protocol "
            '"concepts"; of precomputed predictions, protocol "concepts" alone.'
        )


def _model_predictor(bench: Benchmark, rules: Protocol, protocol: str, pipeline, job_settings: tuple, concepts):
    """(predict, the run's settings, whether PAMR runs in the scorer) for a model: the job runner on the protocol's
    crop of each image. Under DiffCut's protocol, PAMR runs in the scorer, after the background step."""
    config, timestep, blocks, batch_size = job_settings
    config = config or (ConceptConfig() if concepts is not None else SegmentConfig())
    pamr = protocol == "diffcut" and getattr(config, "pamr", False)
    words = None if concepts is None else concepts.background
    job = _protocol_job(
        pipeline, replace(config, pamr=False) if pamr else config, timestep, rules, batch_size, blocks, words
    )

    def predict(items: list, labels: list) -> Iterator:  # the method sees the protocol's crop of each image
        cropped = [(sample_id, name, rules.crop(image)) for sample_id, name, image in items]
        if concepts is None:
            return job.segment_images(cropped)
        return _as_classes(job, cropped, [concepts.words(bench, label, protocol) for label in labels])

    settings = _run_settings(bench, protocol, job, pipeline.model, pamr)
    if concepts is not None:
        settings.update(background_concepts=list(concepts.background), all_classes=concepts.all_classes)
    return predict, settings, pamr


def _score_run(run: tuple, predict: Callable, pamr: bool, batch_size: int, progress: bool, log) -> Summary:
    """Read back what `output` already scored, then segment (or read) each other image, match, append; the summary
    is rewritten after every batch."""
    from tqdm import tqdm

    bench, rules, samples, settings, output = run
    results = ResultsFile(output / "results.jsonl")
    scorer = Scorer(results, bench, rules, pamr)
    todo = [s for s in samples if not scorer.done(s.id, str(s.image))]
    skipped: list[dict] = []
    if len(todo) < len(samples):
        log(f"Resuming: {len(samples) - len(todo)} of {len(samples)} images already scored in {output}.")

    def skip(sample_id: str, reason: str) -> None:
        skipped.append({"id": sample_id, "reason": reason})
        bar.write(f"diffseg: skipped {sample_id}: {reason}", file=sys.stderr)

    bar = tqdm(total=len(todo), unit="img", desc=f"evaluate {bench.name}", disable=not progress, dynamic_ncols=True)
    try:
        for first in range(0, len(todo), batch_size):
            batch = todo[first : first + batch_size]
            _score_batch(batch, bench, rules, predict, scorer, skip)
            bar.set_postfix(acc=f"{100 * scorer.running.pixel_accuracy:.1f}", miou=f"{100 * scorer.running.miou:.1f}")
            bar.update(len(batch))
            _write_summary(output, _summary(bench, samples, results, skipped, settings))
    finally:
        bar.close()
        results.close()
    final = _summary(bench, samples, results, skipped, settings)
    _write_summary(output, final)
    return final


def _as_classes(job, items: list, words: list) -> Iterator:
    """Concept maps of each image's own words, their label maps (word indices) turned into the classes the words
    stand for."""
    for outcome, (_, classes) in zip(job.segment_images(items, [w for w, _ in words]), words):
        if outcome.ok:
            outcome.result.labels = classes[outcome.result.labels]
        yield outcome


def _score_batch(
    batch: list[Sample], bench: Benchmark, rules: Protocol, predict: Callable, scorer: Scorer, skip: Callable
) -> None:
    """Read a batch's images and labels, predict them in one call, score each outcome (or say why it is skipped)."""
    from ..jobs.runner import deliver

    loaded = [item for item in (_load_sample(bench, rules, sample, skip) for sample in batch) if item is not None]
    if not loaded:
        return
    start = time.perf_counter()
    # The predictor sees each image and its label at the image's size (open-vocabulary words come from it).
    outcomes = list(predict([(s.id, s.id, image) for s, image, _, _ in loaded], [full for _, _, full, _ in loaded]))
    scorer.seconds = (time.perf_counter() - start) / len(loaded)
    for (sample, image, _, label), outcome in zip(loaded, outcomes):
        scorer.expect(sample, image, label)
        if not deliver(outcome, [scorer]).ok:
            skip(sample.id, outcome.error)


def _run_settings(bench: Benchmark, protocol: str, job, source: str, pamr: bool = False) -> dict:
    """What a run is, as `settings.json` records it: the dataset, the method (or predictions folder), the timestep
    and the segment settings (the protocol fixes the rest)."""
    if job is None:
        return {"dataset": bench.name, "method": source, "timestep": None, "protocol": protocol}
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(job.config.segment).items()}
    fields.pop("output_size", None)
    return {
        "dataset": bench.name,
        "method": f"{job.config.method}:{source}",
        "timestep": job.config.encode.timestep,
        "protocol": protocol,
        **({"blocks": list(job.config.encode.blocks)} if job.config.encode.blocks is not None else {}),
        **({"schedule": list(job.config.encode.schedule)} if job.config.encode.schedule is not None else {}),
        **fields,
        **({"pamr": True} if pamr else {}),
    }


def _open_run(output: Path, settings: dict) -> dict:
    """The run's settings as they read back from `output/settings.json`: written for a new run, compared for a resumed
    one (other settings are refused, naming them)."""
    settings = json.loads(json.dumps(settings))  # as it will read back
    output.mkdir(parents=True, exist_ok=True)
    path = output / "settings.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise ValueError(
                f"`{output}` holds a run with other settings ({previous}); resume with the same settings or choose "
                "another output folder."
            )
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))
    return settings


def _protocol_job(pipeline, config, timestep, rules: Protocol, batch_size: int, blocks=None, words=None):
    """The job runner with the protocol's encode: the protocol's square (cropped before), resized to DiffSeg's 512
    whatever the model (DiffCut's 1024; concept maps' 1024), the method's timestep and noise; label maps at the
    protocol's score size."""
    from ..jobs.runner import Job, JobConfig
    from ..methods.registry import method_of

    method = method_of(config)
    if isinstance(config, SegmentConfig) and config.num_points is None:  # the number for this model's grids: a run
        config = replace(config, num_points=anchor_points(len(pipeline.backbone.grid_sides)))  # records it
    encode = encode_settings(
        method.encode_defaults, timestep=timestep, resize="square", crop=rules.job_crop, blocks=blocks
    )
    encode = replace(encode, resolution=encode.resolution or rules.default_resolution)
    job = JobConfig(method.name, encode, config, words=words, output_size=rules.score_size)
    return Job(pipeline, job, batch_size=batch_size)


# ConceptAttention's VOC multi-class experiment (`run_multi_class_seg_experiment.py`): these concepts, then the
# classes present in the image; a pixel taking any of them is background.
BACKGROUND_CONCEPTS = ("background", "floor", "grass", "tree", "sky")


@dataclass(frozen=True)
class ClassConcepts:
    """Open-vocabulary evaluation: the benchmark's class names are the concept words of each image.

    Attributes:
        background: words that all stand for the background class, first (the reference's five).
        all_classes: every class name for every image; by default the classes present in its label (the reference's
            `present_classes`: it knows which objects are there and locates them).
    """

    background: tuple[str, ...] = BACKGROUND_CONCEPTS
    all_classes: bool = False

    def words(self, bench: Benchmark, label: np.ndarray, protocol: str) -> tuple[list[str], np.ndarray]:
        """The image's words and, per word, the class it stands for (an array to index label maps with)."""
        names = bench.class_names(protocol)
        background = bench.num_classes - 1
        classes = range(background) if self.all_classes else [int(c) for c in np.unique(label) if 0 <= c < background]
        words = list(self.background) + [names[c] for c in classes]
        return words, np.array([background] * len(self.background) + list(classes), np.int64)


def _read_predictions(folder: Path, rules: Protocol) -> Callable:
    """A predictor reading precomputed label PNGs `folder/ID.png`, brought to the protocol's score size: the same
    outcomes the job runner gives."""
    from ..jobs.runner import Outcome
    from ..segmentation import Segmentation

    def predict(items: list, _labels: list) -> Iterator:
        for sample_id, name, image in items:
            path = folder / f"{sample_id}.png"
            try:
                labels = rules.prediction(read_labels(path), image.shape[:2])
            except (OSError, ValueError) as error:
                yield Outcome(sample_id, name, error=f"prediction `{path}`: {error}")
                continue
            yield Outcome(sample_id, name, Segmentation(labels, int(labels.max()) + 1, image))

    return predict


def _load_sample(bench: Benchmark, rules: Protocol, sample: Sample, skip: Callable[[str, str], None]):
    """(sample, image, label at the image's size, label at the score size) of one benchmark image, or None after `skip`
    names why it cannot be scored."""
    if not sample.label.is_file():
        return skip(sample.id, f"label `{sample.label}` not found")
    try:
        # Benchmarks use the stored pixel order (no EXIF rotation), as the labels do.
        image = np.asarray(load_image(sample.image, exif_transpose=False))
        label = bench.read_label(sample.label, rules.name)
        if label.shape != image.shape[:2]:
            return skip(sample.id, f"label is {label.shape} but image is {image.shape[:2]}")
        return sample, image, label, rules.label(label)
    except (OSError, ValueError) as error:
        return skip(sample.id, str(error))


def _summary(bench: Benchmark, samples: list, results: ResultsFile, skipped: list, settings: dict) -> Summary:
    scored = [results.records[s.id] for s in samples if s.id in results.records]
    total = record_scores(bench.num_classes, *scored)
    return Summary(
        dataset=bench.name,
        images=total.images,
        pixel_accuracy=total.pixel_accuracy,
        miou=total.miou,
        iou=[None if np.isnan(v) else float(v) for v in total.iou],
        seconds_per_image=float(np.mean([r["seconds"] for r in scored])) if scored else float("nan"),
        skipped=skipped,
        settings=settings,
        published=[asdict(p) for p in published(bench, settings["protocol"])],
        classes=bench.class_names(settings["protocol"]),
    )


def _write_summary(output: Path, summary: Summary) -> None:
    with atomic_path(output / "summary.json") as tmp:
        tmp.write_text(json.dumps(asdict(summary), indent=2))


def format_summary(summary: Summary) -> str:
    """The printed table: the published rows beside this run's."""
    rows = [(p["method"], p["pixel_accuracy"], p["miou"], "") for p in summary.published]
    rows.append(("this run", 100 * summary.pixel_accuracy, 100 * summary.miou, str(summary.images)))
    protocol = summary.settings.get("protocol", "diffseg")
    kind = "open-vocabulary, no matching" if protocol == "concepts" else "unsupervised, per-image Hungarian matching"
    lines = [f"{summary.dataset}: {kind}, {len(summary.iou)} classes, {protocol} protocol", ""]
    width = max(32, *(len(name) + 2 for name, *_ in rows))
    lines.append(f"{'':{width}}{'pixel acc':>10}{'mIoU':>8}{'images':>8}")
    for name, acc, miou, n in rows:
        acc, miou = ("" if v is None else f"{v:.1f}" for v in (acc, miou))
        lines.append(f"{name:{width}}{acc:>10}{miou:>8}{n:>8}")
    if summary.skipped:
        lines.append(f"\n{len(summary.skipped)} images skipped (see summary.json).")
    return "\n".join(lines)
