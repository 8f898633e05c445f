"""The bad-input corpus of `scripts/bad_inputs.py`: every case, generated in code, with the outcome the project
promises for it (a clear error, a warning, a documented skip or a checked result), and the fixtures it needs.
"""

import functools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


AREAS = ("pipeline", "builders", "labeler", "evaluation")
EXPECTATIONS = ("error", "warning", "skip", "accept")
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_images" / "torchxrayvision_test_images"
FRONTAL_PNG = SHARED_IMAGES / "00000001_000.png"
LATERAL_PNG = SHARED_IMAGES / "00027426_000.png"
REAL_JPEG = SHARED_IMAGES / "16747_3_1.jpg"
DICOM_FILE = SHARED_IMAGES / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
TINY_REPORTS = (
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.",
    "There is a right upper lobe nodule. The heart is normal in size.",
)
"""Reports the tiny checkpoint's vocabulary is built from."""




# --------------------------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """
    One bad or unusual input.

    Attributes:
        area (`str`): one of `AREAS`.
        name (`str`): unique within the area.
        expected (`str`): one of `EXPECTATIONS`, the outcome the project promises.
        run (`Callable[[Workspace], Any]`): feeds the input to the project and returns its result.
        check (`Callable[[Any], str | None]`, *optional*): what is wrong with the returned value, or None.
        mentions (`str`, *optional*): a text a clear error's message must contain (case-insensitive).
        isolated (`bool`): run in a fresh interpreter that must exit within the timeout.
        fast (`bool`): part of the `--fast` subset.
    """

    area: str
    name: str
    expected: str
    run: Callable[["Workspace"], Any]
    check: Callable[[Any], str | None] | None = None
    mentions: str | None = None
    isolated: bool = False
    fast: bool = True

    @property
    def key(self) -> str:
        return f"{self.area}/{self.name}"


CASES: list[Case] = []


def add(area: str, name: str, expected: str, run: Callable[["Workspace"], Any], **options) -> None:
    """Register a case (see [`Case`])."""
    if area not in AREAS or expected not in EXPECTATIONS:
        raise ValueError(f"Bad case {area}/{name}: area {area!r}, expected {expected!r}.")
    if any(case.area == area and case.name == name for case in CASES):
        raise ValueError(f"Duplicate case name {area}/{name}.")
    CASES.append(Case(area, name, expected, run, **options))


class Workspace:
    """The fixtures of one worker: a temporary folder, written files and (pipeline area) a tiny saved checkpoint."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        """A fresh path in the workspace (the file or folder is removed when it exists)."""
        path = self.root / "cases" / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, name: str, data: bytes) -> Path:
        path = self.path(name)
        path.write_bytes(data)
        return path

    def save_image(self, name: str, image) -> Path:
        path = self.path(name)
        image.save(path)
        return path

    @functools.cached_property
    def checkpoint(self) -> Path:
        """A tiny random CDAN checkpoint written with `pipeline_cdan.save_checkpoint` (built once per run)."""
        directory = self.root / "checkpoint"
        if (directory / "model.safetensors").is_file():
            return directory
        import torch

        from configuration_cdan import CdanConfig
        from image_processing_cdan import CdanImageProcessor
        from modeling_cdan import CdanForConditionalGeneration
        from pipeline_cdan import save_checkpoint
        from processing_cdan import CdanProcessor

        processor = CdanProcessor.from_reports(
            list(TINY_REPORTS) * 3,
            threshold=1,
            report_cleaner="iu_xray",
            image_processor=CdanImageProcessor(image_size=64, num_views=2),
        )
        torch.manual_seed(0)
        # timm's 0.4 M-parameter `test_resnet`, one layer a side of width 32, and 32 decoder positions, so that
        # the length cases can go past `max_position_embeddings`.
        widths = {f"{part}_attention_heads": 4 for part in ("encoder", "decoder", "reverse")}
        widths.update({f"{part}_ffn_dim": 64 for part in ("encoder", "decoder")})
        widths.update({f"{part}_layers": 1 for part in ("encoder", "decoder")})
        config = CdanConfig(
            visual_extractor="test_resnet", num_views=2, vocab_size=len(processor.tokenizer), d_model=32,
            semantic_dim=24, max_position_embeddings=32, disease_top_k=3, init_std=0.5, tie_word_embeddings=False,
            **widths,
        )
        model = CdanForConditionalGeneration(config).eval()
        model.generation_config.update(max_length=12, num_beams=2)
        staging = self.root / "checkpoint.partial"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(model, processor, staging)
        staging.rename(directory)  # a worker killed while saving leaves no half-written checkpoint behind
        return directory

    @functools.cached_property
    def processor(self):
        from processing_cdan import CdanProcessor

        return CdanProcessor.from_pretrained(self.checkpoint)

    @functools.cached_property
    def model(self):
        from modeling_cdan import CdanForConditionalGeneration

        return CdanForConditionalGeneration.from_pretrained(self.checkpoint).eval()

    @functools.cached_property
    def reporter(self):
        from pipeline_cdan import CdanReportPipeline

        return CdanReportPipeline(model=self.model, processor=self.processor)

    def pixel_values(self, views: int = 2, size: int = 64):
        import torch

        return torch.zeros(1, views, 3, size, size)


def prepare(area: str, workspace: Workspace) -> None:
    """Import the area's modules and build its fixtures before the first case is timed."""
    if area == "pipeline":
        _ = workspace.reporter
    elif area == "builders":
        import data_cdan  # noqa: F401
    elif area == "labeler":
        import labeler_cdan  # noqa: F401
    elif area == "evaluation":
        import evaluation_cdan  # noqa: F401


# Checks of returned values: each returns what is wrong, or None.


