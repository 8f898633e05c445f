"""`cdan-report`: draft findings reports for many chest X-ray studies from the command line, as JSON lines.

    cdan-report --model outputs/demo --inputs scans/ --output reports.jsonl
    cdan-report --model outputs/demo --inputs studies.csv --output reports.jsonl --batch_size 16 --num_beams 3
    cdan-report --model outputs/demo --inputs a.png b.png --output reports.jsonl --ban_anonymisation_token
    cdan-report --model outputs/demo --inputs scans/ --output reports.jsonl --precision int8 --compile true

Inputs (`--inputs`, one or more, mixed freely):

- a folder of images (PNG, JPEG, BMP, TIFF, DICOM `.dcm`; DICOM is read by its header, see `dicom_cdan`).
  `--group_by file`: every image file in the folder tree is a one-view study, its id the file's path relative to
  the folder (`p1/frontal.png`). `--group_by folder`: every folder that directly holds images is one study, its
  images (sorted by name) the views, its id the folder's relative path (the folder's own name for images at the top).
  `--group_by auto` (the default): `folder` when the folder has sub-folders, otherwise `file`;
- a CSV manifest (`.csv`) with columns `id` and `images` (paths separated by `;` or `|`), optionally `indication`,
  `history`, `view_positions` and `prior_images` (both separated like `images`), and `boxes` (JSON, as below);
- a JSON-lines manifest (`.jsonl`), one object per line with keys `id` and `images` (a list of paths, or one path),
  optionally `indication`, `history`, `view_positions` (a list), `prior_images` (the prior study's paths) and
  `boxes`: the lesion boxes, one list per image, each box `[x_min, y_min, x_max, y_max]` in pixels of that image or
  a `BOX_FEATURES` dict (`x_min`, ..., `label`, `score`, `source`), e.g. `[[[10, 20, 80, 90]], []]`.
  Relative paths in a manifest are relative to the manifest's folder;
- an image file: a one-view study whose id is the path as given.

`indication` and `history`, when given, are copied to the study's output row. A model that reads them (PriorRG, or
CDAN with `use_clinical_context` / `use_prior_study`) also gets them, the view positions and the prior study (a study
without them is read as such); another model ignores them with a warning. Boxes likewise go to the models that read
them (D2R-Net, CDAN with `use_lesion_branch`).

`--grounding` (D2R-Net, or CDAN with `use_lesion_alignment`) adds each row's `grounding`: per sentence of the report,
the study's boxes with their scores, best first (see the pipeline's `return_grounding`); a study without boxes gets an
error row.

`--precision int8|bf16` and `--compile true` run a faster CPU variant of the model (`inference_cdan.py`; bf16 only on
CPUs with AVX512-BF16 or AMX, otherwise exit status 2); its reports can differ slightly from float32 ones.

Output (`--output`, JSON lines): one row per study, `{"id", "indication" (when given), "report", "labels",
"probabilities", "grounding" (with `--grounding`), "seconds"}`. `labels` and `probabilities` are the reverse-attention
classifier's CheXpert labels (see the pipeline's `return_labels`), present when the model has that classifier (and
`--no_labels` is not given). `seconds` is the study's share of its batch's wall time (loading, preprocessing and
generation). A study that fails (missing or unreadable image, wrong number of views, ...) gets `{"id", "error":
message}` and the run goes on.

Resuming: an existing output file is appended to. Studies that already have a report row in it are skipped; studies
whose only rows are error rows are run again, and their new row follows the old error row (the last row of an id is
its current result). Rows are flushed after every batch, so a killed run loses at most the batch in flight; an
incomplete last line left by a kill is removed before appending.

Memory stays flat in the number of studies: the inputs are streamed twice (a check pass, then the run), rows are
written as each batch finishes, and only the study ids are kept (to find duplicates and finished studies).

Errors found before anything runs (exit status 2): a missing model folder, a missing input, a manifest without an
`id` or `images` column / key, an empty id, a line that is not a JSON object, and duplicate ids across the inputs.
The exit status is 1 when some studies got error rows, 0 otherwise.
"""

import csv
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PretrainedConfig

from modeling_cdan import CdanForConditionalGeneration
from modeling_d2r import D2RNetForConditionalGeneration
from modeling_priorrg import PriorRGForConditionalGeneration
from pipeline_cdan import CdanReportPipeline
from processing_cdan import CdanProcessor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
"""File suffixes (lower case) taken as images in an input folder (a DICOM file is also read without its suffix when
named in a manifest)."""

