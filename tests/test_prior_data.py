"""PriorRG's prior studies: `CdanProcessor`'s prior inputs, the demo's synthetic priors and their rule, MIMIC-CXR's
prior views and the collator's choice of prior images (CPU, offline)."""

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from data_cdan import get_cdan_builder
from data_cdan.demo import demo_prior_labels
from data_cdan.synthetic_cxr import render_study
from data_cdan.testing import MimicStudy, write_mimic_fixture
from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NO_FINDING, NOT_MENTIONED, PATHOLOGY_OBSERVATIONS, POSITIVE
from priorrg_modules import DEFAULT_VIEW_POSITIONS
from processing_cdan import CdanProcessor
from trainer_cdan import CdanDataCollator, row_prior_study


IMAGE_SIZE = 32
UNKNOWN_VIEW = len(DEFAULT_VIEW_POSITIONS)
REPORTS = ["Heart size is normal. The lungs are clear.", "Small left pleural effusion."]
EFFUSION = CHEXPERT_OBSERVATIONS.index("Pleural Effusion")
PATHOLOGY = [CHEXPERT_OBSERVATIONS.index(name) for name in PATHOLOGY_OBSERVATIONS]


def study_image(seed: int) -> np.ndarray:
    """A 48 x 48 greyscale image with many grey levels (so that it is not called degenerate)."""
    return np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)


def labels_with(**states: int) -> list[int]:
    """14 CheXpert states, NOT_MENTIONED except the given ones (names with `_` for spaces)."""
    labels = [NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS)
    for name, state in states.items():
        labels[CHEXPERT_OBSERVATIONS.index(name.replace("_", " "))] = state
    return labels


@pytest.fixture(scope="module")
def processor() -> CdanProcessor:
    return CdanProcessor.from_reports(REPORTS, threshold=1, image_size=IMAGE_SIZE, num_views=2)


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------
def test_studies_without_a_prior_get_zeros_and_has_prior_false(processor):
    studies = [[study_image(0), study_image(1)]] * 3
    batch = processor(images=studies, prior_images=[None, [study_image(2), study_image(3)], []])
    assert batch["prior_pixel_values"].shape == batch["pixel_values"].shape
    assert batch["has_prior"].dtype == torch.bool and batch["has_prior"].tolist() == [False, True, False]
    assert not batch["prior_pixel_values"][[0, 2]].any()


def test_a_prior_is_processed_like_a_current_study_of_the_same_images(processor):
    prior = [study_image(2), study_image(3)]
    batch = processor(images=[[study_image(0), study_image(1)]], prior_images=[prior])
    assert torch.equal(batch["prior_pixel_values"][0], processor(images=[prior])["pixel_values"][0])


def test_a_one_image_prior_is_repeated_like_a_one_image_study(processor):
    batch = processor(images=[study_image(0)], prior_images=[[study_image(2)]])
    assert torch.equal(batch["prior_pixel_values"][0, 0], batch["prior_pixel_values"][0, 1])
    assert torch.equal(batch["prior_pixel_values"][0], processor(images=[study_image(2)])["pixel_values"][0])


def test_a_prior_with_another_number_of_views_is_an_error(processor):
    with pytest.raises(ValueError, match=r"Study 0 has 3 view\(s\) but this processor expects num_views=2"):
        processor(images=[study_image(0)], prior_images=[[study_image(1), study_image(2), study_image(3)]])


def test_a_prior_list_of_the_wrong_length_is_an_error(processor):
    with pytest.raises(ValueError, match=r"`prior_images` has 1 item\(s\) but there are 2 studies"):
        processor(images=[study_image(0), study_image(1)], prior_images=[None])


def test_prior_view_ids_are_unknown_without_a_prior(processor):
    batch = processor(
        images=[study_image(0), study_image(1)],
        prior_images=[[study_image(2), study_image(3)], None],
        prior_view_positions=[["PA", "LATERAL"], None],
    )
    assert batch["prior_view_position_ids"].dtype == torch.long
    assert batch["prior_view_position_ids"].tolist() == [[0, 2], [UNKNOWN_VIEW, UNKNOWN_VIEW]]


# --------------------------------------------------------------------------------------------------------------------
# Demo prior rule and rendering
# --------------------------------------------------------------------------------------------------------------------
def test_prior_rule_only_removes_current_findings_or_adds_one_resolved_finding():
    labels = labels_with(Pleural_Effusion=POSITIVE, Edema=POSITIVE, Cardiomegaly=NEGATIVE, Support_Devices=POSITIVE)
    no_finding = CHEXPERT_OBSERVATIONS.index(NO_FINDING)
    for seed in range(300):
        prior = demo_prior_labels(labels, seed)
        if prior is None:
            continue
        changed = [index for index in range(len(labels)) if prior[index] != labels[index] and index != no_finding]
        new = [index for index in changed if labels[index] == POSITIVE and prior[index] == NEGATIVE]
        resolved = [index for index in changed if labels[index] != POSITIVE and prior[index] == POSITIVE]
        assert set(changed) == set(new) | set(resolved), seed
        assert set(changed) <= set(PATHOLOGY) and len(resolved) <= 1, seed