def is_report_list(count: int = 1) -> Callable[[Any], str | None]:
    """The pipeline's answer for `count` studies: `[{"generated_text": str}]` (a list of those for a batch)."""

    def check(result: Any) -> str | None:
        answers = [result] if count == 1 else result
        if not isinstance(answers, list) or len(answers) != count:
            return f"expected {count} answer(s), got {result!r:.120}"
        for answer in answers:
            if not (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict)) or not isinstance(
                answer[0].get("generated_text"), str
            ):
                return f"expected [{{'generated_text': str}}], got {answer!r:.120}"
        return None

    return check


def equal_pair(what: str) -> Callable[[Any], str | None]:
    """The run returned `(value, reference value)`: they must be equal."""

    def check(result: Any) -> str | None:
        value, reference = result
        return None if value == reference else f"{what}: {value!r:.160} differs from {reference!r:.160}"

    return check


def score_equals(metric: str, value: float) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        observed = result.get(metric)
        if observed is not None and abs(observed - value) < 1e-9:
            return None
        return f"{metric} is {observed}, not {value}"

    return check


def fourteen_states(result: Any) -> str | None:
    from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN

    rows = result if result and isinstance(result[0], list) else [result]
    for row in rows:
        if len(row) != len(CHEXPERT_OBSERVATIONS) or not set(row) <= {POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED}:
            return f"not 14 label states: {row!r:.120}"
    return None


def nothing_mentioned(result: Any) -> str | None:
    from labeler_cdan import NOT_MENTIONED

    if problem := fourteen_states(result):
        return problem
    return None if set(result) == {NOT_MENTIONED} else f"labelled {result}, expected all NOT_MENTIONED"


def skipped(study_id: str, reason: str) -> Callable[[Any], str | None]:
    """The builder's summary (see [`prepare_dataset`]) lists `study_id` as skipped for `reason`."""

    def check(result: Any) -> str | None:
        if (study_id, reason) in result["skipped"]:
            return None
        return f"{study_id} not in skipped.json with reason {reason!r}; skipped: {result['skipped']}"

    return check


def study_counts(expected: dict[str, int]) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        return None if result["counts"] == expected else f"split sizes {result['counts']}, expected {expected}"

    return check


# ---- pipeline, processor and generation ----


def gray(width: int, height: int, value: int | None = None):
    """A greyscale PIL image: a gradient, or constant `value`."""
    import numpy as np
    import PIL.Image

    if value is not None:
        return PIL.Image.new("L", (width, height), value)
    pixels = np.add.outer(np.arange(height), np.arange(width)) % 256
    return PIL.Image.fromarray(pixels.astype(np.uint8), mode="L")


def gradient_array(dtype: str, height: int = 80, width: int = 80, channels: int | None = None):
    import numpy as np

    pixels = np.add.outer(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width)) / 2
    if channels:
        pixels = np.repeat(pixels[..., None], channels, axis=-1)
    if dtype == "uint16":
        return (pixels * 65535).astype(np.uint16)
    if dtype == "bool":
        return pixels > 0.5
    return pixels.astype(dtype)


def with_nan(workspace: "Workspace"):
    pixels = gradient_array("float32")
    pixels[3, 3] = float("nan")
    return workspace.reporter(pixels)


def with_inf(workspace: "Workspace"):
    pixels = gradient_array("float64")
    pixels[5, 5] = float("inf")
    return workspace.reporter(pixels)


def closed_image(workspace: "Workspace", load_first: bool):
    import PIL.Image

    image = PIL.Image.open(FRONTAL_PNG)
    if load_first:
        image.load()
    image.close()
    return workspace.reporter(image)


def sixteen_bit_png(workspace: "Workspace"):
    import PIL.Image

    image = PIL.Image.fromarray(gradient_array("uint16", 96, 96))
    return workspace.reporter(str(workspace.save_image("sixteen_bit.png", image)))


def mode_image(mode: str):
    def run(workspace: "Workspace"):
        return workspace.reporter(gray(96, 96).convert(mode))

    return run


def decompression_bomb(workspace: "Workspace"):
    import PIL.Image

    path = workspace.path("bomb.png")
    PIL.Image.new("1", (15000, 15000)).save(path, optimize=False)
    return workspace.reporter(str(path))


def generate(workspace: "Workspace", **generate_kwargs):
    return workspace.reporter(str(FRONTAL_PNG), **generate_kwargs)


def processor_call(**kwargs):
    def run(workspace: "Workspace"):
        return workspace.processor(**kwargs)

    return run


def model_generate(pixel_values: Callable[["Workspace"], Any], **generate_kwargs):
    def run(workspace: "Workspace"):
        return workspace.model.generate(pixel_values=pixel_values(workspace), **generate_kwargs)

    return run


def nan_pixel_values(workspace: "Workspace"):
    values = workspace.pixel_values()
    values[0, 0, 0, 0, 0] = float("nan")
    return values