MANIFEST_COLUMNS = ("id", "images")
"""The columns (CSV) or keys (JSON lines) every manifest needs; `indication` is optional."""

CSV_PATH_SEPARATOR = re.compile(r"[;|]")
"""Separates the image paths of one study in a CSV manifest's `images` column."""

EXIT_OK, EXIT_SOME_STUDIES_FAILED, EXIT_USAGE_ERROR = 0, 1, 2


@dataclass
class ReportArguments:
    model: str = field(metadata={"help": "A CDAN checkpoint folder, such as the outputs/demo that train.py writes."})
    inputs: list[str] = field(
        metadata={"help": "Folders of images, CSV or JSONL manifests (id, images[, indication]), or image files."}
    )
    output: str = field(metadata={"help": "JSON-lines file of reports; appended to, finished studies are skipped."})
    group_by: Literal["auto", "file", "folder"] = field(
        default="auto",
        metadata={"help": "Folders: one study per image file (file), per folder holding images (folder), or folder "
                  "when the folder has sub-folders and file otherwise (auto)."},
    )  # fmt: skip
    batch_size: int = field(default=8, metadata={"help": "Studies per generate() call."})
    num_beams: int | None = field(default=None, metadata={"help": "Beam size; the checkpoint's by default."})
    max_length: int | None = field(default=None, metadata={"help": "Longest report; the checkpoint's by default."})
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "Never generate an n-gram of this size twice in a report; the checkpoint's by default."},
    )
    ban_anonymisation_token: bool = field(
        default=False, metadata={"help": "Never write IU X-Ray's de-identification mark 'xxxx'."}
    )
    labels: bool = field(
        default=True, metadata={"help": "Add the classifier's CheXpert labels when the model has one (--no_labels)."}
    )
    on_degenerate_image: Literal["warn", "error"] = field(
        default="warn", metadata={"help": "Images that cannot be a chest X-ray: warn and report, or error row."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ...; the first GPU if any."})
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads of torch (torch.set_num_threads); 1 is much faster on a busy shared machine."},
    )
    precision: Literal["fp32", "bf16", "int8"] = field(
        default="fp32",
        metadata={"help": "fp32; bf16 autocast (CPUs with AVX512-BF16 or AMX only); int8 dynamic quantisation of "
                  "the linear layers. See inference_cdan.py."},
    )  # fmt: skip
    compile: bool = field(default=False, metadata={"help": "Compile the visual extractor with torch.compile."})
    grounding: bool = field(
        default=False,
        metadata={"help": "Ground each sentence on the study's boxes (D2R-Net, CDAN with use_lesion_alignment)."},
    )


@dataclass
class Study:
    """
    One study to report on, as read from an input.

    Args:
        id (`str`): the study's id, unique across the inputs.
        images (`list[str]`): the paths of its views.
        source (`str`): where it was read, for messages (`manifest.csv line 3`).
        indication (`str`, *optional*): the clinical indication, copied to its output row.
        history (`str`, *optional*): the clinical history, copied to its output row.
        view_positions (`list[str]`, *optional*): the view position of each image (`"PA"`, `"LATERAL"`, ...).
        prior_images (`list[str]`, *optional*): the paths of the patient's prior study.
        boxes (`list`, *optional*): the lesion boxes, one list per image (checked by the processor).
    """

    id: str
    images: list[str]
    source: str
    indication: str | None = None
    history: str | None = None
    view_positions: list[str] | None = None
    prior_images: list[str] | None = None
    boxes: list | None = None

    def pipeline_input(self) -> tuple[str, ...] | dict[str, Any]:
        """What the pipeline reads: the views, or a study dict when the study has more than its images."""
        details = {"indication": self.indication, "history": self.history, "view_positions": self.view_positions}
        details = {key: value for key, value in details.items() if value}
        if self.prior_images:
            details["prior"] = {"images": self.prior_images}
        if self.boxes:
            details["boxes"] = self.boxes
        return {"images": list(self.images), **details} if details else tuple(self.images)


# --------------------------------------------------------------------------------------------------------------------
# Reading the inputs (streamed)
# --------------------------------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether `path` names a file taken as an image in an input folder (by suffix; hidden files excluded)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def walk_image_folders(root: Path) -> Iterator[tuple[Path, list[Path]]]:
    """Each folder under `root` (itself included, sorted, hidden ones skipped) with its image files, sorted by name."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        yield Path(folder), sorted(Path(folder) / name for name in files if is_image_file(Path(folder) / name))


def folder_studies(root: Path, group_by: str = "auto") -> Iterator[Study]:
    """
    The studies of an image folder (see the module docstring for the `group_by` rules).

    Args:
        root (`Path`): the folder.
        group_by (`str`, *optional*, defaults to `"auto"`): `"file"`, `"folder"`, or `"auto"` (`"folder"` when
            `root` has sub-folders, `"file"` otherwise).
    """
    if group_by == "auto":
        has_subfolders = any(entry.is_dir() and not entry.name.startswith(".") for entry in root.iterdir())
        group_by = "folder" if has_subfolders else "file"
    for folder, images in walk_image_folders(root):
        if group_by == "file":
            for image in images:
                yield Study(id=image.relative_to(root).as_posix(), images=[str(image)], source=str(image))
        elif images:
            study_id = root.name if folder == root else folder.relative_to(root).as_posix()
            yield Study(id=study_id, images=[str(image) for image in images], source=str(folder))


def manifest_study(record: dict[str, Any], manifest: Path, source: str, images: list[str]) -> Study:
    """A manifest record as a [`Study`]: checks its id, resolves its image paths against the manifest's folder."""
    study_id = record.get("id")
    study_id = "" if study_id is None else str(study_id).strip()
    if not study_id:
        raise ValueError(f"{source} has an empty `id`; every study needs one.")
    return Study(
        id=study_id,
        images=[str(manifest.parent / image) for image in images],  # an absolute path stays as it is
        source=source,
        indication=optional_text(record.get("indication")),
        history=optional_text(record.get("history")),
        view_positions=manifest_list(record.get("view_positions"), "view_positions", source) or None,
        prior_images=[
            str(manifest.parent / image) for image in manifest_list(record.get("prior_images"), "prior_images", source)
        ]
        or None,
        boxes=manifest_boxes(record.get("boxes"), source),
    )


def manifest_boxes(value: Any, source: str) -> list | None:
    """
    A manifest's `boxes` field: a JSON list with one entry per image (a JSON-lines value, or a CSV cell holding JSON),
    `None` when absent or empty. The boxes themselves are checked by the processor (an error row for that study).
    """
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: 'boxes' is not valid JSON: {error}.") from error
    if not isinstance(value, list):
        raise ValueError(
            f"{source}: 'boxes' must be a list with one list of boxes per image, got {type(value).__name__}."
        )
    return value or None


def optional_text(value: Any) -> str | None:
    """A manifest's text field: `None` when absent or empty."""
    return None if value in (None, "") else str(value)


def manifest_list(value: Any, key: str, source: str) -> list[str]:
    """A manifest's list field: a JSON list of strings, or a CSV cell of items separated by `;` or `|`."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [item.strip() for item in CSV_PATH_SEPARATOR.split(value) if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{source}: {key!r} must be a list of strings, got {value!r}.")
    return value


def csv_studies(manifest: Path) -> Iterator[Study]:
    """The studies of a CSV manifest with columns `id`, `images` (paths separated by `;` or `|`), `indication`."""
    with open(manifest, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [column for column in MANIFEST_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"The manifest {manifest} has no {' or '.join(repr(name) for name in missing)} column; a CSV manifest "
                f"needs the columns 'id' and 'images' (paths separated by ';' or '|'), and may have 'indication'. "
                f"Found columns: {reader.fieldnames or []}."
            )
        for record in reader:
            images = [path.strip() for path in CSV_PATH_SEPARATOR.split(record["images"] or "") if path.strip()]
            yield manifest_study(record, manifest, f"{manifest} line {reader.line_num}", images)


def jsonl_studies(manifest: Path) -> Iterator[Study]:
    """The studies of a JSON-lines manifest: one object per line, with the keys the module docstring lists."""
    with open(manifest, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            source = f"{manifest} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} is not valid JSON: {error}.") from error
            if not isinstance(record, dict):
                raise ValueError(f"{source} is a JSON {type(record).__name__}; each line must be an object.")
            missing = [key for key in MANIFEST_COLUMNS if key not in record]
            if missing:
                raise ValueError(
                    f"{source} has no {' or '.join(repr(key) for key in missing)} key; each line of a JSON-lines "
                    f"manifest needs 'id' and 'images' (a list of paths), and may have 'indication'. Found keys: "
                    f"{sorted(record)}."
                )
            images = record["images"]
            if isinstance(images, str):
                images = [images]
            if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
                raise ValueError(f"{source}: 'images' must be a list of paths, got {images!r}.")
            yield manifest_study(record, manifest, source, images)


def iter_studies(inputs: Sequence[str | os.PathLike], group_by: str = "auto") -> Iterator[Study]:
    """
    Stream the studies of every input: image folders, CSV / JSON-lines manifests and image files, in order.

    Args:
        inputs (`Sequence[str]`): the inputs.
        group_by (`str`, *optional*, defaults to `"auto"`): how image folders are split into studies.

    Raises:
        `FileNotFoundError`: an input does not exist.
        `ValueError`: a manifest lacks `id` / `images`, has an empty id or a line that is not a JSON object.
    """
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            yield from folder_studies(path, group_by)
        elif not path.exists():
            raise FileNotFoundError(
                f"Input not found: {path} (give image folders, .csv / .jsonl manifests or images)."
            )
        elif path.suffix.lower() == ".csv":
            yield from csv_studies(path)
        elif path.suffix.lower() == ".jsonl":
            yield from jsonl_studies(path)
        else:
            yield Study(id=os.fspath(given), images=[str(path)], source=str(path))


def count_studies(studies: Iterable[Study], finished_ids: set[str]) -> tuple[int, int]:
    """
    Check every study before the run: the number of studies, and of those among them not in `finished_ids`.

    Raises:
        `ValueError`: an id appears twice (across all inputs).
    """
    seen: set[str] = set()
    to_run = 0
    for study in studies:
        if study.id in seen:
            raise ValueError(
                f"The study id {study.id!r} appears more than once (again at {study.source}); ids must be unique "
                "across the inputs, since the output file and resuming key on them."
            )
        seen.add(study.id)
        to_run += study.id not in finished_ids
    return len(seen), to_run


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# --------------------------------------------------------------------------------------------------------------------
# The output file
# --------------------------------------------------------------------------------------------------------------------


def drop_incomplete_last_line(output: Path) -> None:
    """Truncate an output file after its last newline: a run killed mid-write may leave half a row there."""
    if not output.is_file() or output.stat().st_size == 0:
        return
    with open(output, "rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        file.truncate(file.read().rfind(b"\n") + 1)


def finished_study_ids(output: Path) -> set[str]:
    """The ids that already have a report row (not only error rows) in the output file; empty when it is absent."""
    finished: set[str] = set()
    if not output.is_file():
        return finished
    with open(output, encoding="utf-8") as file:
        for line in file:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row and "error" not in row:
                finished.add(str(row["id"]))
    return finished


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def check_model_folder(model_folder: str | os.PathLike) -> Path:
    """The path of a local checkpoint folder; raises `FileNotFoundError` when it, or its `config.json`, is missing."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Model folder not found: {folder}. `--model` takes a checkpoint folder, such as the outputs/demo that "
            "`python train.py` writes (download a Hub checkpoint first, e.g. with `hf download <repo> --local-dir`)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: it has no config.json.")
    return folder


