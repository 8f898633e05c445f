"""PriorRG's clinical context and view positions: `CdanProcessor`'s context tokenizer and view ids, the collator's
flags, and the INDICATION / HISTORY sections of MIMIC-CXR reports (CPU, offline)."""

import json

import numpy as np
import pytest
import torch

from data_cdan import get_cdan_builder
from data_cdan.mimic_cxr import report_context_sections
from data_cdan.testing import REAL_JPEG, MimicStudy, write_mimic_fixture
from priorrg_modules import (
    CONTEXT_SECTION_TAGS,
    DEFAULT_VIEW_POSITIONS,
    ViewTemporalEmbeddings,
    format_clinical_context,
)
from processing_cdan import CONTEXT_TOKENIZER_FOLDER, CdanProcessor, build_context_tokenizer
from trainer_cdan import CdanDataCollator, CdanTrainer, offline_text_encoder_path


IMAGE_SIZE = 32
UNKNOWN_VIEW = len(DEFAULT_VIEW_POSITIONS)
REPORTS = ["Heart size is normal. The lungs are clear.", "Small left pleural effusion. Heart size is normal."]
LABELS = [0, 0, -2, -2, -2, -2, -2, -2, 1, -2, -2, -2, -2, -2]


def study_image(seed: int) -> np.ndarray:
    """A 48 x 48 greyscale image with many grey levels (so that it is not called degenerate)."""
    return np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)


@pytest.fixture(scope="module")
def context_tokenizer():
    return build_context_tokenizer(offline_text_encoder_path())


@pytest.fixture(scope="module")
def processor(context_tokenizer) -> CdanProcessor:
    return CdanProcessor.from_reports(
        REPORTS, threshold=1, image_size=IMAGE_SIZE, num_views=2, context_tokenizer=context_tokenizer
    )


@pytest.fixture(scope="module")
def plain_processor() -> CdanProcessor:
    return CdanProcessor.from_reports(REPORTS, threshold=1, image_size=IMAGE_SIZE, num_views=2)


def row(index: int, **columns) -> dict:
    """A dataset row as the collator reads it."""
    return {
        "images": [study_image(2 * index), study_image(2 * index + 1)],
        "views": ["frontal", "lateral"],
        "view_positions": ["", ""],
        "findings": REPORTS[index % 2],
        "chexpert_labels": LABELS,
        **columns,
    }


# --------------------------------------------------------------------------------------------------------------------
# Processor: clinical context
# --------------------------------------------------------------------------------------------------------------------
def test_section_tags_are_single_special_tokens_added_to_the_vocabulary(processor):
    tokenizer = processor.context_tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("[INDICATION] Cough [SEP] [HISTORY] smoker")["input_ids"])
    assert tokens == ["[CLS]", "[INDICATION]", "cough", "[SEP]", "[HISTORY]", "smoke", "##r", "[SEP]"]
    assert all(tokenizer.convert_tokens_to_ids(tag) >= tokenizer.vocab_size for tag in CONTEXT_SECTION_TAGS)


def test_context_ids_are_the_formatted_context_tokenised_and_padded(processor, context_tokenizer):
    indication, history = ["Cough.", None, "Fever."], [None, "Smoker", "COPD"]
    batch = processor(indication=indication, history=history)
    expected = [
        context_tokenizer(format_clinical_context(*sections))["input_ids"] for sections in zip(indication, history)
    ]
    longest = max(len(ids) for ids in expected)
    assert batch["context_input_ids"].shape == (3, longest) and batch["context_input_ids"].dtype == torch.long
    assert batch["context_attention_mask"].dtype == torch.long
    for row_ids, row_mask, ids in zip(batch["context_input_ids"], batch["context_attention_mask"], expected):
        assert row_ids[: len(ids)].tolist() == ids
        assert row_mask.tolist() == [1] * len(ids) + [0] * (longest - len(ids))


def test_a_study_without_context_has_an_all_zero_mask_row(processor):
    batch = processor(indication=[None, "Cough", "   "], history=["", None, None])
    assert batch["context_attention_mask"].any(dim=1).tolist() == [False, True, False]