def add_pipeline_cases() -> None:
    frontal, lateral = str(FRONTAL_PNG), str(LATERAL_PNG)
    area = "pipeline"
    add(area, "well-formed two-view study", "accept", lambda ws: ws.reporter((frontal, lateral)),
        check=is_report_list())
    add(area, "batch of two studies", "accept", lambda ws: ws.reporter([(frontal, lateral), (lateral, frontal)]),
        check=is_report_list(2))
    add(area, "pathlib.Path view", "accept", lambda ws: ws.reporter((FRONTAL_PNG, LATERAL_PNG)),
        check=is_report_list())
    add(area, "JPEG file", "accept", lambda ws: ws.reporter((str(REAL_JPEG), frontal)), check=is_report_list())
    add(area, "dict study", "accept", lambda ws: ws.reporter({"images": [frontal, lateral]}), check=is_report_list())
    add(area, "one view for a two-view model", "warning", lambda ws: ws.reporter(frontal), check=is_report_list())
    add(area, "missing file", "error", lambda ws: ws.reporter(str(ws.root / "no_such_image.png")),
        mentions="no_such_image.png")
    add(area, "directory path", "error", lambda ws: ws.reporter(str(SHARED_IMAGES)), mentions=SHARED_IMAGES.name)
    add(area, "empty path string", "error", lambda ws: ws.reporter(""))
    add(area, "http URL", "error", lambda ws: ws.reporter("https://example.org/cxr/frontal.png"),
        mentions="https://example.org/cxr/frontal.png")
    add(area, "DICOM file", "error", lambda ws: ws.reporter(str(DICOM_FILE)), mentions="DICOM")
    add(area, "truncated PNG", "error",
        lambda ws: ws.reporter(str(ws.write("truncated.png", FRONTAL_PNG.read_bytes()[:20000]))),
        mentions="truncated.png")
    add(area, "corrupt PNG (random bytes)", "error",
        lambda ws: ws.reporter(str(ws.write("corrupt.png", bytes(range(256)) * 64))), mentions="corrupt.png")
    add(area, "PNG signature then garbage", "error",
        lambda ws: ws.reporter(str(ws.write("garbage.png", FRONTAL_PNG.read_bytes()[:40] + b"\x00" * 4000))),
        mentions="garbage.png")
    add(area, "empty file", "error", lambda ws: ws.reporter(str(ws.write("empty.png", b""))), mentions="empty.png")
    add(area, "text file named .png", "error",
        lambda ws: ws.reporter(str(ws.write("report.png", b"The lungs are clear.\n"))), mentions="report.png")
    add(area, "closed PIL image", "error", lambda ws: closed_image(ws, load_first=False))
    add(area, "closed PIL image after load", "error", lambda ws: closed_image(ws, load_first=True))
    add(area, "three views for a two-view model", "error", lambda ws: ws.reporter((frontal, lateral, frontal)))
    add(area, "one of two studies with three views", "error",
        lambda ws: ws.reporter([(frontal, lateral), (frontal, lateral, frontal)]))
    add(area, "empty list", "error", lambda ws: ws.reporter([]))
    add(area, "empty tuple study", "error", lambda ws: ws.reporter([()]))
    add(area, "empty dict", "error", lambda ws: ws.reporter({}))
    add(area, "dict with empty images", "error", lambda ws: ws.reporter({"images": []}))
    add(area, "dict without images", "error", lambda ws: ws.reporter({"pixels": [frontal]}))
    add(area, "None", "error", lambda ws: ws.reporter(None))
    add(area, "int", "error", lambda ws: ws.reporter(3))
    add(area, "None view in a study", "error", lambda ws: ws.reporter((frontal, None)))
    add(area, "bytes of a PNG", "error", lambda ws: ws.reporter(FRONTAL_PNG.read_bytes()))
    add(area, "open file object", "error", lambda ws: ws.reporter(open(FRONTAL_PNG, "rb")))
    add(area, "torch tensor image", "error", lambda ws: ws.reporter(ws.pixel_values(views=1)[0, 0]))
    add(area, "studies nested too deep", "error", lambda ws: ws.processor(images=[[[frontal, lateral]]]))
    # Degenerate views are given as both views of a study, so that the one-view warning cannot stand in for theirs.
    add(area, "1x1 image", "warning", lambda ws: ws.reporter((gray(1, 1), gray(1, 1))), check=is_report_list())
    add(area, "1x5000 image", "warning", lambda ws: ws.reporter((gray(5000, 1), gray(5000, 1))),
        check=is_report_list())
    add(area, "constant image", "warning", lambda ws: ws.reporter((gray(96, 96, value=128), gray(96, 96, value=128))),
        check=is_report_list())
    add(area, "all-black PNG file", "warning",
        lambda ws: ws.reporter((str(ws.save_image("black.png", gray(96, 96, value=0))), frontal)),
        check=is_report_list())
    add(area, "boolean array", "warning", lambda ws: ws.reporter((gradient_array("bool"), gradient_array("bool"))),
        check=is_report_list())
    add(area, "NaN pixel", "error", with_nan)
    add(area, "infinite pixel", "error", with_inf)
    add(area, "16-bit PNG", "accept", sixteen_bit_png, check=is_report_list())
    add(area, "uint16 array", "accept", lambda ws: ws.reporter(gradient_array("uint16")), check=is_report_list())
    add(area, "float array in [0, 1]", "accept", lambda ws: ws.reporter(gradient_array("float32")),
        check=is_report_list())
    add(area, "RGBA image", "accept", mode_image("RGBA"), check=is_report_list())
    add(area, "LA image", "accept", mode_image("LA"), check=is_report_list())
    add(area, "palette image", "accept", mode_image("P"), check=is_report_list())
    add(area, "CMYK image", "accept", mode_image("CMYK"), check=is_report_list())
    add(area, "channels-first array", "error", lambda ws: ws.reporter(gradient_array("float32", channels=3).T))
    add(area, "two-channel array", "error", lambda ws: ws.reporter(gradient_array("float32", channels=2)))
    add(area, "complex array", "error", lambda ws: ws.reporter(gradient_array("complex64")))
    add(area, "decompression bomb PNG", "error", decompression_bomb, fast=False)
    add(area, "num_beams=0", "error", lambda ws: generate(ws, num_beams=0), mentions="num_beams")
    add(area, "num_beams=-1", "error", lambda ws: generate(ws, num_beams=-1), mentions="num_beams")
    add(area, "max_length beyond max_position_embeddings", "error", lambda ws: generate(ws, max_length=100),
        mentions="max_position_embeddings")
    add(area, "max_new_tokens beyond max_position_embeddings", "error", lambda ws: generate(ws, max_new_tokens=100),
        mentions="max_position_embeddings")
    add(area, "min_new_tokens beyond max_position_embeddings", "error",
        lambda ws: generate(ws, min_new_tokens=100, max_length=100), mentions="max_position_embeddings")
    add(area, "max_length=0", "error", lambda ws: generate(ws, max_length=0), mentions="max_length")
    add(area, "num_return_sequences above num_beams", "error", lambda ws: generate(ws, num_return_sequences=5),
        mentions="num_return_sequences")
    add(area, "unknown generation argument", "error", lambda ws: generate(ws, beams=4), mentions="beams")
    add(area, "processor return_tensors='tf'", "error", processor_call(images=frontal, return_tensors="tf"),
        mentions="return_tensors")
    add(area, "processor return_tensors=5", "error", processor_call(images=frontal, return_tensors=5),
        mentions="return_tensors")
    add(area, "processor return_tensors='np'", "accept",
        processor_call(images=[(frontal, lateral)], return_tensors="np"),
        check=lambda result: None if result["pixel_values"].shape == (1, 2, 3, 64, 64) else "wrong shape")
    add(area, "processor with neither images nor text", "error", processor_call())
    add(area, "processor text=123", "error", processor_call(text=123))
    add(area, "processor text=[]", "error", processor_call(text=[]))
    add(area, "processor text=[None]", "error", processor_call(text=[None]))
    add(area, "processor two studies, one report", "error",
        processor_call(images=[(frontal, lateral), (lateral, frontal)], text=["The lungs are clear."]))
    add(area, "processor max_length=0", "error", processor_call(text=["The lungs are clear."], max_length=0))
    add(area, "image processor image_size=0", "error",
        lambda ws: __import__("image_processing_cdan").CdanImageProcessor(image_size=0))
    add(area, "image processor num_views=0", "error",
        lambda ws: __import__("image_processing_cdan").CdanImageProcessor(num_views=0))
    add(area, "image processor unknown argument", "error",
        lambda ws: ws.processor.image_processor(frontal, resample="nearest"))
    add(area, "generate without pixel_values", "error", model_generate(lambda ws: None))
    add(area, "generate with 4-D pixel_values", "error", model_generate(lambda ws: ws.pixel_values()[0]))
    add(area, "generate with three views", "error", model_generate(lambda ws: ws.pixel_values(views=3)))
    add(area, "generate with an empty batch", "error", model_generate(lambda ws: ws.pixel_values()[:0]))
    add(area, "generate with NaN pixel_values", "error", model_generate(nan_pixel_values))
    add(area, "generate num_beams=0", "error", model_generate(lambda ws: ws.pixel_values(), num_beams=0),
        mentions="num_beams")
    add(area, "decode a batch with decode()", "error", lambda ws: ws.processor.decode([[4, 5], [5, 6]]))