def load_reporter(
    model_folder: str | os.PathLike, device: str | None = None, precision: str = "fp32", compile: bool = False
) -> CdanReportPipeline:
    """
    The report pipeline of a local checkpoint folder, with this library's classes (no remote code is run).

    Args:
        model_folder (`str` or `os.PathLike`): the checkpoint folder.
        device (`str`, *optional*): where to run; the first GPU if any, else the CPU.
        precision (`str`, *optional*, defaults to `"fp32"`): `"fp32"`, `"bf16"` or `"int8"` (see `inference_cdan`).
        compile (`bool`, *optional*, defaults to `False`): compile the visual extractor.

    Raises:
        `FileNotFoundError`: the folder, or its `config.json`, is missing.
    """
    folder = check_model_folder(model_folder)
    model = load_report_model(folder)
    processor = CdanProcessor.from_pretrained(folder)
    return CdanReportPipeline(model=model, processor=processor, device=device, precision=precision, compile=compile)


REPORT_MODEL_CLASSES = {
    "cdan": CdanForConditionalGeneration,
    "priorrg": PriorRGForConditionalGeneration,
    "d2r_net": D2RNetForConditionalGeneration,
}
"""The report models by the `model_type` of their `config.json`."""


def load_report_model(name_or_path: str | os.PathLike):
    """
    A CDAN, PriorRG or D2R-Net checkpoint in eval mode, by the `model_type` of its `config.json` (no remote code is
    run).
    """
    model_type = PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
    if model_type not in REPORT_MODEL_CLASSES:
        raise ValueError(
            f"{name_or_path} holds a {model_type!r} model; this library reads {sorted(REPORT_MODEL_CLASSES)}."
        )
    return REPORT_MODEL_CLASSES[model_type].from_pretrained(name_or_path).eval()