def test_prior_rule_recomputes_no_finding_for_the_prior():
    labels = labels_with(Pleural_Effusion=POSITIVE, No_Finding=NOT_MENTIONED)
    no_finding = CHEXPERT_OBSERVATIONS.index(NO_FINDING)
    priors = [demo_prior_labels(labels, seed) for seed in range(200)]
    clear = [prior for prior in priors if prior is not None and POSITIVE not in [prior[i] for i in PATHOLOGY]]
    assert clear and all(prior[no_finding] == POSITIVE for prior in clear)


def test_about_sixty_percent_of_studies_have_a_prior_and_fraction_zero_gives_none():
    labels = labels_with(Edema=POSITIVE)
    has_prior = [demo_prior_labels(labels, seed) is not None for seed in range(2000)]
    assert 0.57 < np.mean(has_prior) < 0.63
    assert all(demo_prior_labels(labels, seed, prior_fraction=0.0) is None for seed in range(200))


def test_a_prior_rendered_with_the_current_labels_is_pixel_identical():
    labels = labels_with(Pleural_Effusion=POSITIVE)
    current = render_study(labels, seed=123, image_size=64)
    prior = render_study(list(labels), seed=123, image_size=64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(current, prior))


def test_a_prior_with_changed_labels_is_the_same_patient_with_other_findings():
    labels = labels_with(Pleural_Effusion=POSITIVE)
    prior_labels = labels_with(Pleural_Effusion=NEGATIVE)
    current = np.asarray(render_study(labels, seed=123, image_size=64, views=("frontal",))[0], dtype=np.float64)
    prior = np.asarray(render_study(prior_labels, seed=123, image_size=64, views=("frontal",))[0], dtype=np.float64)
    other_patient = np.asarray(render_study(labels, seed=7, image_size=64, views=("frontal",))[0], dtype=np.float64)
    assert not np.array_equal(current, prior)
    same = np.corrcoef(current.ravel(), prior.ravel())[0, 1]
    other = np.corrcoef(current.ravel(), other_patient.ravel())[0, 1]
    assert same > other


# --------------------------------------------------------------------------------------------------------------------
# Demo builder
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    builder = get_cdan_builder("demo", cache_dir=tmp_path_factory.mktemp("demo"), max_studies_per_split=6)
    builder.download_and_prepare(num_proc=1)
    return builder.as_dataset()


def test_every_demo_split_has_studies_with_and_without_a_prior(demo):
    for split, dataset in demo.items():
        counts = {len(paths) for paths in dataset.data.column("prior_images").to_pylist()}
        assert counts == {0, 2}, split


def test_demo_prior_labels_follow_the_seeded_rule(demo):
    for row in demo["train"].select_columns(["id", "chexpert_labels", "prior_labels"]):
        expected = demo_prior_labels(row["chexpert_labels"], zlib.crc32(row["id"].encode("utf-8")))
        assert row["prior_labels"] == expected, row["id"]


def test_demo_prior_images_are_the_renderer_output_for_the_prior_labels(demo):
    rows = [row for dataset in demo.values() for row in dataset if row["prior_labels"] is not None]
    for row in rows:
        seed = zlib.crc32(row["id"].encode("utf-8"))
        expected = render_study(row["prior_labels"], seed=seed, image_size=256, views=row["prior_views"])
        for image, rendered in zip(row["prior_images"], expected):
            assert np.array_equal(np.asarray(image), np.asarray(rendered)), row["id"]


def test_demo_priors_with_unchanged_labels_reuse_the_study_images(demo):
    columns = ["images", "prior_images", "chexpert_labels", "prior_labels"]
    rows = [row for dataset in demo.values() for row in dataset.select_columns(columns).data.to_pylist()]
    unchanged = [row for row in rows if row["prior_labels"] == row["chexpert_labels"]]
    changed = [row for row in rows if row["prior_labels"] not in (None, row["chexpert_labels"])]
    assert unchanged and changed
    for row in unchanged:
        assert [image["path"] for image in row["prior_images"]] == [image["path"] for image in row["images"]]
    for row in changed:
        names = [Path(image["path"]).name.split("_prior_")[-1] for image in row["prior_images"]]
        assert names == ["frontal.png", "lateral.png"]


def test_demo_has_no_history_and_blank_prior_view_positions(demo):
    dataset = demo["train"]
    assert set(dataset["history"]) == {None}
    for positions, views in zip(dataset["prior_view_positions"], dataset["prior_views"]):
        assert positions == [""] * len(views)


def test_collator_prior_flag_passes_the_demo_priors(demo):
    dataset = demo["train"]
    processor = CdanProcessor.from_reports(dataset["findings"], threshold=1, image_size=IMAGE_SIZE)
    rows = [dataset[index] for index in range(len(dataset))]
    batch = CdanDataCollator(processor, include_prior=True, include_view_positions=True)(rows)
    assert batch["has_prior"].tolist() == [row["prior_labels"] is not None for row in rows]
    assert batch["prior_view_position_ids"][batch["has_prior"]].unique().tolist() == [0, 2]  # PA, LATERAL
    with_prior = [row for row in rows if row["prior_labels"] is not None]
    expected = processor(images=[row["prior_images"] for row in with_prior])["pixel_values"]
    assert torch.equal(batch["prior_pixel_values"][batch["has_prior"]], expected)


