"""Lesion boxes (`data_cdan.boxes`): the readers on the real NIH ChestX-ray14 and TBX11K files in ../shared and on tiny
VinDr-CXR files written here, validation, rescaling and padding (offline)."""

import csv
import json
import math

import datasets
import pytest
import torch
from PIL import Image

from data_cdan.base import CdanDataError
from data_cdan.boxes import (
    BOX_FEATURES,
    NIH_IMAGE_SIZE,
    NIH_LABELS,
    VINDR_COLUMNS,
    VINDR_LOCAL_LABELS,
    BoxCleaningReport,
    LesionBox,
    boxes_from_rows,
    boxes_to_rows,
    clean_boxes,
    fuse_boxes,
    pad_boxes,
    read_coco_boxes,
    read_coco_image_sizes,
    read_nih_boxes,
    read_vindr_boxes,
    rescale_boxes,
)
from data_cdan.testing import shared_data_dir


LOCALIZATION = shared_data_dir() / "cxr_localization"
NIH_BBOX_FILE = LOCALIZATION / "nih_chestxray14" / "BBox_List_2017.csv"
TBX11K = LOCALIZATION / "tbx11k_sample"
TBX11K_JSON = TBX11K / "annotations" / "json" / "TBX11K_train.json"



def write_vindr_csv(path, rows, columns=VINDR_COLUMNS, encoding="utf-8"):
    """A VinDr-CXR annotation CSV with `columns` and `rows` (tuples in column order; None is an empty cell)."""
    with open(path, "w", encoding=encoding, newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in row] for row in rows])
    return path


def box(x_min, y_min, x_max, y_max, label="Nodule/Mass", score=1.0):
    return LesionBox(x_min, y_min, x_max, y_max, label=label, score=score)


# The box record and its column


def test_boxes_round_trip_through_a_datasets_column():
    boxes = [box(10.5, 20.25, 30.0, 40.0), LesionBox(1, 2, 3, 4, label="Pneumothorax", score=0.5, source="pseudo")]
    features = datasets.Features({"lesion_boxes": BOX_FEATURES})
    dataset = datasets.Dataset.from_dict({"lesion_boxes": [boxes_to_rows(boxes), []]}, features=features)
    assert boxes_from_rows(dataset[0]["lesion_boxes"]) == boxes
    assert boxes_from_rows(dataset[1]["lesion_boxes"]) == []


def test_boxes_from_rows_accepts_a_dict_of_lists():
    boxes = [box(1, 2, 3, 4), box(5, 6, 7, 8, label="ILD")]
    rows = boxes_to_rows(boxes)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    assert boxes_from_rows(columns) == boxes


def test_lesion_box_rejects_an_unknown_source():
    with pytest.raises(ValueError, match="'predicted'"):
        LesionBox(1, 2, 3, 4, label="ILD", source="predicted")


# NIH ChestX-ray14 (real file)


def test_read_nih_boxes_counts_match_the_real_file():
    with open(NIH_BBOX_FILE, newline="") as file:
        rows = list(csv.reader(file))[1:]
    boxes = read_nih_boxes(NIH_BBOX_FILE, labels=NIH_LABELS)
    assert len(rows) == 984 and len({row[0] for row in rows}) == 880  # PROVENANCE.md: 984 boxes on 880 images
    assert len(boxes) == 880
    assert sum(len(image_boxes) for image_boxes in boxes.values()) == 984
    assert {item.label for image_boxes in boxes.values() for item in image_boxes} == set(NIH_LABELS)


def test_read_nih_boxes_converts_xywh_to_xyxy():
    with open(NIH_BBOX_FILE, newline="") as file:
        first = list(csv.reader(file))[1]
    x, y, width, height = (float(value) for value in first[2:6])
    assert read_nih_boxes(NIH_BBOX_FILE)[first[0]][0] == LesionBox(x, y, x + width, y + height, label=first[1])


