"""Reports edited to agree with the classifier (`consistency_cdan`, `CdanConfig.observation_sentences`)."""

import pytest
import torch

from configuration_cdan import DIAGNOSIS_STATES
from consistency_cdan import (
    align_report_with_decisions,
    align_reports_with_classifier,
    asserted_observations,
    build_observation_sentences,
    split_sentences,
)
from evaluation_cdan import compute_clinical_efficacy


TRAINING_REPORTS = [
    "the heart is normal in size . there is a small left pleural effusion . mild cardiomegaly .",
    "mild cardiomegaly . the lungs are clear .",
    "there is a small left pleural effusion .",
    "large right pleural effusion .",
    "mild cardiomegaly with a small left pleural effusion .",  # two findings: never an observation's sentence
]
SENTENCES = build_observation_sentences(TRAINING_REPORTS)


def test_split_sentences_keeps_text_after_the_last_period():
    assert split_sentences("a b . c d . e") == ["a b .", "c d .", "e ."]


def test_each_observation_gets_its_most_frequent_single_finding_sentence():
    assert SENTENCES == {"Cardiomegaly": "mild cardiomegaly .", "Pleural Effusion": "there is a small left pleural effusion ."}


def test_a_sentence_asserting_a_negative_decision_is_removed():
    report = "the heart is normal in size . mild cardiomegaly . the lungs are clear ."
    edited = align_report_with_decisions(report, {"Cardiomegaly": "negative"}, SENTENCES)
    assert edited == "the heart is normal in size . the lungs are clear ."


def test_a_positive_decision_the_report_misses_adds_its_sentence():
    report = "the heart is normal in size . the lungs are clear ."
    edited = align_report_with_decisions(report, {"Pleural Effusion": "positive"}, SENTENCES)
    assert edited == report + " there is a small left pleural effusion ."


def test_a_positive_decision_the_report_states_adds_nothing():
    report = "large right pleural effusion ."
    assert align_report_with_decisions(report, {"Pleural Effusion": "positive"}, SENTENCES) == report


def test_uncertain_decisions_and_unknown_sentences_leave_the_report():
    report = "mild cardiomegaly ."
    assert align_report_with_decisions(report, {"Cardiomegaly": "uncertain", "Edema": "positive"}, SENTENCES) == report


def test_edited_reports_state_the_decisions_under_the_evaluation_labeler():
    reports = ["the heart is normal in size . mild cardiomegaly .", "the lungs are clear ."]
    states = {name: DIAGNOSIS_STATES.index(name) for name in DIAGNOSIS_STATES}
    decisions = [[states["negative"], states["positive"]], [states["positive"], states["negative"]]]
    edited = align_reports_with_classifier(reports, decisions, ["Cardiomegaly", "Pleural Effusion"], SENTENCES)
    references = ["small left pleural effusion .", "mild cardiomegaly ."]
    assert compute_clinical_efficacy(references, edited)["CE micro-F1"] == 1.0
    assert [asserted_observations(report) for report in edited] == [{"Pleural Effusion"}, {"Cardiomegaly"}]


def test_batch_alignment_needs_one_row_of_decisions_per_report():
    with pytest.raises(ValueError, match="2 reports but 1 rows"):
        align_reports_with_classifier(["a .", "b ."], [[0, 0]], ["Cardiomegaly", "Pleural Effusion"], SENTENCES)


def test_the_pipeline_of_a_checkpoint_with_sentences_edits_its_reports(tmp_path):
    from transformers import pipeline

    from modeling_cdan import CdanForConditionalGeneration
    from pipeline_cdan import save_checkpoint
    from test_modeling import tiny_config
    from test_observation_labels import STUDIES
    from test_pipeline import tiny_processor

    processor = tiny_processor()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(processor.tokenizer), init_std=0.5, tie_word_embeddings=False)
    model = CdanForConditionalGeneration(config).eval()
    model.config.observation_thresholds = [-100.0] * 14  # every observation positive
    model.config.observation_sentences = {"Cardiomegaly": "mild cardiomegaly ."}
    save_checkpoint(model, processor, tmp_path)
    remote = pipeline("image-to-text", model=str(tmp_path), trust_remote_code=True)
    [result] = remote(STUDIES[0])
    assert result["generated_text"].endswith("mild cardiomegaly .")
    assert set(result) == {"generated_text"}
