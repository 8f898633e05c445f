"""The synthetic chest X-ray renderer (`data_cdan.synthetic_cxr`) and the embedded demo report text (`data/demo`)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from configuration_cdan import CHEXPERT_OBSERVATIONS
from data_cdan.synthetic_cxr import (
    NEGATIVE,
    NOT_MENTIONED,
    PNG_TEXT_CHUNKS,
    POSITIVE,
    UNCERTAIN,
    label_strengths,
    render_study,
    render_view,
    save_png,
    synthetic_mark_box,
)
from data_cdan.testing import IU_XRAY

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_REPORTS = REPOSITORY / "data" / "demo" / "reports.jsonl"
DEMO_FIELDS = {"r2gen_id", "openi_uid", "split", "findings", "impression", "indication", "comparison"}
SIZE = 64
DRAWN_FINDINGS = [name for name in CHEXPERT_OBSERVATIONS if name != "No Finding"]


def pixels(labels, seed: int = 3, view: str = "frontal", image_size: int = SIZE) -> np.ndarray:
    image, _ = render_view(view, labels, seed, image_size)
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def demo_records() -> list[dict]:
    with open(DEMO_REPORTS, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_and_labels_give_the_same_pixels():
    labels = {"Cardiomegaly": POSITIVE, "Pleural Effusion": UNCERTAIN}
    first, second = render_study(labels, seed=11, image_size=SIZE), render_study(labels, seed=11, image_size=SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_different_seeds_give_different_images():
    first, second = render_study({}, seed=1, image_size=SIZE), render_study({}, seed=2, image_size=SIZE)
    for a, b in zip(first, second):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() > 2.0


def test_images_are_greyscale_of_the_requested_size_one_per_view():
    images = render_study([NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS), seed=0, image_size=96)
    assert [(image.mode, image.size) for image in images] == [("L", (96, 96)), ("L", (96, 96))]
    assert len(render_study({}, seed=0, image_size=SIZE, views=("lateral",))) == 1


def test_a_view_rendered_alone_equals_the_same_view_of_the_study():
    frontal, lateral = render_study({"Edema": POSITIVE}, seed=5, image_size=SIZE)
    (lateral_alone,) = render_study({"Edema": POSITIVE}, seed=5, image_size=SIZE, views=("lateral",))
    assert np.array_equal(np.asarray(lateral), np.asarray(lateral_alone))
    assert not np.array_equal(np.asarray(frontal), np.asarray(lateral))


def test_frontal_and_lateral_views_differ_in_layout():
    _, metadata = render_study({}, seed=4, image_size=SIZE, return_metadata=True)
    assert [entry["view"] for entry in metadata] == ["frontal", "lateral"]
    assert "heart_width_px" in metadata[0] and "heart_depth" in metadata[1]


def test_cardiomegaly_sets_an_enlarged_cardiothoracic_ratio():
    ratios = {}
    for state in (NEGATIVE, UNCERTAIN, POSITIVE):
        _, (frontal, _) = render_study({"Cardiomegaly": state}, seed=8, image_size=SIZE, return_metadata=True)
        ratios[state] = frontal["cardiothoracic_ratio"]
        assert frontal["heart_width_px"] / frontal["thorax_width_px"] == pytest.approx(ratios[state])
    assert 0.42 <= ratios[NEGATIVE] <= 0.48
    assert 0.58 <= ratios[POSITIVE] <= 0.66
    assert ratios[NEGATIVE] < ratios[UNCERTAIN] < ratios[POSITIVE]


def test_cardiomegaly_widens_the_bright_heart_shadow_on_both_sides_of_the_midline():
    normal = pixels({}, seed=8, image_size=128)
    enlarged = pixels({"Cardiomegaly": POSITIVE}, seed=8, image_size=128)
    brighter_rows, brighter_columns = np.nonzero(enlarged - normal > 20)
    # New heart shadow replaces dark lung at the lower heart borders, left and right of the midline.
    assert len(brighter_rows) > 100
    assert (brighter_rows > 64).mean() > 0.9
    assert (brighter_columns < 64).sum() > 10 and (brighter_columns > 64).sum() > 10
    assert (normal - enlarged > 20).sum() < 10


@pytest.mark.parametrize("observation", DRAWN_FINDINGS)
def test_each_finding_changes_the_image_of_the_same_patient(observation):
    without = np.stack([pixels({}, view=view) for view in ("frontal", "lateral")])
    with_finding = np.stack([pixels({observation: POSITIVE}, view=view) for view in ("frontal", "lateral")])
    assert (np.abs(with_finding - without) > 12).sum() > 5


@pytest.mark.parametrize("observation", ["Lung Lesion", "Pleural Effusion", "Cardiomegaly", "Support Devices"])
def test_an_uncertain_finding_is_drawn_fainter_than_a_positive_one(observation):
    without = pixels({})
    uncertain = np.abs(pixels({observation: UNCERTAIN}) - without).sum()
    positive = np.abs(pixels({observation: POSITIVE}) - without).sum()
    assert 0 < uncertain < positive


def test_negative_not_mentioned_and_no_finding_draw_nothing():
    reference = pixels({})
    assert np.array_equal(pixels({name: NEGATIVE for name in CHEXPERT_OBSERVATIONS}), reference)
    assert np.array_equal(pixels({"No Finding": POSITIVE}), reference)


def test_sequence_and_mapping_labels_are_the_same():
    sequence = [NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS)
    sequence[CHEXPERT_OBSERVATIONS.index("Pneumothorax")] = POSITIVE
    assert np.array_equal(pixels(sequence), pixels({"Pneumothorax": POSITIVE}))


def test_invalid_labels_are_rejected():
    with pytest.raises(ValueError, match="Unknown observations"):
        label_strengths({"Pneumothoraxx": POSITIVE})
    with pytest.raises(ValueError, match="label states"):
        label_strengths([POSITIVE] * 3)
    with pytest.raises(ValueError, match="must be in"):
        label_strengths({"Edema": 2})


def test_every_image_carries_the_same_synthetic_marker():
    left, top, right, bottom = synthetic_mark_box(SIZE)
    marks = [
        pixels(labels, seed=seed, view=view)[top:bottom, left:right]
        for labels, seed in (({}, 0), ({name: POSITIVE for name in CHEXPERT_OBSERVATIONS}, 9))
        for view in ("frontal", "lateral")
    ]
    assert all(np.array_equal(mark, marks[0]) for mark in marks)
    assert set(np.unique(marks[0])) == {0, 255}
    assert (marks[0] == 255).sum() > 100  # the letters of "SYNTHETIC"


def test_saved_png_carries_a_synthetic_text_chunk(tmp_path):
    (image,) = render_study({}, seed=0, image_size=SIZE, views=("frontal",))
    save_png(image, tmp_path / "study.png", extra_text={"Study": "CXR1_1_IM-0001"})
    with PIL.Image.open(tmp_path / "study.png") as reloaded:
        assert reloaded.text["Synthetic"] == PNG_TEXT_CHUNKS["Synthetic"] == "true"
        assert "SYNTHETIC" in reloaded.text["Description"]
        assert reloaded.text["Study"] == "CXR1_1_IM-0001"
        assert np.array_equal(np.asarray(reloaded), np.asarray(image))


# --------------------------------------------------------------------------------------------------------------------
# Demo report text
# --------------------------------------------------------------------------------------------------------------------


def test_demo_reports_have_the_documented_fields_and_split_sizes(demo_records):
    assert all(set(record) == DEMO_FIELDS for record in demo_records)
    counts = {split: sum(record["split"] == split for record in demo_records) for split in ("train", "val", "test")}
    assert counts == {"train": 700, "val": 100, "test": 200}
    assert len({record["r2gen_id"] for record in demo_records}) == 1000
    assert all(record["findings"].strip() for record in demo_records)
    assert DEMO_REPORTS.stat().st_size < 1_000_000


def test_demo_reports_keep_the_r2gen_split_membership(demo_records):
    annotation = json.loads((IU_XRAY / "annotation.json").read_text(encoding="utf-8"))
    split_of = {entry["id"]: split for split, entries in annotation.items() for entry in entries}
    crosswalk = json.loads((IU_XRAY / "r2gen_to_openi_crosswalk.json").read_text(encoding="utf-8"))
    uid_of = {entry["id"]: entry["uid"] for entry in crosswalk}
    assert all(split_of[record["r2gen_id"]] == record["split"] for record in demo_records)
    assert all(uid_of[record["r2gen_id"]] == record["openi_uid"] for record in demo_records)


def test_demo_report_text_is_verbatim_open_i(demo_records):
    with open(IU_XRAY / "openi_reports.jsonl", encoding="utf-8") as lines:
        reports = {report["uid"]: report for report in map(json.loads, lines)}
    for record in demo_records:
        source = reports[record["openi_uid"]]
        assert [record[name] for name in ("findings", "impression", "indication", "comparison")] == [
            source[name] for name in ("findings", "impression", "indication", "comparison")
        ]


def test_demo_reports_are_reproduced_by_the_generator_script(demo_records):
    spec = importlib.util.spec_from_file_location("make_demo_reports", REPOSITORY / "scripts" / "make_demo_reports.py")
    make_demo_reports = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo_reports)
    annotation = json.loads((IU_XRAY / "annotation.json").read_text(encoding="utf-8"))
    crosswalk = json.loads((IU_XRAY / "r2gen_to_openi_crosswalk.json").read_text(encoding="utf-8"))
    with open(IU_XRAY / "openi_reports.jsonl", encoding="utf-8") as lines:
        reports = {report["uid"]: report for report in map(json.loads, lines)}
    assert make_demo_reports.select_demo_studies(annotation, crosswalk, reports) == demo_records