def test_context_is_truncated_to_max_context_length_ending_with_sep(processor, context_tokenizer):
    long_indication = " ".join(["dyspnea"] * 200)
    batch = processor(indication=[long_indication, "Cough"], max_context_length=16)
    assert batch["context_input_ids"].shape == (2, 16)
    assert batch["context_input_ids"][0, -1].item() == context_tokenizer.sep_token_id


def test_a_non_string_indication_is_a_clear_error_naming_the_study(processor):
    with pytest.raises(TypeError, match=r"`indication` of study 1 must be a string or None, got int"):
        processor(indication=["Cough", 42])


def test_context_lists_of_the_wrong_length_are_an_error(processor):
    with pytest.raises(ValueError, match=r"`history` has 1 item\(s\) but there are 2 studies"):
        processor(images=[study_image(0), study_image(1)], history=["Smoker"])


def test_context_without_a_context_tokenizer_is_a_clear_error(plain_processor):
    with pytest.raises(ValueError, match="no context tokenizer"):
        plain_processor(indication=["Cough"])


# --------------------------------------------------------------------------------------------------------------------
# Processor: view positions
# --------------------------------------------------------------------------------------------------------------------
def test_view_position_ids_follow_view_temporal_embeddings():
    names = ["pa", " LATERAL ", "ll", "AP", "SWIMMERS", None, ""]
    reference = ViewTemporalEmbeddings(hidden_size=4).view_position_ids(names).tolist()
    processor = CdanProcessor.from_reports(REPORTS, threshold=1, image_size=IMAGE_SIZE, num_views=len(names))
    batch = processor(images=[[study_image(k) for k in range(len(names))]], view_positions=[names])
    assert batch["view_position_ids"].dtype == torch.long
    assert batch["view_position_ids"].tolist() == [reference]


def test_one_view_name_is_repeated_and_a_missing_study_is_unknown(processor):
    batch = processor(images=[study_image(0), study_image(1)], view_positions=[["AP"], None])
    assert batch["view_position_ids"].tolist() == [[1, 1], [UNKNOWN_VIEW, UNKNOWN_VIEW]]


def test_view_positions_of_the_wrong_count_are_an_error(processor):
    with pytest.raises(ValueError, match=r"study 0 names 3 view\(s\) but this processor expects num_views=2"):
        processor(images=[[study_image(0), study_image(1)]], view_positions=[["PA", "LATERAL", "LL"]])


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------
def test_context_tokenizer_save_and_load_round_trip(context_tokenizer, tmp_path):
    processor = CdanProcessor.from_reports(
        REPORTS, threshold=1, image_size=IMAGE_SIZE, context_tokenizer=context_tokenizer, max_context_length=24
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert (tmp_path / CONTEXT_TOKENIZER_FOLDER / "tokenizer.json").is_file()
    assert "context_tokenizer" not in config and config["max_context_length"] == 24
    reloaded = CdanProcessor.from_pretrained(tmp_path)
    assert reloaded.context_tokenizer.get_vocab() == context_tokenizer.get_vocab()
    inputs = {"indication": ["Cough " * 30, None], "history": ["Smoker", None]}
    original, loaded = processor(**inputs), reloaded(**inputs)
    assert loaded["context_input_ids"].shape[1] == 24
    assert torch.equal(original["context_input_ids"], loaded["context_input_ids"])
    assert torch.equal(original["context_attention_mask"], loaded["context_attention_mask"])


def test_a_folder_saved_before_the_context_tokenizer_loads_and_behaves_as_before(plain_processor, tmp_path):
    plain_processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    del config["max_context_length"]  # what the processor saved before the context tokenizer existed
    config_file.write_text(json.dumps(config))
    reloaded = CdanProcessor.from_pretrained(tmp_path)
    assert reloaded.context_tokenizer is None and not (tmp_path / CONTEXT_TOKENIZER_FOLDER).exists()
    studies = [[study_image(0), study_image(1)]]
    original, loaded = plain_processor(images=studies, text=REPORTS[:1]), reloaded(images=studies, text=REPORTS[:1])
    assert set(loaded) == {"pixel_values", "labels"}
    assert torch.equal(original["pixel_values"], loaded["pixel_values"])
    assert torch.equal(original["labels"], loaded["labels"])


# --------------------------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------------------------
def test_collator_flags_off_give_the_cdan_batch_even_with_priorrg_columns(processor):
    rows = [row(0, indication="Cough", history="Smoker", prior_images=[], prior_image_paths=[]), row(1)]
    batch = CdanDataCollator(processor)(rows)
    expected = processor(images=[r["images"] for r in rows], text=[r["findings"] for r in rows])
    assert set(batch) == {"pixel_values", "labels", "disease_labels"}
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["labels"], expected["labels"])


