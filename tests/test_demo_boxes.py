"""True lesion boxes of the synthetic renderer (`render_view` metadata) and the demo builder's `boxes` column."""

import hashlib
import zlib

import numpy as np
import pytest

from data_cdan import boxes_from_rows, load_cdan_dataset
from data_cdan.synthetic_anatomy import sample_findings
from data_cdan.synthetic_cxr import BOXED_OBSERVATIONS, label_strengths, render_study, render_view
from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN

# sha256 of the pixels of studies rendered by the renderer as it was before it recorded boxes (commit 239e02b);
# the demo's training results and golden tests depend on these pixels.
GOLDEN_128 = "854a49e7c08aed1ca3facdd988a984ca21c20198e7d5ef0b08fe55c07b3867a7"
GOLDEN_256 = "4e0b8252b879c4901f61d3b8c697fdd5b17c555732cb5ec9cd274a90283b0b0b"

SIZE = 128


def golden_labels(study: int) -> list[int]:
    """Random label states (POSITIVE twice as likely as each other state) of golden study `study`."""
    rng = np.random.default_rng([2026, study])
    return rng.choice([1, 1, -1, 0, -2], size=len(CHEXPERT_OBSERVATIONS)).tolist()


def pixel_hash(studies: range, image_size: int) -> str:
    hasher = hashlib.sha256()
    for study in studies:
        for image in render_study(golden_labels(study), seed=study * 7919, image_size=image_size):
            hasher.update(image.tobytes())
    return hasher.hexdigest()


def change_inside_and_outside(name: str, seed: int, view: str) -> tuple[float, float, float]:
    """(share of the absolute pixel change made by finding `name` that lies in its boxes, mean change inside the
    boxes, mean change outside)."""
    normal, _ = render_view(view, {}, seed, SIZE)
    image, metadata = render_view(view, {name: POSITIVE}, seed, SIZE)
    change = np.abs(np.asarray(image, dtype=float) - np.asarray(normal, dtype=float))
    inside = np.zeros(change.shape, dtype=bool)
    for box in metadata["boxes"]:
        assert box.label == name
        inside[int(box.y_min) : int(box.y_max), int(box.x_min) : int(box.x_max)] = True
    return change[inside].sum() / change.sum(), change[inside].mean(), change[~inside].mean()


def test_pixels_of_36_studies_at_128_px_are_unchanged():
    assert pixel_hash(range(36), 128) == GOLDEN_128


def test_pixels_of_4_studies_at_256_px_are_unchanged():
    assert pixel_hash(range(4), 256) == GOLDEN_256


@pytest.mark.parametrize("name", [name for name in BOXED_OBSERVATIONS if name not in ("Atelectasis", "Fracture")])
def test_most_of_the_change_a_finding_makes_lies_in_its_boxes(name):
    for seed in (1, 2):
        for view in ("frontal", "lateral"):
            share, _, _ = change_inside_and_outside(name, seed, view)
            assert share > 0.6, (seed, view)


def test_atelectasis_box_holds_the_plate_not_the_raised_hemidiaphragm():
    # The hemidiaphragm rise moves the whole dome (outside the box), so only the density of the change is compared.
    for seed in (1, 2):
        for view in ("frontal", "lateral"):
            _, inside, outside = change_inside_and_outside("Atelectasis", seed, view)
            assert inside > 10 * outside, (seed, view)


def test_fracture_is_boxed_on_the_frontal_view_only():
    share, _, _ = change_inside_and_outside("Fracture", 1, "frontal")
    _, lateral = render_view("lateral", {"Fracture": POSITIVE}, 1, SIZE)
    assert share > 0.6
    assert lateral["boxes"] == []


def test_boxes_are_annotations_inside_the_image():
    labels = dict.fromkeys(BOXED_OBSERVATIONS, POSITIVE)
    for view in ("frontal", "lateral"):
        _, metadata = render_view(view, labels, 3, SIZE)
        assert {box.label for box in metadata["boxes"]} <= set(BOXED_OBSERVATIONS)
        for box in metadata["boxes"]:
            assert (box.score, box.source) == (1.0, "annotated")
            assert 0 <= box.x_min < box.x_max <= SIZE and 0 <= box.y_min < box.y_max <= SIZE


def test_a_study_without_findings_has_no_box():
    labels = dict.fromkeys(CHEXPERT_OBSERVATIONS, NEGATIVE)
    _, metadata = render_study(labels, seed=4, image_size=SIZE, return_metadata=True)
    assert [view["boxes"] for view in metadata] == [[], []]


def test_uncertain_cardiomegaly_is_boxed_and_a_normal_heart_is_not():
    _, uncertain = render_view("frontal", {"Cardiomegaly": UNCERTAIN}, 5, SIZE)
    _, normal = render_view("frontal", {"Cardiomegaly": NEGATIVE}, 5, SIZE)
    assert [box.label for box in uncertain["boxes"]] == ["Cardiomegaly"]
    assert normal["boxes"] == []


def test_bilateral_effusion_gets_one_box_on_each_side():
    strengths = label_strengths({"Pleural Effusion": POSITIVE})
    seed = next(seed for seed in range(100) if len(sample_findings(seed, strengths)["Pleural Effusion"]["sides"]) == 2)
    _, metadata = render_view("frontal", {"Pleural Effusion": POSITIVE}, seed, SIZE)
    left, right = sorted(metadata["boxes"], key=lambda box: box.x_min)
    assert left.label == right.label == "Pleural Effusion"
    assert left.x_max < right.x_min


def test_demo_builder_stores_the_renderer_boxes_per_view(tmp_path):
    dataset = load_cdan_dataset("demo", cache_dir=tmp_path, max_studies_per_split=3, image_size=96)
    rows = [row for split in dataset.values() for row in split]
    assert any(any(view) for row in rows for view in row["boxes"])
    for row in rows:
        _, metadata = render_study(
            row["chexpert_labels"], seed=zlib.crc32(row["id"].encode("utf-8")), image_size=96, return_metadata=True
        )
        assert len(row["boxes"]) == len(row["images"])
        assert [boxes_from_rows(view) for view in row["boxes"]] == [view["boxes"] for view in metadata]