def describe_error(error: Exception) -> str:
    """An exception as the `error` of an output row: its type and message."""
    return f"{type(error).__name__}: {error}"


def report_rows(reporter: CdanReportPipeline, studies: list[Study], **call_kwargs) -> list[dict[str, Any]]:
    """
    One output row per study: the batch in one pipeline call, or, when that call fails, each study alone so that only
    the failing ones get an error row.

    Args:
        reporter ([`CdanReportPipeline`]): the pipeline.
        studies (`list[Study]`): the batch.
        call_kwargs: passed to the pipeline call (generation options, `return_labels`, ...).
    """
    start = time.perf_counter()
    try:
        results = reporter([study.pipeline_input() for study in studies], batch_size=len(studies), **call_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of one study becomes its error row
        if len(studies) == 1:
            return [{"id": studies[0].id, "error": describe_error(error)}]
        return [row for study in studies for row in report_rows(reporter, [study], **call_kwargs)]
    seconds = round((time.perf_counter() - start) / len(studies), 4)
    rows = []
    for study, (result,) in zip(studies, results):
        row: dict[str, Any] = {"id": study.id}
        for name in ("indication", "history"):
            if getattr(study, name) is not None:
                row[name] = getattr(study, name)
        row["report"] = result["generated_text"]
        row.update({name: result[name] for name in ("labels", "probabilities", "grounding") if name in result})
        row["seconds"] = seconds
        rows.append(row)
    return rows


def write_reports(args: ReportArguments) -> dict[str, int]:
    """
    Write a report row (or an error row) for every study of `args.inputs` that has no report in `args.output` yet.

    Returns:
        `dict[str, int]`: `reported`, `failed` (error rows written) and `skipped` (already reported) study counts.

    Raises:
        `FileNotFoundError`: the model folder or an input is missing.
        `ValueError`: a bad argument, a manifest without `id` / `images`, or duplicate ids.
    """
    if args.batch_size < 1:
        raise ValueError(f"`--batch_size` must be at least 1, got {args.batch_size}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads` must be at least 1, got {args.threads}.")
    model_folder = check_model_folder(args.model)
    output = Path(args.output)
    drop_incomplete_last_line(output)
    finished_ids = finished_study_ids(output)
    total, to_run = count_studies(iter_studies(args.inputs, args.group_by), finished_ids)
    counts = {"reported": 0, "failed": 0, "skipped": total - to_run}
    if to_run == 0:
        return counts
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reporter = load_reporter(model_folder, device=args.device, precision=args.precision, compile=args.compile)
    if args.grounding:
        reporter.check_grounding_model()
    call_kwargs: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("num_beams", "max_length", "no_repeat_ngram_size")
        if getattr(args, name) is not None
    }
    call_kwargs.update(
        ban_anonymisation_token=args.ban_anonymisation_token,
        on_degenerate_image=args.on_degenerate_image,
        return_labels=args.labels and getattr(reporter.model.config, "use_reverse_attention", False),
        return_grounding=args.grounding,
    )
    pending = (study for study in iter_studies(args.inputs, args.group_by) if study.id not in finished_ids)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as file, tqdm(total=to_run, desc="Reports", unit="study") as progress:
        for batch in batched(pending, args.batch_size):
            for row in report_rows(reporter, batch, **call_kwargs):
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["failed" if "error" in row else "reported"] += 1
            file.flush()
            progress.update(len(batch))
    return counts


def main(argv: list[str] | None = None) -> int:
    """
    The `cdan-report` command (see the module docstring).

    Args:
        argv (`list[str]`, *optional*): the arguments; `sys.argv[1:]` by default.

    Returns:
        `int`: the exit status: 0, 1 when some studies got an error row, 2 when nothing could run.
    """
    parser = HfArgumentParser(ReportArguments)
    parser.prog = "cdan-report"
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        counts = write_reports(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"cdan-report: error: {error}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    print(
        f"{counts['reported']} report(s) and {counts['failed']} error row(s) written to {args.output}; "
        f"{counts['skipped']} study(ies) already had a report.",
        file=sys.stderr,
    )
    return EXIT_SOME_STUDIES_FAILED if counts["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "IMAGE_SUFFIXES",
    "REPORT_MODEL_CLASSES",
    "ReportArguments",
    "Study",
    "check_model_folder",
    "count_studies",
    "csv_studies",
    "finished_study_ids",
    "folder_studies",
    "iter_studies",
    "jsonl_studies",
    "load_report_model",
    "load_reporter",
    "main",
    "manifest_boxes",
    "report_rows",
    "write_reports",
]