# ---- builders ----


TRAIN_ID = "CXR9001_IM-0001"
"""The first training study of the generated IU X-Ray annotation (the one the cases break)."""


def base_annotation() -> dict[str, list[dict]]:
    """A small R2Gen IU X-Ray annotation: two two-view studies per split, with real-looking findings."""
    annotation: dict[str, list[dict]] = {}
    for offset, split in enumerate(("train", "val", "test")):
        annotation[split] = []
        for index in range(2):
            study_id = f"CXR{9001 + 2 * offset + index}_IM-{1 + 2 * offset + index:04d}"
            annotation[split].append(
                {
                    "id": study_id,
                    "report": TINY_REPORTS[(offset + index) % len(TINY_REPORTS)],
                    "image_path": [f"{study_id}/0.png", f"{study_id}/1.png"],
                    "split": split,
                }
            )
    return annotation


def edited(change: Callable[[dict[str, list[dict]]], Any]) -> Callable[[], dict[str, list[dict]]]:
    """The base annotation changed in place by `change` (built when the case runs)."""

    def build() -> dict[str, list[dict]]:
        annotation = base_annotation()
        change(annotation)
        return annotation

    return build


def iu_layout(workspace: "Workspace", name: str, annotation: Any = None, text: str | bytes | None = None) -> Path:
    """An R2Gen IU X-Ray folder with real images; `text` (or `annotation` as JSON) becomes `annotation.json`."""
    from data_cdan.testing import real_pngs, write_r2gen_layout

    folder = workspace.path(name)
    write_r2gen_layout(folder, base_annotation() if annotation is None else annotation, real_pngs())
    if text is not None:
        (folder / "annotation.json").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


def prepare_dataset(workspace: "Workspace", name: str, data_dir: Path | str, dataset: str = "iu_xray", **options):
    """Prepare a dataset into a fresh cache; the split sizes and the (id, reason) pairs of `skipped.json`."""
    from data_cdan import load_cdan_dataset

    cache = workspace.path(f"{name}-cache")
    prepared = load_cdan_dataset(dataset, data_dir=data_dir, cache_dir=cache, **options)
    skipped_files = sorted(cache.rglob("skipped.json"))
    records = json.loads(skipped_files[0].read_text())["skipped"] if skipped_files else []
    return {
        "counts": {split: len(rows) for split, rows in prepared.items()},
        "skipped": [(record["id"], record["reason"]) for record in records],
    }


def iu_case(name: str, annotation: Callable[[], Any] | None = None, text: str | bytes | None = None, **options):
    """A run that writes an IU X-Ray layout (edited annotation, or raw annotation text) and prepares it."""

    def run(workspace: "Workspace"):
        folder = iu_layout(workspace, name, annotation() if annotation else None, text)
        return prepare_dataset(workspace, name, folder, **options)

    return run