def test_collator_gives_prior_view_positions_only_to_a_model_that_reads_view_positions(demo):
    dataset = demo["train"]
    processor = CdanProcessor.from_reports(dataset["findings"], threshold=1, image_size=IMAGE_SIZE)
    rows = [dataset[index] for index in range(4)]
    cdan_batch = CdanDataCollator(processor, include_prior=True)(rows)  # CDAN: generate() refuses unknown inputs
    assert "prior_pixel_values" in cdan_batch and "prior_view_position_ids" not in cdan_batch
    priorrg_batch = CdanDataCollator(processor, include_prior=True, include_view_positions=True)(rows)
    assert "prior_view_position_ids" in priorrg_batch


def cached_feature_rows(dataset, count: int = 3) -> list[dict]:
    """Demo rows as the training set holds them with `--cache_visual_features`: features instead of images."""
    rows = [dataset[index] for index in range(count)]
    return [{**row, "visual_features": np.zeros((4, 8), dtype=np.float16)} for row in rows]


def test_collator_gives_cached_feature_rows_their_clinical_context(demo):
    from processing_cdan import build_context_tokenizer
    from trainer_cdan import offline_text_encoder_path

    dataset = demo["train"]
    tokenizer = build_context_tokenizer(offline_text_encoder_path())
    processor = CdanProcessor.from_reports(
        dataset["findings"], threshold=1, image_size=IMAGE_SIZE, context_tokenizer=tokenizer
    )
    rows = cached_feature_rows(dataset)
    batch = CdanDataCollator(processor, include_context=True)(rows)
    expected = processor(indication=[row["indication"] for row in rows], history=[row["history"] for row in rows])
    assert torch.equal(batch["context_input_ids"], torch.as_tensor(expected["context_input_ids"]))
    assert batch["visual_features"].shape == (3, 4, 8)


def test_collator_refuses_a_prior_for_cached_feature_rows(demo):
    processor = CdanProcessor.from_reports(demo["train"]["findings"], threshold=1, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="collate priors without the feature cache"):
        CdanDataCollator(processor, include_prior=True)(cached_feature_rows(demo["train"]))


def test_training_with_a_prior_refuses_cached_features():
    import train

    with pytest.raises(ValueError, match="--prior_study reads the prior's images"):
        train.parse_arguments(["--prior_study", "True", "--cache_visual_features", "True", "--output_dir", "unused"])


# --------------------------------------------------------------------------------------------------------------------
# MIMIC-CXR
# --------------------------------------------------------------------------------------------------------------------
def test_mimic_prior_view_positions_are_aligned_with_the_prior_image_paths(tmp_path):
    def study(study_id, date, views):
        dicom_ids = [f"{study_id:08x}-{k:08x}-0000aaaa-bbbbcccc-dddd{k:04x}" for k in range(len(views))]
        return MimicStudy(10000001, study_id, date, 100000.0, dicom_ids, views, labels={"Edema": 1.0})

    studies = [study(50000011, 21800101, ["LATERAL", "PA", "AP", "LL"]), study(50000012, 21800201, ["PA"])]
    root = write_mimic_fixture(tmp_path / "mimic_cxr", studies, seed=3)  # metadata rows shuffled by the seed
    builder = get_cdan_builder("mimic_cxr", cache_dir=tmp_path / "cache", data_dir=root)
    builder.download_and_prepare()
    rows = {row["study_id"]: row for row in builder.as_dataset()["train"].to_list()}
    later = rows[50000012]
    by_dicom = {Path(path).stem: view for path, view in zip(later["prior_image_paths"], later["prior_view_positions"])}
    expected = {
        f"{50000011:08x}-{k:08x}-0000aaaa-bbbbcccc-dddd{k:04x}": view
        for k, view in enumerate(["LATERAL", "PA", "AP", "LL"])
    }
    assert by_dicom == expected
    assert later["prior_view_positions"] not in (sorted(expected.values()), list(expected.values()))  # a real shuffle
    assert rows[50000011]["prior_view_positions"] == []


def test_a_prior_with_more_images_than_views_keeps_the_current_view_else_the_first():
    row = {
        "views": ["frontal"],
        "view_positions": ["PA"],
        "prior_image_paths": ["lateral.jpg", "pa.jpg", "ap.jpg"],
        "prior_view_positions": ["LATERAL", "PA", "AP"],
    }
    assert row_prior_study(row, num_views=1) == (["pa.jpg"], ["PA"])
    assert row_prior_study({**row, "view_positions": ["LL"]}, num_views=1) == (["lateral.jpg"], ["LATERAL"])
    assert row_prior_study({**row, "prior_image_paths": []}, num_views=1) == (None, None)