def test_real_nih_boxes_all_lie_in_the_nih_png():
    report = BoxCleaningReport()
    for image_boxes in read_nih_boxes(NIH_BBOX_FILE).values():
        report += clean_boxes(image_boxes, *NIH_IMAGE_SIZE)[1]
    assert (report.kept, report.clipped, report.dropped) == (984, 0, 0)


def test_read_nih_boxes_accepts_plain_xywh_columns(tmp_path):
    path = tmp_path / "bbox.csv"
    path.write_text("Image Index,Finding Label,x,y,w,h\n00000001_000.png,Mass,10,20,30,40\n")
    assert read_nih_boxes(path) == {"00000001_000.png": [LesionBox(10, 20, 40, 60, label="Mass")]}


def test_read_nih_boxes_names_missing_columns_and_file(tmp_path):
    path = tmp_path / "bbox.csv"
    path.write_text("Image Index,Label,Bbox [x,y,w,h]\n00000001_000.png,Mass,10,20,30,40\n")
    with pytest.raises(CdanDataError, match=r"'Finding Label' missing") as error:
        read_nih_boxes(path)
    assert str(path) in str(error.value)


def test_read_nih_boxes_names_the_line_of_an_unparsable_number(tmp_path):
    path = tmp_path / "bbox.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3,4\nb.png,Mass,1,two,3,4\n")
    with pytest.raises(CdanDataError, match=r"line 3: y 'two' is not a number"):
        read_nih_boxes(path)


# TBX11K COCO JSON (real file)


def test_read_coco_boxes_on_the_real_tbx11k_sample():
    content = json.loads(TBX11K_JSON.read_text())
    boxes = read_coco_boxes(TBX11K_JSON)
    assert list(boxes) == [image["file_name"] for image in content["images"]]
    assert {name: [item.label for item in found] for name, found in boxes.items()} == {
        "tb/tb0005.png": ["ActiveTuberculosis"],
        "tb/tb0007.png": ["ObsoletePulmonaryTuberculosis", "ObsoletePulmonaryTuberculosis"],
        "health/h0001.png": [],
    }
    x, y, width, height = content["annotations"][0]["bbox"]
    assert boxes["tb/tb0005.png"][0].xyxy == (x, y, x + width, y + height)


def test_read_coco_image_sizes_match_the_real_pngs():
    sizes = read_coco_image_sizes(TBX11K_JSON)
    for file_name, size in sizes.items():
        with Image.open(TBX11K / "imgs" / file_name) as image:
            assert image.size == size
    assert len(sizes) == 3


def test_read_coco_boxes_names_an_unknown_category(tmp_path):
    path = tmp_path / "coco.json"
    content = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}],
        "categories": [{"id": 1, "name": "ActiveTuberculosis"}],
    }
    path.write_text(json.dumps(content))
    with pytest.raises(CdanDataError, match=r"annotation #0 \(id 7\) names unknown category_id 9"):
        read_coco_boxes(path)


def test_read_coco_boxes_names_missing_lists_and_file(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CdanDataError, match=r"'categories' missing") as error:
        read_coco_boxes(path)
    assert str(path) in str(error.value)


# VinDr-CXR (tiny files written here)


def test_read_vindr_no_finding_row_lists_the_image_without_box(tmp_path):
    path = write_vindr_csv(tmp_path / "annotations_train.csv", [("img0", "R1", "No finding", None, None, None, None)])
    assert read_vindr_boxes(path) == {"img0": []}


def test_read_vindr_keeps_every_radiologists_box_by_default(tmp_path):
    rows = [
        ("img1", "R8", "Nodule/Mass", 100, 100, 200, 200),
        ("img1", "R9", "Nodule/Mass", 110, 110, 210, 210),
        ("img1", "R10", "Nodule/Mass", 90, 90, 190, 190),
    ]
    path = write_vindr_csv(tmp_path / "annotations_train.csv", rows)
    assert [item.xyxy for item in read_vindr_boxes(path)["img1"]] == [row[3:] for row in rows]