def broken_image(name: str, kind: str, **options):
    """Replace the first image of the first training study: `missing`, `broken link`, `corrupt` or `truncated`."""

    def run(workspace: "Workspace"):
        folder = iu_layout(workspace, name)
        image = folder / "images" / TRAIN_ID / "0.png"
        source = image.resolve()
        image.unlink()
        if kind == "corrupt":
            image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
        elif kind == "truncated":
            image.write_bytes(source.read_bytes()[:5000])
        elif kind == "broken link":
            os.symlink(folder / "nowhere.png", image)
        return prepare_dataset(workspace, name, folder, **options)

    return run


def mimic_case(name: str, change: Callable[[Path], Any], **options):
    """A generated MIMIC-CXR folder (data_cdan.testing), changed by `change(folder)`, then prepared."""

    def run(workspace: "Workspace"):
        from data_cdan.testing import generate_mimic_studies, write_mimic_fixture

        folder = write_mimic_fixture(workspace.path(name), generate_mimic_studies(8, seed=3))
        change(folder)
        return prepare_dataset(workspace, name, folder, dataset="mimic_cxr", **options)

    return run


def mimic_annotation_edit(edit: Callable[[dict], Any]) -> Callable[[Path], Any]:
    def change(folder: Path) -> None:
        annotation = json.loads((folder / "annotation.json").read_text())
        edit(annotation)
        (folder / "annotation.json").write_text(json.dumps(annotation))

    return change


def first_entry(annotation: dict[str, list[dict]]) -> dict:
    return next(entries[0] for entries in annotation.values() if entries)


def remove(name: str) -> Callable[[Path], Any]:
    return lambda folder: (folder / name).unlink()


def replace_text(name: str, text: str) -> Callable[[Path], Any]:
    return lambda folder: (folder / name).write_text(text)


def rename_column(name: str, column: str, new_name: str) -> Callable[[Path], Any]:
    def change(folder: Path) -> None:
        header, rest = (folder / name).read_text().split("\n", 1)
        cells = [new_name if cell == column else cell for cell in header.split(",")]
        (folder / name).write_text(",".join(cells) + "\n" + rest)

    return change


