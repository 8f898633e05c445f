"""
Lesion bounding boxes for D2R-Net-style report generation: the box record and its `datasets` column, readers of the
public box files (VinDr-CXR, NIH ChestX-ray14, COCO JSON such as TBX11K), validation, rescaling and padding, and the
JSON-lines box file a detector writes (`detection_cdan.write_box_file`) with its per-study `boxes` column values.

Every box is `x_min, y_min, x_max, y_max` in pixels of one stated image (the image the file annotates, until
[`rescale_boxes`] maps it to another size), with its `label`, its `score` (1.0 for annotations) and its `source`
(`"annotated"` or `"pseudo"`). Sizes are always `(width, height)`, as `PIL.Image.size` gives them (numpy and torch
shapes are `(height, width)`).
"""

import csv
import gzip
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from datasets.features import List, Value

from .base import CdanDataError


ANNOTATED, PSEUDO = "annotated", "pseudo"
BOX_SOURCES = (ANNOTATED, PSEUDO)
"""Allowed values of `LesionBox.source`: drawn by a person, or predicted by a detector."""

BOX_FEATURES = List(
    {
        "x_min": Value("float32"),
        "y_min": Value("float32"),
        "x_max": Value("float32"),
        "y_max": Value("float32"),
        "label": Value("string"),
        "score": Value("float32"),
        "source": Value("string"),
    }
)
"""
The `datasets` feature of a column of lesion boxes: per example a list of dicts (one per box, the fields of
[`LesionBox`]), which is what `dataset[i][column]` returns. Coordinates and scores are stored as float32 (1/64 px
resolution at 4096 px and below).
"""

VINDR_LOCAL_LABELS = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
)
"""The 22 local (boxed) lesion classes of VinDr-CXR, spelled as in its `class_name` column."""

VINDR_NO_FINDING = "No finding"
"""VinDr-CXR's `class_name` of a row that says the radiologist found nothing (its coordinates are empty)."""

VINDR_COLUMNS = ("image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max")
"""Columns of VinDr-CXR's `annotations_train.csv` / `annotations_test.csv` (others, e.g. Kaggle's `class_id`, are
ignored)."""

NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
"""The 8 classes of NIH ChestX-ray14's `BBox_List_2017.csv`, spelled as there (`Infiltrate`, where the image labels of
`Data_Entry_2017.csv` say `Infiltration`)."""

NIH_IMAGE_SIZE = (1024, 1024)
"""`(width, height)` of every NIH ChestX-ray14 PNG, the pixels `BBox_List_2017.csv` is in."""

BOX_DROP_REASONS = ("non_finite", "inverted", "zero_area", "outside", "over_max_boxes")
"""Why [`clean_boxes`] drops a box, in the order the checks are made."""


@dataclass(frozen=True, slots=True)
class LesionBox:
    """
    One lesion box in pixels of a stated image.

    Args:
        x_min, y_min, x_max, y_max (`float`): corners, `x` to the right and `y` down from the top-left corner of the
            image. Not checked here (a file may hold NaN or inverted boxes); [`clean_boxes`] drops those.
        label (`str`): the lesion class, as the data set spells it.
        score (`float`, *optional*, defaults to 1.0): the confidence; 1.0 for annotations.
        source (`str`, *optional*, defaults to `"annotated"`): `"annotated"` or `"pseudo"` (see `BOX_SOURCES`).
    """

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    label: str
    score: float = 1.0
    source: str = ANNOTATED

    def __post_init__(self):
        if self.source not in BOX_SOURCES:
            raise ValueError(f"LesionBox source must be one of {list(BOX_SOURCES)}, got {self.source!r}.")

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """`(x_min, y_min, x_max, y_max)`."""
        return (self.x_min, self.y_min, self.x_max, self.y_max)

    @property
    def area(self) -> float:
        """Width times height (0 for an inverted box)."""
        return max(self.x_max - self.x_min, 0.0) * max(self.y_max - self.y_min, 0.0)

    def to_row(self) -> dict[str, Any]:
        """The box as one dict of a [`BOX_FEATURES`] column."""
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "LesionBox":
        """A box from one dict of a [`BOX_FEATURES`] column (as `to_row` writes it)."""
        return cls(
            x_min=float(row["x_min"]),
            y_min=float(row["y_min"]),
            x_max=float(row["x_max"]),
            y_max=float(row["y_max"]),
            label=str(row["label"]),
            score=float(row["score"]),
            source=str(row["source"]),
        )


def boxes_to_rows(boxes: Iterable[LesionBox]) -> list[dict[str, Any]]:
    """
    The value of a [`BOX_FEATURES`] column for one example: a list of dicts, one per box.

    Args:
        boxes (`Iterable[LesionBox]`): the boxes of one image.
    """
    return [box.to_row() for box in boxes]