def test_read_vindr_fuse_averages_one_lesion_across_radiologists(tmp_path):
    rows = [
        ("img1", "R8", "Nodule/Mass", 100, 100, 200, 200),
        ("img1", "R9", "Nodule/Mass", 110, 110, 210, 210),
        ("img1", "R10", "Nodule/Mass", 90, 90, 190, 190),
        ("img1", "R10", "Nodule/Mass", 600, 600, 650, 650),  # another lesion
        ("img1", "R9", "Pleural effusion", 100, 100, 200, 200),  # same place, other class
    ]
    path = write_vindr_csv(tmp_path / "annotations_train.csv", rows)
    fused = read_vindr_boxes(path, fuse=True)["img1"]
    assert [(item.label, item.xyxy, item.score) for item in fused] == [
        ("Nodule/Mass", (100.0, 100.0, 200.0, 200.0), 1.0),
        ("Nodule/Mass", (600.0, 600.0, 650.0, 650.0), 1.0),
        ("Pleural effusion", (100.0, 100.0, 200.0, 200.0), 1.0),
    ]


def test_fuse_boxes_never_merges_two_boxes_of_one_rater():
    boxes = [box(0, 0, 100, 100), box(5, 5, 105, 105)]
    assert fuse_boxes(boxes, raters=["R1", "R1"]) == boxes
    assert len(fuse_boxes(boxes, raters=["R1", "R2"])) == 1


def test_read_vindr_skips_a_byte_order_mark_and_extra_columns(tmp_path):
    columns = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")  # Kaggle train.csv
    rows = [("img2", "Cardiomegaly", 3, "R11", 1, 2, 3, 4)]
    path = write_vindr_csv(tmp_path / "train.csv", rows, columns=columns, encoding="utf-8-sig")
    assert read_vindr_boxes(path) == {"img2": [LesionBox(1, 2, 3, 4, label="Cardiomegaly")]}


def test_read_vindr_unknown_label_names_label_and_file(tmp_path):
    path = write_vindr_csv(tmp_path / "annotations_test.csv", [("img3", "R1", "Nodule", 1, 2, 3, 4)])
    with pytest.raises(CdanDataError, match=r"annotations_test\.csv, line 2: unknown label 'Nodule'"):
        read_vindr_boxes(path, labels=VINDR_LOCAL_LABELS)


def test_read_vindr_names_missing_columns_and_file(tmp_path):
    columns = ("image_id", "rad_id", "class_name", "xmin", "ymin", "x_max", "y_max")
    path = write_vindr_csv(tmp_path / "annotations_train.csv", [("img4", "R1", "ILD", 1, 2, 3, 4)], columns=columns)
    with pytest.raises(CdanDataError, match=r"annotations_train\.csv is not a VinDr-CXR annotation file: "):
        read_vindr_boxes(path)
    with pytest.raises(CdanDataError, match=r"'x_min', 'y_min' missing"):
        read_vindr_boxes(path)


def test_read_vindr_names_the_line_of_an_unparsable_number(tmp_path):
    rows = [("img5", "R1", "ILD", 1, 2, 3, 4), ("img5", "R2", "ILD", 1, 2, "3,5", 4)]
    path = write_vindr_csv(tmp_path / "annotations_train.csv", rows)
    with pytest.raises(CdanDataError, match=r"line 3: x_max '3,5' is not a number"):
        read_vindr_boxes(path)


def test_read_vindr_lesion_row_without_coordinates_is_an_error(tmp_path):
    path = write_vindr_csv(tmp_path / "annotations_train.csv", [("img6", "R1", "ILD", None, None, None, None)])
    with pytest.raises(CdanDataError, match=r"line 2: 'ILD' row without its four coordinates"):
        read_vindr_boxes(path)


# Validation