def add_builder_cases() -> None:
    area = "builders"
    some = {"train": 2, "validation": 2, "test": 2}
    mismatch = edited(lambda a: a["train"][0].update(split="test"))
    dev_split = edited(lambda a: a.update(dev=a.pop("val")))
    duplicate = edited(lambda a: a["test"].append(dict(a["train"][0], split="test")))
    add(area, "well-formed IU X-Ray layout", "accept", iu_case("valid"), check=study_counts(some))
    add(area, "split named val", "accept", iu_case("val-split"), check=study_counts(some))
    add(area, "annotation {}", "error", iu_case("empty-object", text="{}"), mentions="annotation")
    add(area, "annotation []", "error", iu_case("list", text="[]"), mentions="annotation.json")
    add(area, "empty annotation file", "error", iu_case("empty-file", text=""), mentions="annotation.json")
    add(area, "annotation not UTF-8", "error",
        iu_case("latin-1", text=json.dumps(base_annotation(), ensure_ascii=False).replace("heart", "c\u0153ur")
                .encode("cp1252")), mentions="annotation.json")
    add(area, "text after the closing brace", "error",
        iu_case("trailing-text", text=json.dumps(base_annotation()) + '\n{"train": []}'),
        mentions="annotation.json")
    add(area, "malformed JSON", "error", iu_case("malformed", text=json.dumps(base_annotation())[:-40]),
        mentions="annotation.json")
    add(area, "split value not a list", "error", iu_case("split-object", text='{"train": {"id": "x"}}'),
        mentions="annotation.json")
    add(area, "entry is a string", "error",
        iu_case("string-entry", text=json.dumps({**base_annotation(), "test": ["CXR9005_IM-0005"]})),
        mentions="test[0]")
    add(area, "entry split disagrees with its key", "error", iu_case("split-mismatch", mismatch), mentions=TRAIN_ID)
    add(area, "entry split disagrees with its key, skip", "skip",
        iu_case("split-mismatch-skip", mismatch, on_unknown_split="skip"), check=skipped(TRAIN_ID, "unknown_split"))
    add(area, "unknown split key", "error", iu_case("unknown-split", dev_split), mentions="dev")
    add(area, "unknown split key, skip", "skip", iu_case("unknown-split-skip", dev_split, on_unknown_split="skip"),
        check=skipped("CXR9003_IM-0003", "unknown_split"))
    add(area, "duplicate id", "error", iu_case("duplicate", duplicate), mentions=TRAIN_ID)
    add(area, "duplicate id, skip", "skip", iu_case("duplicate-skip", duplicate, on_duplicate_id="skip"),
        check=skipped(TRAIN_ID, "duplicate_id"))
    add(area, "empty findings", "skip", iu_case("empty-findings", edited(lambda a: a["train"][0].update(report=""))),
        check=skipped(TRAIN_ID, "empty_findings"))
    add(area, "whitespace findings", "skip",
        iu_case("blank-findings", edited(lambda a: a["train"][0].update(report=" \n\t "))),
        check=skipped(TRAIN_ID, "empty_findings"))
    add(area, "entry without id", "error", iu_case("no-id", edited(lambda a: a["train"][0].pop("id"))),
        mentions="train[0]")
    add(area, "report is None", "error", iu_case("none-report", edited(lambda a: a["train"][0].update(report=None))),
        mentions=TRAIN_ID)
    add(area, "report is a number", "error",
        iu_case("number-report", edited(lambda a: a["train"][0].update(report=42))), mentions=TRAIN_ID)
    add(area, "image_path is a string", "error",
        iu_case("string-image-path", edited(lambda a: a["train"][0].update(image_path=f"{TRAIN_ID}/0.png"))),
        mentions=TRAIN_ID)
    add(area, "image_path is empty", "skip",
        iu_case("no-images", edited(lambda a: a["train"][0].update(image_path=[]))),
        check=skipped(TRAIN_ID, "too_few_images"))
    add(area, "missing image", "error", broken_image("missing-image", "missing"), mentions=TRAIN_ID)
    add(area, "missing image, skip", "skip", broken_image("missing-image-skip", "missing", on_missing_image="skip"),
        check=skipped(TRAIN_ID, "missing_image"))
    add(area, "broken image symlink", "error", broken_image("broken-link", "broken link"), mentions=TRAIN_ID)
    add(area, "unreadable image", "error", broken_image("corrupt-image", "corrupt"), mentions=TRAIN_ID)
    add(area, "unreadable image, skip", "skip", broken_image("corrupt-image-skip", "corrupt", on_bad_image="skip"),
        check=skipped(TRAIN_ID, "bad_image"))
    add(area, "truncated image", "error", broken_image("truncated-image", "truncated"), mentions=TRAIN_ID)
    add(area, "data_dir does not exist", "error",
        lambda ws: prepare_dataset(ws, "no-dir", ws.root / "no_such_folder"), mentions="no_such_folder")
    add(area, "data_dir is a file", "error", lambda ws: prepare_dataset(ws, "file-dir", FRONTAL_PNG),
        mentions=FRONTAL_PNG.name)
    add(area, "data_dir without images/", "error",
        lambda ws: prepare_dataset(ws, "no-images", ws.write("no-images/annotation.json",
                                                            json.dumps(base_annotation()).encode()).parent),
        mentions="images")
    add(area, "unknown dataset name", "error", lambda ws: prepare_dataset(ws, "bad-name", ws.root, dataset="iu-xray"),
        mentions="iu-xray")
    add(area, "unknown policy value", "error", iu_case("bad-policy", on_missing_image="ignore"), mentions="ignore")
    add(area, "misspelt builder option", "error", iu_case("bad-option", on_missing_images="skip"),
        mentions="on_missing_images")
    add(area, "max_studies_per_split=0", "error", iu_case("zero-limit", max_studies_per_split=0),
        mentions="max_studies_per_split")
    add(area, "cache_dir is a file", "error",
        lambda ws: __import__("data_cdan").load_cdan_dataset(
            "iu_xray", data_dir=iu_layout(ws, "file-cache"), cache_dir=ws.write("cache-file", b"x")),
        mentions="cache-file", fast=False)
    add(area, "MIMIC well-formed", "accept", mimic_case("mimic-valid", lambda folder: None),
        check=lambda result: None if sum(result["counts"].values()) > 0 else "no study prepared")
    add(area, "MIMIC missing metadata table", "error",
        mimic_case("mimic-no-metadata", remove("mimic-cxr-2.0.0-metadata.csv")), mentions="metadata")
    add(area, "MIMIC missing chexpert table", "error",
        mimic_case("mimic-no-chexpert", remove("mimic-cxr-2.0.0-chexpert.csv")), mentions="chexpert")
    add(area, "MIMIC missing split table", "accept",
        mimic_case("mimic-no-split", remove("mimic-cxr-2.0.0-split.csv")),
        check=lambda result: None if sum(result["counts"].values()) > 0 else "no study prepared")
    add(area, "MIMIC empty metadata table", "error",
        mimic_case("mimic-empty-metadata", replace_text("mimic-cxr-2.0.0-metadata.csv", "")), mentions="metadata")
    add(area, "MIMIC metadata without ViewPosition", "error",
        mimic_case("mimic-no-view-column", rename_column("mimic-cxr-2.0.0-metadata.csv", "ViewPosition", "View")),
        mentions="ViewPosition")
    add(area, "MIMIC missing annotation", "error", mimic_case("mimic-no-annotation", remove("annotation.json")),
        mentions="annotation.json")
    add(area, "MIMIC entry without study_id", "error",
        mimic_case("mimic-no-study-id", mimic_annotation_edit(lambda a: first_entry(a).pop("study_id"))),
        mentions="study_id")
    add(area, "MIMIC annotation {}", "error", mimic_case("mimic-empty", replace_text("annotation.json", "{}")),
        mentions="annotation")


# ---- labeler ----


def long_sentence() -> str:
    return "no pleural effusion or pneumothorax and " * 32000 + "no pneumonia."


def label_pair(text: str, reference: str) -> Callable[["Workspace"], tuple]:
    def run(workspace: "Workspace"):
        from labeler_cdan import label_report

        return label_report(text), label_report(reference)

    return run


def labeler_call(function: str, argument: Any) -> Callable[["Workspace"], Any]:
    def run(workspace: "Workspace"):
        import labeler_cdan

        return getattr(labeler_cdan, function)(argument)

    return run