def boxes_from_rows(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | None) -> list[LesionBox]:
    """
    The boxes of one example from its [`BOX_FEATURES`] column value.

    Args:
        rows (`list[dict]` or `dict[str, list]`): the list of dicts `datasets` returns for a `BOX_FEATURES` column;
            a dict of lists (the form of a legacy `Sequence({...})` feature) is accepted too. None means no box.
    """
    if rows is None:
        return []
    if isinstance(rows, Mapping):
        lengths = {name: len(values) for name, values in rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"The box columns have different lengths: {lengths}.")
        count = next(iter(lengths.values()), 0)
        rows = [{name: values[index] for name, values in rows.items()} for index in range(count)]
    return [LesionBox.from_row(row) for row in rows]


def box_iou(first: LesionBox, second: LesionBox) -> float:
    """Intersection over union of two boxes (0 when either has no area)."""
    width = min(first.x_max, second.x_max) - max(first.x_min, second.x_min)
    height = min(first.y_max, second.y_max) - max(first.y_min, second.y_min)
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    union = first.area + second.area - intersection
    return intersection / union if union > 0 else 0.0


@dataclass
class _BoxCluster:
    members: list[LesionBox] = field(default_factory=list)
    raters: set[str] = field(default_factory=set)
    fused: LesionBox | None = None

    def add(self, box: LesionBox, rater: str | None) -> None:
        self.members.append(box)
        if rater is not None:
            self.raters.add(rater)
        total = sum(member.score for member in self.members)
        if total > 0:
            weights = [member.score / total for member in self.members]
        else:
            weights = [1.0 / len(self.members)] * len(self.members)
        coordinates = [
            sum(weight * getattr(member, name) for weight, member in zip(weights, self.members))
            for name in ("x_min", "y_min", "x_max", "y_max")
        ]
        source = ANNOTATED if all(member.source == ANNOTATED for member in self.members) else PSEUDO
        score = sum(member.score for member in self.members) / len(self.members)
        self.fused = LesionBox(*coordinates, label=box.label, score=score, source=source)


def fuse_boxes(
    boxes: Sequence[LesionBox], raters: Sequence[str] | None = None, iou_threshold: float = 0.5
) -> list[LesionBox]:
    """
    Merge boxes of the same lesion drawn by several readers ("weighted box fusion lite").

    Boxes are taken in descending score order (file order among equal scores, so all annotations keep file order).
    Each joins the cluster of the same label whose current fused box overlaps it most, if that IoU is above
    `iou_threshold` and (when `raters` is given) the cluster holds no box of the same rater yet; otherwise it starts
    a new cluster. A cluster's fused box is the score-weighted mean of its members' corners (the plain mean for
    annotations), its score the mean score (so fused annotations keep 1.0), its source `"annotated"` only if every
    member is. Clusters are returned in the order they were started.

    Args:
        boxes (`Sequence[LesionBox]`): the boxes of one image.
        raters (`Sequence[str]`, *optional*): who drew each box (e.g. VinDr-CXR's `rad_id`), parallel to `boxes`;
            two boxes of one rater are never fused.
        iou_threshold (`float`, *optional*, defaults to 0.5): boxes overlapping a cluster by more than this join it.

    Returns:
        `list[LesionBox]`: one box per cluster.
    """
    if raters is not None and len(raters) != len(boxes):
        raise ValueError(f"raters has {len(raters)} entries for {len(boxes)} boxes; pass one rater per box.")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}.")
    order = sorted(range(len(boxes)), key=lambda index: -boxes[index].score)
    clusters: list[_BoxCluster] = []
    for index in order:
        box = boxes[index]
        rater = None if raters is None else str(raters[index])
        best, best_iou = None, iou_threshold
        for cluster in clusters:
            if cluster.fused.label != box.label or (rater is not None and rater in cluster.raters):
                continue
            overlap = box_iou(cluster.fused, box)
            if overlap > best_iou:
                best, best_iou = cluster, overlap
        if best is None:
            best = _BoxCluster()
            clusters.append(best)
        best.add(box, rater)
    return [cluster.fused for cluster in clusters]


# Reading box files