def test_clean_boxes_counts_each_drop_reason():
    boxes = [
        box(10, 10, 20, 20),  # kept
        box(math.nan, 10, 20, 20),  # non_finite
        box(10, 10, 20, math.inf),  # non_finite
        box(30, 10, 20, 20),  # inverted
        box(10, 10, 10, 20),  # zero_area
        box(-50, 10, 0, 20),  # outside (touches the left border)
        box(200, 10, 300, 20),  # outside
    ]
    kept, report = clean_boxes(boxes, image_width=100, image_height=50)
    assert kept == boxes[:1]
    assert report.dropped_by_reason == {"non_finite": 2, "inverted": 1, "zero_area": 1, "outside": 2}
    assert str(report) == "kept 1 boxes (0 clipped); dropped 6 boxes: 2 non-finite, 1 inverted, 1 zero-area, 2 outside"


def test_clean_boxes_clips_boxes_partly_outside():
    kept, report = clean_boxes([box(-5, 40, 30, 70)], image_width=100, image_height=50)
    assert [item.xyxy for item in kept] == [(0.0, 40.0, 30.0, 50.0)]
    assert (report.kept, report.clipped, report.dropped) == (1, 1, 0)


def test_clean_boxes_max_boxes_keeps_the_highest_scores_in_input_order():
    boxes = [box(0, 0, 5, 5, score=score) for score in (0.2, 0.9, 0.5, 0.7)]
    kept, report = clean_boxes(boxes, 10, 10, max_boxes=2)
    assert [item.score for item in kept] == [0.9, 0.7]
    assert report.over_max_boxes == 2


def test_cleaning_reports_add_up():
    first = clean_boxes([box(0, 0, 5, 5), box(1, 1, 1, 1)], 10, 10)[1]
    second = clean_boxes([box(math.nan, 0, 5, 5)], 10, 10)[1]
    assert (first + second).dropped_by_reason == {"non_finite": 1, "zero_area": 1}
    assert (first + second).kept == 1


# Rescaling and padding


def test_rescale_boxes_round_trip():
    boxes = [box(100, 200, 300, 500), box(0, 0, 1024, 1024, label="ILD")]
    smaller = rescale_boxes(boxes, from_image_size=(1024, 1024), to_image_size=(224, 224))
    assert smaller[0].xyxy == pytest.approx((21.875, 43.75, 65.625, 109.375))
    restored = rescale_boxes(smaller, from_image_size=(224, 224), to_image_size=(1024, 1024))
    for original, back in zip(boxes, restored):
        assert back.xyxy == pytest.approx(original.xyxy) and back.label == original.label


def test_rescale_boxes_sizes_are_keyword_only_width_height_tuples():
    with pytest.raises(TypeError):
        rescale_boxes([box(0, 0, 5, 5)], (10, 10), (20, 20))
    with pytest.raises(ValueError, match=r"\(width, height\) tuple"):
        rescale_boxes([box(0, 0, 5, 5)], from_image_size=(10, 10, 3), to_image_size=(20, 20))


def test_rescale_boxes_rejects_boxes_beyond_the_stated_source_image():
    with pytest.raises(ValueError, match=r"reaches past from_image_size=\(224, 224\)"):
        rescale_boxes([box(100, 200, 600, 900)], from_image_size=(224, 224), to_image_size=(1024, 1024))


def test_pad_boxes_shape_and_padding_value():
    padded = pad_boxes([box(1, 2, 3, 4, label="ILD", score=0.5)], 3, label_vocabulary=VINDR_LOCAL_LABELS)
    assert padded.shape == (3, 6) and padded.dtype == torch.float32
    assert padded[0].tolist() == [1.0, 2.0, 3.0, 4.0, 0.5, float(VINDR_LOCAL_LABELS.index("ILD"))]
    assert torch.all(padded[1:] == -1)


def test_pad_boxes_refuses_too_many_boxes_and_unknown_labels():
    with pytest.raises(ValueError, match=r"2 boxes do not fit in max_boxes=1"):
        pad_boxes([box(0, 0, 1, 1), box(0, 0, 2, 2)], 1, label_vocabulary=VINDR_LOCAL_LABELS)
    with pytest.raises(ValueError, match=r"'Mass' is not in label_vocabulary"):
        pad_boxes([box(0, 0, 1, 1, label="Mass")], 1, label_vocabulary=VINDR_LOCAL_LABELS)