def add_labeler_cases() -> None:
    area = "labeler"
    sentence = "Small left pleural effusion. No pneumothorax."
    add(area, "label_report(123)", "error", labeler_call("label_report", 123))
    add(area, "label_report(bytes)", "error", labeler_call("label_report", sentence.encode()))
    add(area, "label_report(None)", "error", labeler_call("label_report", None))
    add(area, "label_report(float NaN)", "error", labeler_call("label_report", float("nan")))
    add(area, "label_report(list)", "error", labeler_call("label_report", [sentence]))
    add(area, "label_reports(plain string)", "error", labeler_call("label_reports", sentence))
    add(area, "label_reports(bytes)", "error", labeler_call("label_reports", sentence.encode()))
    add(area, "label_reports(None)", "error", labeler_call("label_reports", None))
    add(area, "label_reports([None])", "error", labeler_call("label_reports", [sentence, None]))
    add(area, "label_reports([123])", "error", labeler_call("label_reports", [123]))
    add(area, "label_reports(dict)", "error", labeler_call("label_reports", {"a": sentence}))
    add(area, "label_reports([])", "accept", labeler_call("label_reports", []),
        check=lambda result: None if result == [] else f"expected [], got {result}")
    add(area, "label_reports(generator)", "accept", labeler_call("label_reports", (text for text in [sentence])),
        check=fourteen_states)
    add(area, "label_reports(tuple)", "accept", labeler_call("label_reports", (sentence, sentence)),
        check=fourteen_states)
    add(area, "empty string", "accept", labeler_call("label_report", ""), check=fourteen_states)
    add(area, "whitespace only", "accept", label_pair(" \n\t ", ""), check=equal_pair("labels of blank text"))
    add(area, "non-English text", "accept",
        labeler_call("label_report", "Le cœur est de taille normale. Pas d'épanchement pleural."),
        check=fourteen_states)
    # Documented: text with letters but none of the Latin alphabet is all NOT_MENTIONED ("No Finding" included).
    add(area, "Chinese text", "accept", labeler_call("label_report", "心脏大小正常。无胸腔积液。"),
        check=nothing_mentioned)
    add(area, "full-width text", "accept",
        label_pair("ＳＭＡＬＬ ＬＥＦＴ ＰＬＥＵＲＡＬ ＥＦＦＵＳＩＯＮ．ＮＯ ＰＮＥＵＭＯＴＨＯＲＡＸ．", sentence),
        check=equal_pair("labels of full-width text"))
    add(area, "upper-case text", "accept", label_pair(sentence.upper(), sentence), check=equal_pair("labels"))
    add(area, "newlines inside sentences", "accept",
        label_pair("Small left pleural\neffusion.\r\nNo\tpneumothorax.", sentence), check=equal_pair("labels"))
    add(area, "non-breaking spaces", "accept", label_pair(sentence.replace(" ", "\u00a0"), sentence),
        check=equal_pair("labels"))
    add(area, "NUL and control characters", "accept", label_pair(sentence + "\x00\x07", sentence),
        check=equal_pair("labels"))
    add(area, "emoji", "accept", label_pair(sentence + " 🙂", sentence), check=equal_pair("labels"))
    # Documented: a sentence over `MAX_SENTENCE_WORDS` words is cut into pieces, with a warning.
    add(area, "32,000 repeats without a full stop", "warning",
        lambda ws: labeler_call("label_report", long_sentence())(ws),
        check=fourteen_states)
    add(area, "100,000 short sentences", "accept",
        label_pair("No pneumothorax. " * 100000, "No pneumothorax."), check=equal_pair("labels"), fast=False)
    add(area, "no_finding_rule='loose'", "error",
        lambda ws: __import__("labeler_cdan").CheXpertRuleLabeler(no_finding_rule="loose"))
    add(area, "to_binary uncertain_as=2", "error",
        lambda ws: __import__("labeler_cdan").to_binary([1, 0], uncertain_as=2))
    add(area, "to_binary unknown state", "error", lambda ws: __import__("labeler_cdan").to_binary([7]))


# ---- evaluation ----


def evaluation(function: str, *arguments, **keywords) -> Callable[["Workspace"], Any]:
    def run(workspace: "Workspace"):
        import evaluation_cdan

        return getattr(evaluation_cdan, function)(*arguments, **keywords)

    return run


def normalised_pair(references: list[str], predictions: list[str], with_meteor: bool = True):
    """NLG scores of the texts as given, and of the same texts with whitespace runs collapsed to one space."""

    def run(workspace: "Workspace"):
        from evaluation_cdan import compute_nlg_metrics

        def collapse(texts: list[str]) -> list[str]:
            return [" ".join(text.split()) for text in texts]

        return (
            compute_nlg_metrics(references, predictions, with_meteor=with_meteor),
            compute_nlg_metrics(collapse(references), collapse(predictions), with_meteor=with_meteor),
        )

    return run


def long_report(words: int) -> str:
    vocabulary = "the heart is normal in size and the lungs are clear without effusion or pneumothorax".split()
    return " ".join(vocabulary[index % len(vocabulary)] for index in range(words))