def test_collator_context_flag_passes_indication_and_history(processor):
    rows = [row(0, indication="Cough", history=None), row(1, indication=None, history="Smoker")]
    batch = CdanDataCollator(processor, include_context=True)(rows)
    expected = processor(indication=["Cough", None], history=[None, "Smoker"])
    assert torch.equal(batch["context_input_ids"], expected["context_input_ids"])
    assert torch.equal(batch["context_attention_mask"], expected["context_attention_mask"])


def test_collator_view_flag_uses_view_positions_else_the_coarse_view(processor):
    rows = [row(0), row(1, view_positions=["AP", "LL"])]
    batch = CdanDataCollator(processor, include_view_positions=True)(rows)
    assert batch["view_position_ids"].tolist() == [[0, 2], [1, 3]]  # frontal -> PA, lateral -> LATERAL


def test_priorrg_batch_keys_reach_the_model_in_training_and_generation():
    priorrg_keys = {
        "view_position_ids",
        "context_input_ids",
        "context_attention_mask",
        "prior_pixel_values",
        "has_prior",
        "prior_view_position_ids",
    }
    assert priorrg_keys.isdisjoint(CdanTrainer.extra_input_names)


# --------------------------------------------------------------------------------------------------------------------
# MIMIC-CXR report sections
# --------------------------------------------------------------------------------------------------------------------
REPORT_WITH_INDICATION = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for
 infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.
"""
REPORT_WITH_HISTORY = """ WET READ: ___ ___ 10:21 PM
 FINAL REPORT
 CLINICAL HISTORY:  Shortness of breath.
 REASON FOR EXAMINATION:  Evaluate for pneumonia.
 FINDINGS:  Clear lungs.
"""


def test_report_sections_give_indication_and_history_with_whitespace_collapsed():
    assert report_context_sections(REPORT_WITH_INDICATION) == {
        "indication": "___F with new onset ascites // eval for infection",
        "history": None,
    }
    assert report_context_sections(REPORT_WITH_HISTORY) == {
        "indication": "Evaluate for pneumonia.",
        "history": "Shortness of breath.",
    }


def test_a_report_without_context_sections_gives_none():
    assert report_context_sections(" FINAL REPORT\n FINDINGS: Clear.\n IMPRESSION: Normal.\n INDICATION:\n") == {
        "indication": None,
        "history": None,
    }


def test_mimic_builder_reads_indication_and_history_from_the_report_files(tmp_path):
    def study(study_id, report_file_text):
        dicom_id = f"{study_id:08x}-00000000-0000aaaa-bbbbcccc-dddd0000"
        date = 21800101 + study_id % 10
        return MimicStudy(
            10000001,
            study_id,
            date,
            100000.0,
            [dicom_id],
            ["PA"],
            labels={"Edema": 1.0},
            report_file_text=report_file_text,
        )

    root = write_mimic_fixture(
        tmp_path / "mimic_cxr",
        [study(50000011, REPORT_WITH_INDICATION), study(50000012, REPORT_WITH_HISTORY), study(50000013, None)],
        image_source=REAL_JPEG,
    )
    builder = get_cdan_builder("mimic_cxr", cache_dir=tmp_path / "cache", data_dir=root)
    builder.download_and_prepare()
    rows = {r["study_id"]: (r["indication"], r["history"]) for r in builder.as_dataset()["train"].to_list()}
    assert rows == {
        50000011: ("___F with new onset ascites // eval for infection", None),
        50000012: ("Evaluate for pneumonia.", "Shortness of breath."),
        50000013: (None, None),  # no report file
    }