def _is_number(value: Any) -> bool:
    """A real number (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _open_text(path: Path):
    """A box file opened for `csv` / `json` reading: UTF-8 (a byte-order mark is skipped), gzip when `.gz`."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _csv_rows(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """`(line number, cells)` of each non-blank data row; the header comes first with line number 1."""
    try:
        with _open_text(path) as file:
            reader = csv.reader(file)
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    yield reader.line_num, cells
    except FileNotFoundError as error:
        raise CdanDataError(f"{what} file {path} does not exist.", path=str(path)) from error
    except (UnicodeDecodeError, csv.Error, OSError) as error:
        raise CdanDataError(f"{path} is not a readable {what} CSV file: {error}.", path=str(path)) from error


def _column_indices(header: list[str], required: Sequence[str], path: Path, what: str) -> dict[str, int]:
    names = [cell.strip() for cell in header]
    missing = [name for name in required if name not in names]
    if missing:
        found = ", ".join(repr(name) for name in names if name)
        raise CdanDataError(
            f"{path} is not a {what} file: column(s) {', '.join(repr(name) for name in missing)} missing "
            f"(found: {found or 'no header'}).",
            path=str(path),
        )
    return {name: names.index(name) for name in required}


def _cell(cells: list[str], index: int, column: str, line: int, path: Path) -> str:
    if index >= len(cells):
        raise CdanDataError(
            f"{path}, line {line}: the row has {len(cells)} cells, no value for column {column!r}.",
            item_id=f"line {line}",
            path=str(path),
        )
    return cells[index].strip()


def _number(text: str, column: str, line: int, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise CdanDataError(
            f"{path}, line {line}: {column} {text!r} is not a number.", item_id=f"line {line}", path=str(path)
        ) from None


def _check_label(label: str, labels: Sequence[str] | None, where: str, path: Path) -> None:
    if labels is not None and label not in labels:
        raise CdanDataError(
            f"{path}, {where}: unknown label {label!r} (expected one of: {', '.join(labels)}).",
            item_id=where,
            path=str(path),
        )


def read_vindr_boxes(
    path: str | os.PathLike,
    fuse: bool = False,
    iou_threshold: float = 0.5,
    labels: Sequence[str] | None = None,
) -> dict[str, list[LesionBox]]:
    """
    The boxes of a VinDr-CXR `annotations_train.csv` / `annotations_test.csv` (columns `VINDR_COLUMNS`), read row
    by row.

    Coordinates are pixels of the image's DICOM (its `Columns` x `Rows`; the file holds no image size). A
    `"No finding"` row has empty coordinates and yields no box; its image is still listed, with no box unless
    another row boxes something. Every other row must have four numbers. Several radiologists may box the same
    lesion: all boxes are kept, unless `fuse` (see [`fuse_boxes`], one cluster never takes two boxes of one
    `rad_id`).

    Args:
        path (`str` or `os.PathLike`): the CSV (or `.csv.gz`) file.
        fuse (`bool`, *optional*, defaults to `False`): merge boxes of one class drawn by several radiologists.
        iou_threshold (`float`, *optional*, defaults to 0.5): the overlap above which boxes are fused.
        labels (`Sequence[str]`, *optional*): the allowed class names (e.g. `VINDR_LOCAL_LABELS`); by default any
            class name is kept.

    Returns:
        `dict[str, list[LesionBox]]`: `image_id` -> its boxes (file order; fused boxes in the order of their first
        member), images in order of first appearance.

    Raises:
        `CdanDataError`: a column is missing (named, with the file), a coordinate is not a number or is missing on a
            lesion row, or a class is not in `labels` (the line number is given). Nothing is returned then.
    """
    path = Path(path)
    what = "VinDr-CXR annotation"
    boxes: dict[str, list[LesionBox]] = {}
    raters: dict[str, list[str]] = {}
    rows = _csv_rows(path, what)
    header = next(rows, None)
    if header is None:
        raise CdanDataError(f"{path} is empty: expected a {what} CSV with a header row.", path=str(path))
    columns = _column_indices(header[1], VINDR_COLUMNS, path, what)
    coordinate_names = VINDR_COLUMNS[3:]
    for line, cells in rows:
        image_id = _cell(cells, columns["image_id"], "image_id", line, path)
        class_name = _cell(cells, columns["class_name"], "class_name", line, path)
        coordinates = [_cell(cells, columns[name], name, line, path) for name in coordinate_names]
        image_boxes = boxes.setdefault(image_id, [])
        image_raters = raters.setdefault(image_id, [])
        if class_name.lower() == VINDR_NO_FINDING.lower():
            continue
        _check_label(class_name, labels, f"line {line}", path)
        if not all(coordinates):
            raise CdanDataError(
                f"{path}, line {line}: {class_name!r} row without its four coordinates "
                f"(only {VINDR_NO_FINDING!r} rows may leave them empty).",
                item_id=f"line {line}",
                path=str(path),
            )
        values = [_number(text, name, line, path) for text, name in zip(coordinates, coordinate_names)]
        image_boxes.append(LesionBox(*values, label=class_name))
        image_raters.append(_cell(cells, columns["rad_id"], "rad_id", line, path))
    if fuse:
        boxes = {
            image_id: fuse_boxes(image_boxes, raters[image_id], iou_threshold)
            for image_id, image_boxes in boxes.items()
        }
    return boxes


def read_nih_boxes(path: str | os.PathLike, labels: Sequence[str] | None = None) -> dict[str, list[LesionBox]]:
    """
    The boxes of NIH ChestX-ray14's `BBox_List_2017.csv`, read row by row.

    The original header is `Image Index,Finding Label,Bbox [x,y,w,h],,,` unquoted, so the box columns come out as
    `Bbox [x`, `y`, `w`, `h]` followed by empty names; the four numbers `x, y, w, h` (top-left corner, width, height)
    are taken from the column whose name starts with `Bbox` and the three after it (a header with columns `x`, `y`,
    `w`, `h` is accepted too). Trailing empty cells are ignored. Coordinates are pixels of the 1024x1024 NIH PNG
    (`NIH_IMAGE_SIZE`).

    Args:
        path (`str` or `os.PathLike`): the CSV (or `.csv.gz`) file.
        labels (`Sequence[str]`, *optional*): the allowed labels (e.g. `NIH_LABELS`); by default any is kept.

    Returns:
        `dict[str, list[LesionBox]]`: `Image Index` (the PNG file name) -> its boxes, in file order.

    Raises:
        `CdanDataError`: a column is missing, a value is not a number (with its line number), or a label is not in
            `labels`. Nothing is returned then.
    """
    path = Path(path)
    what = "NIH ChestX-ray14 BBox_List"
    rows = _csv_rows(path, what)
    header = next(rows, None)
    if header is None:
        raise CdanDataError(f"{path} is empty: expected a {what} CSV with a header row.", path=str(path))
    names = [cell.strip() for cell in header[1]]
    columns = _column_indices(names, ("Image Index", "Finding Label"), path, what)
    bbox_columns = [index for index, name in enumerate(names) if name.lower().startswith("bbox")]
    if bbox_columns:
        box_indices = [bbox_columns[0] + offset for offset in range(4)]
    elif all(name in names for name in "xywh"):
        box_indices = [names.index(name) for name in "xywh"]
    else:
        found = ", ".join(repr(name) for name in names if name)
        raise CdanDataError(
            f"{path} is not a {what} file: no 'Bbox [x,y,w,h]' columns (nor 'x', 'y', 'w', 'h'; found: {found}).",
            path=str(path),
        )
    boxes: dict[str, list[LesionBox]] = {}
    for line, cells in rows:
        image_id = _cell(cells, columns["Image Index"], "Image Index", line, path)
        label = _cell(cells, columns["Finding Label"], "Finding Label", line, path)
        _check_label(label, labels, f"line {line}", path)
        x, y, width, height = (
            _number(_cell(cells, index, name, line, path), name, line, path)
            for index, name in zip(box_indices, ("x", "y", "w", "h"))
        )
        boxes.setdefault(image_id, []).append(LesionBox(x, y, x + width, y + height, label=label))
    return boxes


def _read_coco(path: Path) -> dict[str, Any]:
    what = "COCO JSON"
    try:
        with _open_text(path) as file:
            content = json.load(file)
    except FileNotFoundError as error:
        raise CdanDataError(f"{what} file {path} does not exist.", path=str(path)) from error
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as error:
        raise CdanDataError(f"{path} is not a readable {what} file: {error}.", path=str(path)) from error
    if not isinstance(content, dict):
        raise CdanDataError(f"{path} is not a {what} file: the top level is not an object.", path=str(path))
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(content.get(key), list)]
    if missing:
        raise CdanDataError(
            f"{path} is not a {what} file: list(s) {', '.join(repr(key) for key in missing)} missing "
            f"(found keys: {', '.join(repr(key) for key in content) or 'none'}).",
            path=str(path),
        )
    return content


def _coco_field(item: Any, key: str, kind: str, index: int, path: Path) -> Any:
    if not isinstance(item, dict) or key not in item:
        raise CdanDataError(
            f"{path}: {kind} #{index} has no {key!r} field.", item_id=f"{kind} #{index}", path=str(path)
        )
    return item[key]


def _coco_images(content: dict[str, Any], path: Path) -> dict[Any, dict[str, Any]]:
    images: dict[Any, dict[str, Any]] = {}
    names: set[str] = set()
    for index, image in enumerate(content["images"]):
        image_id = _coco_field(image, "id", "image", index, path)
        file_name = _coco_field(image, "file_name", "image", index, path)
        if image_id in images or file_name in names:
            raise CdanDataError(
                f"{path}: image #{index} repeats id {image_id!r} or file_name {file_name!r}.",
                item_id=str(file_name),
                path=str(path),
            )
        images[image_id] = image
        names.add(file_name)
    return images


def read_coco_boxes(path: str | os.PathLike, labels: Sequence[str] | None = None) -> dict[str, list[LesionBox]]:
    """
    The boxes of a COCO detection JSON such as TBX11K's `annotations/json/TBX11K_*.json`.

    The file is parsed whole (`images` and `categories` must be known before the `annotations` can be mapped, and
    COCO does not fix their order). Each annotation's `bbox` is `[x, y, width, height]` in pixels of its image;
    `category_id` is mapped to the category's `name`. Images are keyed by their `file_name` as written in the JSON,
    which for TBX11K is relative to the `imgs/` folder (e.g. `"tb/tb0005.png"`); every listed image appears, those
    without annotation with no box.

    Args:
        path (`str` or `os.PathLike`): the JSON (or `.json.gz`) file.
        labels (`Sequence[str]`, *optional*): the allowed category names; by default any is kept.

    Returns:
        `dict[str, list[LesionBox]]`: `file_name` -> its boxes, images in the order of `images`, boxes in the order
        of `annotations`.

    Raises:
        `CdanDataError`: the file is not COCO JSON (`images`, `annotations` or `categories` missing), an annotation
            names an unknown image or category or has no 4-number `bbox` (its position in `annotations` and its `id`
            are given), two images share an id or file name, or a category is not in `labels`.
    """
    path = Path(path)
    content = _read_coco(path)
    images = _coco_images(content, path)
    categories = {}
    for index, category in enumerate(content["categories"]):
        categories[_coco_field(category, "id", "category", index, path)] = str(
            _coco_field(category, "name", "category", index, path)
        )
    boxes: dict[str, list[LesionBox]] = {str(image["file_name"]): [] for image in images.values()}
    for index, annotation in enumerate(content["annotations"]):
        where = f"annotation #{index} (id {annotation.get('id') if isinstance(annotation, dict) else None!r})"
        image_id = _coco_field(annotation, "image_id", "annotation", index, path)
        category_id = _coco_field(annotation, "category_id", "annotation", index, path)
        bbox = _coco_field(annotation, "bbox", "annotation", index, path)
        if image_id not in images:
            raise CdanDataError(f"{path}: {where} names unknown image_id {image_id!r}.", item_id=where, path=str(path))
        if category_id not in categories:
            raise CdanDataError(
                f"{path}: {where} names unknown category_id {category_id!r} (known: {sorted(categories)}).",
                item_id=where,
                path=str(path),
            )
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(value) for value in bbox):
            raise CdanDataError(
                f"{path}: {where} has bbox {bbox!r}, expected [x, y, width, height] numbers.",
                item_id=where,
                path=str(path),
            )
        label = categories[category_id]
        _check_label(label, labels, where, path)
        x, y, width, height = (float(value) for value in bbox)
        boxes[str(images[image_id]["file_name"])].append(LesionBox(x, y, x + width, y + height, label=label))
    return boxes


def read_coco_image_sizes(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """
    The `(width, height)` of each image of a COCO JSON, keyed by `file_name` like [`read_coco_boxes`] (for
    [`clean_boxes`] and [`rescale_boxes`]).

    Raises:
        `CdanDataError`: the file is not COCO JSON, or an image has no `width` / `height`.
    """
    path = Path(path)
    content = _read_coco(path)
    sizes = {}
    for index, image in enumerate(_coco_images(content, path).values()):
        sizes[str(image["file_name"])] = (
            int(_coco_field(image, "width", "image", index, path)),
            int(_coco_field(image, "height", "image", index, path)),
        )
    return sizes


# Validation, rescaling, padding


@dataclass
class BoxCleaningReport:
    """
    What [`clean_boxes`] did: boxes kept, clipped (kept), and dropped by reason (see `BOX_DROP_REASONS`). Reports
    add up with `+`, e.g. over a data set; `str(report)` reads "kept 5 boxes (1 clipped); dropped 3 boxes:
    2 zero-area, 1 non-finite".
    """

    kept: int = 0
    clipped: int = 0
    non_finite: int = 0
    inverted: int = 0
    zero_area: int = 0
    outside: int = 0
    over_max_boxes: int = 0

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        """Reason -> count, only for reasons with at least one dropped box."""
        return {reason: getattr(self, reason) for reason in BOX_DROP_REASONS if getattr(self, reason)}

    @property
    def dropped(self) -> int:
        """All boxes dropped."""
        return sum(getattr(self, reason) for reason in BOX_DROP_REASONS)

    def __add__(self, other: "BoxCleaningReport") -> "BoxCleaningReport":
        if not isinstance(other, BoxCleaningReport):
            return NotImplemented
        counts = {item.name: getattr(self, item.name) + getattr(other, item.name) for item in fields(self)}
        return BoxCleaningReport(**counts)

    def __str__(self) -> str:
        text = f"kept {self.kept} boxes ({self.clipped} clipped)"
        if self.dropped:
            reasons = ", ".join(
                f"{count} {reason.replace('_', '-')}" for reason, count in self.dropped_by_reason.items()
            )
            text += f"; dropped {self.dropped} boxes: {reasons}"
        return text


def _check_image_size(size: Any, name: str) -> tuple[float, float]:
    if not isinstance(size, tuple) or len(size) != 2:
        raise ValueError(
            f"{name} must be a (width, height) tuple, as PIL's Image.size gives it, got {size!r} (an array shape is "
            "(height, width[, channels]): swap it and make it a tuple)."
        )
    width, height = size
    if not all(_is_number(value) and math.isfinite(value) and value > 0 for value in size):
        raise ValueError(f"{name} must hold two positive numbers (width, height), got {size!r}.")
    return float(width), float(height)


def clean_boxes(
    boxes: Iterable[LesionBox], image_width: float, image_height: float, max_boxes: int | None = None
) -> tuple[list[LesionBox], BoxCleaningReport]:
    """
    Validate the boxes of one image of `image_width` x `image_height` pixels (the image their coordinates are in).

    Checks, in this order (a box is counted under the first reason that drops it):
    - `non_finite`: a coordinate or the score is NaN or infinite;
    - `inverted`: `x_max < x_min` or `y_max < y_min`. Dropped, not swapped: corners in the wrong order mean the file
      was read with the wrong convention (e.g. `[x, y, w, h]` as `xyxy`), so a swapped box would be a wrong box;
    - `zero_area`: `x_max == x_min` or `y_max == y_min`;
    - `outside`: no overlap of positive area with the image (a box touching the border from outside included);
    - otherwise the box is clipped to the image (counted as `clipped`, kept);
    - `over_max_boxes`: past the `max_boxes` highest-scoring boxes (file order among equal scores).
    Labels are not checked (the label set is data-set specific; the readers take an optional `labels` list).

    Args:
        boxes (`Iterable[LesionBox]`): the boxes of one image.
        image_width, image_height (`float`): the size in pixels of the image the coordinates refer to.
        max_boxes (`int`, *optional*): keep at most this many boxes.

    Returns:
        `tuple[list[LesionBox], BoxCleaningReport]`: the kept boxes in input order, and the counts.
    """
    width, height = _check_image_size((image_width, image_height), "(image_width, image_height)")
    if max_boxes is not None and max_boxes < 0:
        raise ValueError(f"max_boxes must be non-negative, got {max_boxes}.")
    report = BoxCleaningReport()
    valid: list[LesionBox] = []
    for box in boxes:
        if not all(math.isfinite(value) for value in (*box.xyxy, box.score)):
            report.non_finite += 1
        elif box.x_max < box.x_min or box.y_max < box.y_min:
            report.inverted += 1
        elif box.x_max == box.x_min or box.y_max == box.y_min:
            report.zero_area += 1
        elif box.x_max <= 0 or box.y_max <= 0 or box.x_min >= width or box.y_min >= height:
            report.outside += 1
        else:
            clipped = (
                min(max(box.x_min, 0.0), width),
                min(max(box.y_min, 0.0), height),
                min(max(box.x_max, 0.0), width),
                min(max(box.y_max, 0.0), height),
            )
            if clipped != box.xyxy:
                report.clipped += 1
                box = replace(box, x_min=clipped[0], y_min=clipped[1], x_max=clipped[2], y_max=clipped[3])
            valid.append(box)
    if max_boxes is not None and len(valid) > max_boxes:
        ranked = sorted(range(len(valid)), key=lambda index: -valid[index].score)
        chosen = set(ranked[:max_boxes])
        report.over_max_boxes = len(valid) - max_boxes
        valid = [box for index, box in enumerate(valid) if index in chosen]
    report.kept = len(valid)
    return valid, report


def rescale_boxes(
    boxes: Iterable[LesionBox],
    *,
    from_image_size: tuple[int, int],
    to_image_size: tuple[int, int],
    tolerance: float = 1.0,
) -> list[LesionBox]:
    """
    Map boxes from the pixels of one image to those of the same image resized (no crop, no padding).

    Both sizes are keyword-only `(width, height)` tuples, as `PIL.Image.size` gives them: `from_image_size` is the
    image the boxes are in now, `to_image_size` the image they are wanted in. Keep boxes beside the size they refer
    to, and crop an image only with boxes rescaled to that image's own `.size` (public D2R-Net crops the original
    image with boxes scaled to the resized one). A box reaching past `from_image_size` by more than `tolerance`
    pixels is an error: it catches boxes of the original image passed with the size of a smaller one.

    Args:
        boxes (`Iterable[LesionBox]`): the boxes, in pixels of an image of `from_image_size`.
        from_image_size (`tuple[int, int]`): `(width, height)` of the image the boxes are in.
        to_image_size (`tuple[int, int]`): `(width, height)` of the image to map them to.
        tolerance (`float`, *optional*, defaults to 1.0): how far (pixels) a box may reach past `from_image_size`.

    Returns:
        `list[LesionBox]`: the boxes in pixels of `to_image_size` (labels, scores and sources unchanged).

    Raises:
        `ValueError`: a size is not a `(width, height)` tuple of positive numbers, or a box reaches past
            `from_image_size`.
    """
    from_width, from_height = _check_image_size(from_image_size, "from_image_size")
    to_width, to_height = _check_image_size(to_image_size, "to_image_size")
    boxes = list(boxes)
    for box in boxes:
        if max(box.x_min, box.x_max) > from_width + tolerance or max(box.y_min, box.y_max) > from_height + tolerance:
            raise ValueError(
                f"Box {box.xyxy} reaches past from_image_size={from_image_size} (width, height) by more than "
                f"{tolerance} px: it is not in the pixels of that image (or not cleaned: see clean_boxes)."
            )
    x_scale, y_scale = to_width / from_width, to_height / from_height
    return [
        replace(
            box,
            x_min=box.x_min * x_scale,
            y_min=box.y_min * y_scale,
            x_max=box.x_max * x_scale,
            y_max=box.y_max * y_scale,
        )
        for box in boxes
    ]


BOX_PADDING_VALUE = -1.0
"""The value of every field of a padding row of [`pad_boxes`]."""


def pad_boxes(boxes: Sequence[LesionBox], max_boxes: int, label_vocabulary: Sequence[str]):
    """
    The boxes of one image as the fixed-size tensor D2R-Net feeds its report model.

    Args:
        boxes (`Sequence[LesionBox]`): at most `max_boxes` boxes (see [`clean_boxes`]'s `max_boxes`), in pixels of
            the image the model sees (see [`rescale_boxes`]).
        max_boxes (`int`): the number of rows.
        label_vocabulary (`Sequence[str]`): the labels in index order (e.g. `VINDR_LOCAL_LABELS`).

    Returns:
        `torch.FloatTensor` of shape `(max_boxes, 6)`: one row per box, `x_min, y_min, x_max, y_max, score,
        label_index`, in the order given, then rows of `BOX_PADDING_VALUE` (-1; a real row has `label_index >= 0`).

    Raises:
        `ValueError`: more boxes than `max_boxes` (nothing is silently dropped here), or a label not in
            `label_vocabulary`.
    """
    import torch  # imported here so that reading and cleaning boxes do not load torch

    if max_boxes < 0:
        raise ValueError(f"max_boxes must be non-negative, got {max_boxes}.")
    if len(boxes) > max_boxes:
        raise ValueError(
            f"{len(boxes)} boxes do not fit in max_boxes={max_boxes}; select them first with "
            f"clean_boxes(..., max_boxes={max_boxes}), which keeps the highest scores and counts the rest."
        )
    label_index = {label: index for index, label in enumerate(label_vocabulary)}
    if len(label_index) != len(label_vocabulary):
        repeated = sorted({label for label in label_vocabulary if list(label_vocabulary).count(label) > 1})
        raise ValueError(f"label_vocabulary repeats {', '.join(map(repr, repeated))}; each label needs one index.")
    padded = torch.full((max_boxes, 6), BOX_PADDING_VALUE, dtype=torch.float32)
    for row, box in enumerate(boxes):
        if box.label not in label_index:
            raise ValueError(
                f"Box label {box.label!r} is not in label_vocabulary ({', '.join(map(repr, label_vocabulary))})."
            )
        padded[row] = torch.tensor([*box.xyxy, box.score, label_index[box.label]], dtype=torch.float32)
    return padded


# The detector's box file


BOX_FILE_KEY_FIELDS = ("study_id", "image_index")
"""The fields of a box-file line that say which image it is: the data set row's `id` and the image's position in the
row's `images` (other key fields, such as `split` and `view`, are kept in the file but not read)."""

BOX_FILE_ASPECT_TOLERANCE = 0.01
"""How far (relative) the aspect ratio of a box-file `image_size` may differ from the image's own before the boxes are
refused rather than rescaled (see [`study_box_rows`])."""


def _box_file_error(path: Path, line: int, message: str) -> CdanDataError:
    return CdanDataError(f"{path}, line {line}: {message}", item_id=f"line {line}", path=str(path))


def read_box_file(path: str | os.PathLike) -> dict[tuple[str, int], tuple[tuple[int, int], list[LesionBox]]]:
    """
    The boxes of a JSON-lines box file as `detection_cdan.write_box_file` writes it: one object per line with
    `study_id`, `image_index`, `image_size` `[width, height]` and `boxes`, a list of [`BOX_FEATURES`] dicts in pixels
    of an image of that size. Blank lines are skipped; a `.gz` file is read decompressed.

    Args:
        path (`str` or `os.PathLike`): the box file.

    Returns:
        `dict[tuple[str, int], tuple[tuple[int, int], list[LesionBox]]]`: `(study_id, image_index)` ->
        `((width, height), boxes)`, in file order (`study_id` as a string).

    Raises:
        `CdanDataError`: the file is missing or unreadable, or a line is not a JSON object, lacks a field, has an
            `image_index` that is not a non-negative integer, an `image_size` that is not two positive integers, a box
            that is not a full `BOX_FEATURES` dict, or repeats the key of an earlier line. The message gives the line
            number; nothing is returned then.
    """
    path = Path(path)
    entries: dict[tuple[str, int], tuple[tuple[int, int], list[LesionBox]]] = {}
    first_lines: dict[tuple[str, int], int] = {}
    try:
        with _open_text(path) as file:
            lines = list(enumerate(file, start=1))
    except FileNotFoundError as error:
        raise CdanDataError(f"Box file {path} does not exist.", path=str(path)) from error
    except (UnicodeDecodeError, OSError) as error:
        raise CdanDataError(f"{path} is not a readable box file: {error}.", path=str(path)) from error
    for line, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise _box_file_error(path, line, f"not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise _box_file_error(path, line, f"expected a JSON object, got {type(record).__name__}.")
        missing = [name for name in (*BOX_FILE_KEY_FIELDS, "image_size", "boxes") if name not in record]
        if missing:
            raise _box_file_error(path, line, f"field(s) {', '.join(map(repr, missing))} missing.")
        study_id, image_index, image_size = record["study_id"], record["image_index"], record["image_size"]
        if not isinstance(study_id, (str, int)) or isinstance(study_id, bool):
            raise _box_file_error(path, line, f"study_id {study_id!r} is not a string.")
        if not isinstance(image_index, int) or isinstance(image_index, bool) or image_index < 0:
            raise _box_file_error(path, line, f"image_index {image_index!r} is not a non-negative integer.")
        if (
            not isinstance(image_size, list)
            or len(image_size) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in image_size)
        ):
            raise _box_file_error(path, line, f"image_size {image_size!r} is not [width, height] positive integers.")
        if not isinstance(record["boxes"], list):
            raise _box_file_error(path, line, f"boxes is a {type(record['boxes']).__name__}, not a list.")
        boxes = []
        for index, row in enumerate(record["boxes"]):
            try:
                boxes.append(LesionBox.from_row(row))
            except (KeyError, TypeError, ValueError) as error:
                raise _box_file_error(
                    path, line, f"box #{index} is not a BOX_FEATURES dict ({type(error).__name__}: {error})."
                ) from None
        key = (str(study_id), image_index)
        if key in entries:
            raise _box_file_error(
                path, line, f"study {key[0]} image {image_index} was already given on line {first_lines[key]}."
            )
        entries[key] = ((image_size[0], image_size[1]), boxes)
        first_lines[key] = line
    return entries


def box_file_image_counts(box_index: Mapping[tuple[str, int], Any]) -> dict[str, int]:
    """Per study of a [`read_box_file`] result, one more than its highest `image_index` (to catch mismatched rows)."""
    counts: dict[str, int] = {}
    for study_id, image_index in box_index:
        counts[study_id] = max(counts.get(study_id, 0), image_index + 1)
    return counts


def study_box_rows(
    box_index: Mapping[tuple[str, int], tuple[tuple[int, int], list[LesionBox]]],
    study_id: str,
    image_paths: Sequence[str | os.PathLike],
    box_file: str | os.PathLike,
    image_counts: Mapping[str, int] | None = None,
) -> list[list[dict[str, Any]]]:
    """
    A study's `boxes` column value (per image a list of [`BOX_FEATURES`] dicts) from a [`read_box_file`] result.

    An image without a line in the file gets an empty list. Boxes are stored in pixels of the image at its path: when
    the file's `image_size` differs from the image's own size (read from its header), the boxes are rescaled with
    [`rescale_boxes`] if both have the same aspect ratio (within `BOX_FILE_ASPECT_TOLERANCE`, e.g. the detector ran
    on a resized copy) and refused otherwise (another image).

    Args:
        box_index (`Mapping`): the result of [`read_box_file`].
        study_id (`str`): the row's `id`.
        image_paths (`Sequence[str | os.PathLike]`): the row's images, in order (their positions are `image_index`).
        box_file (`str` or `os.PathLike`): the box file, for messages.
        image_counts (`Mapping[str, int]`, *optional*): [`box_file_image_counts`] of `box_index`; when given, a file
            line for an image past the row's images is an error.

    Raises:
        `CdanDataError`: the file boxes an image the row does not have, or an image of another aspect ratio.
    """
    import PIL.Image  # imported here so that reading box files does not load PIL

    if image_counts is not None and image_counts.get(study_id, 0) > len(image_paths):
        raise CdanDataError(
            f"{box_file} has boxes for image {image_counts[study_id] - 1} of study {study_id}, which has "
            f"{len(image_paths)} image(s): the box file was written for other rows (another data set "
            "configuration?).",
            item_id=study_id,
            path=str(box_file),
        )
    rows = []
    for image_index, image_path in enumerate(image_paths):
        entry = box_index.get((study_id, image_index))
        if entry is None:
            rows.append([])
            continue
        file_size, boxes = entry
        try:
            with PIL.Image.open(image_path) as image:
                image_size = image.size
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise CdanDataError(
                f"{box_file} boxes study {study_id} image {image_index}, but {image_path} cannot be read to check its "
                f"size: {error}",
                item_id=study_id,
                path=str(image_path),
            ) from error
        if image_size != file_size:
            file_aspect, image_aspect = file_size[0] / file_size[1], image_size[0] / image_size[1]
            if abs(file_aspect / image_aspect - 1.0) > BOX_FILE_ASPECT_TOLERANCE:
                raise CdanDataError(
                    f"{box_file} gives study {study_id} image {image_index} the size {list(file_size)} "
                    f"(width, height) but {image_path} is {list(image_size)}, another aspect ratio: the boxes are not "
                    "of this image.",
                    item_id=study_id,
                    path=str(box_file),
                )
            try:
                boxes = rescale_boxes(boxes, from_image_size=file_size, to_image_size=image_size)
            except ValueError as error:
                raise CdanDataError(
                    f"{box_file}, study {study_id} image {image_index}: {error}", item_id=study_id, path=str(box_file)
                ) from error
        rows.append(boxes_to_rows(boxes))
    return rows


__all__ = [
    "ANNOTATED",
    "BOX_DROP_REASONS",
    "BOX_FEATURES",
    "BOX_FILE_ASPECT_TOLERANCE",
    "BOX_FILE_KEY_FIELDS",
    "BOX_PADDING_VALUE",
    "BOX_SOURCES",
    "NIH_IMAGE_SIZE",
    "NIH_LABELS",
    "PSEUDO",
    "VINDR_COLUMNS",
    "VINDR_LOCAL_LABELS",
    "VINDR_NO_FINDING",
    "BoxCleaningReport",
    "LesionBox",
    "box_file_image_counts",
    "box_iou",
    "boxes_from_rows",
    "boxes_to_rows",
    "clean_boxes",
    "fuse_boxes",
    "pad_boxes",
    "read_box_file",
    "read_coco_boxes",
    "read_coco_image_sizes",
    "read_nih_boxes",
    "read_vindr_boxes",
    "rescale_boxes",
    "study_box_rows",
]