def add_evaluation_cases() -> None:
    area = "evaluation"
    report = "the heart is normal in size . the lungs are clear ."
    other = "mild cardiomegaly . small left pleural effusion ."
    findings = "There is cardiomegaly. Small left pleural effusion. Right lower lobe consolidation."
    add(area, "NLG strings instead of lists", "error",
        evaluation("compute_nlg_metrics", "abc", "abd", with_meteor=False))
    add(area, "CE strings instead of lists", "error", evaluation("compute_clinical_efficacy", report, report))
    add(area, "NLG None in references", "error",
        evaluation("compute_nlg_metrics", [None], [report], with_meteor=False))
    add(area, "NLG None in predictions", "error",
        evaluation("compute_nlg_metrics", [report], [None], with_meteor=False))
    add(area, "NLG int in predictions", "error", evaluation("compute_nlg_metrics", [report], [3], with_meteor=False))
    add(area, "CE None in predictions", "error", evaluation("compute_clinical_efficacy", [report], [None]))
    add(area, "CE None in references", "error", evaluation("compute_clinical_efficacy", [None], [report]))
    # A line break in a text desynchronised pycocoevalcap's line protocol with METEOR's Java process: the score
    # hung, or the interpreter hung at exit. One METEOR run: the texts are equal once whitespace is collapsed.
    add(area, "NLG newline in a prediction (METEOR)", "accept",
        evaluation("compute_nlg_metrics", [report], [report.replace(" . ", " .\n")]), isolated=True,
        check=lambda result: score_equals("BLEU-4", 1.0)(result)
        or (None if result["METEOR"] >= 0.99 else f"METEOR {result['METEOR']} of texts equal but for a newline"))
    add(area, "NLG newline in a reference (METEOR)", "accept",
        normalised_pair(["the heart is normal .\n\nthe lungs are clear ."], [report]),
        check=equal_pair("scores of the text with a newline"), isolated=True, fast=False)
    add(area, "NLG carriage return in a prediction (METEOR)", "accept",
        normalised_pair([report], ["the heart is normal in size .\rthe lungs are clear ."]),
        check=equal_pair("scores of the text with a carriage return"), isolated=True, fast=False)
    add(area, "NLG tabs and double spaces", "accept",
        normalised_pair([report], ["the  heart\tis normal in size .  the lungs are clear ."], with_meteor=False),
        check=equal_pair("scores of the text with tabs"))
    add(area, "NLG 20,000-word texts", "accept",
        evaluation("compute_nlg_metrics", [long_report(20000)], [long_report(20000)]),
        check=score_equals("BLEU-4", 1.0))
    add(area, "NLG 20,000-word prediction, short reference", "accept",
        evaluation("compute_nlg_metrics", [report], [long_report(20000)], with_meteor=False),
        check=lambda result: None if 0 <= result["BLEU-4"] < 0.01 else f"BLEU-4 {result['BLEU-4']}")
    add(area, "NLG empty prediction and empty reference", "error",
        evaluation("compute_nlg_metrics", [""], [""], with_meteor=False))
    add(area, "NLG empty reference", "error", evaluation("compute_nlg_metrics", [""], [report], with_meteor=False))
    add(area, "NLG blank reference", "error", evaluation("compute_nlg_metrics", [" \n "], [report], with_meteor=False))
    add(area, "NLG empty prediction", "accept", evaluation("compute_nlg_metrics", [report], [""]), fast=False,
        check=lambda result: None if result["BLEU-1"] < 1e-6 and result["METEOR"] == 0 else f"scores {result}")
    add(area, "NLG [] and []", "error", evaluation("compute_nlg_metrics", [], [], with_meteor=False))
    add(area, "NLG mismatched lengths", "error",
        evaluation("compute_nlg_metrics", [report, other], [report], with_meteor=False))
    add(area, "CE [] and []", "error", evaluation("compute_clinical_efficacy", [], []))
    add(area, "CE mismatched lengths", "error", evaluation("compute_clinical_efficacy", [report], [report, other]))
    add(area, "NLG identical reports", "accept",
        evaluation("compute_nlg_metrics", [report, other], [report, other], with_meteor=False),
        check=score_equals("BLEU-4", 1.0))
    add(area, "CE identical reports with findings", "accept",
        evaluation("compute_clinical_efficacy", [findings, report], [findings, report]),
        check=lambda result: (
            score_equals("CE macro-F1 (observed)", 1.0)(result) or score_equals("CE micro-F1", 1.0)(result)
        ))
    add(area, "CE identical normal reports", "accept",
        evaluation("compute_clinical_efficacy", [report] * 3, [report] * 3),
        check=lambda result: (
            score_equals("CE macro-F1 (observed)", 1.0)(result) or score_equals("CE example-F1", 1.0)(result)
        ))
    add(area, "NLG tuples", "accept", evaluation("compute_nlg_metrics", (report,), (report,), with_meteor=False),
        check=score_equals("BLEU-1", 1.0))
    add(area, "NLG numpy arrays of str", "accept",
        lambda ws: evaluation("compute_nlg_metrics", *[__import__("numpy").array([report, other])] * 2,
                              with_meteor=False)(ws), check=score_equals("BLEU-1", 1.0))
    add(area, "NLG generators", "accept",
        evaluation("compute_nlg_metrics", (text for text in [report]), (text for text in [report]), with_meteor=False),
        check=score_equals("BLEU-1", 1.0))
    add(area, "NLG full-width prediction", "accept",
        evaluation("compute_nlg_metrics", [report], ["ｔｈｅ ｈｅａｒｔ ｉｓ ｎｏｒｍａｌ"], with_meteor=False),
        check=lambda result: None if 0 <= result["BLEU-1"] <= 1 else f"BLEU-1 {result['BLEU-1']}")
    add(area, "most_frequent_report([])", "error", evaluation("most_frequent_report", []))
    add(area, "most_frequent_report(string)", "error", evaluation("most_frequent_report", report))
    add(area, "most_frequent_report([None])", "error", evaluation("most_frequent_report", [None, None]))
    add(area, "most_frequent_report ties", "accept",
        evaluation("most_frequent_report", [other, report, report, other]),
        check=lambda result: None if result == other else f"got {result!r}, expected the first of the tied reports")
    add(area, "best_constant_report([] train)", "error", evaluation("best_constant_report", [], [report]))
    add(area, "best_constant_report([] validation)", "error", evaluation("best_constant_report", [report], []))
    add(area, "best_constant_report(strings)", "error", evaluation("best_constant_report", report, other))
    add(area, "best_constant_report(None in train)", "error", evaluation("best_constant_report", [None], [report]))
    add(area, "best_constant_report empty reference", "error", evaluation("best_constant_report", [report], [""]))
    add(area, "shuffled_image_predictions one study", "error", evaluation("shuffled_image_predictions", [report]))


add_pipeline_cases()
add_builder_cases()
add_labeler_cases()
add_evaluation_cases()


__all__ = ["AREAS", "CASES", "EXPECTATIONS", "Case", "Workspace", "add", "prepare"]
