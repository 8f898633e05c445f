"""Structured CheXpert labels beside the report: calibrated observation thresholds and `return_labels` (issue #12)."""

import json

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from PIL import Image

import train
from configuration_cdan import CdanConfig
from modeling_cdan import CdanForConditionalGeneration
from pipeline_cdan import CdanReportPipeline
from test_modeling import tiny_config
from test_pipeline import FRONTAL, SECOND_FRONTAL, tiny_processor, tiny_report_model
from test_train import r2gen_fixture, run_main_for_one_step  # noqa: F401 (r2gen_fixture is a fixture)
from trainer_cdan import CdanDataCollator, calibrate_observation_thresholds, collect_disease_logits


STUDIES = [str(FRONTAL), (str(FRONTAL), str(SECOND_FRONTAL))]


@pytest.fixture(scope="module")
def reporter() -> CdanReportPipeline:
    processor = tiny_processor()
    return CdanReportPipeline(model=tiny_report_model(processor), processor=processor)


def study_disease_logits(reporter: CdanReportPipeline, study) -> torch.Tensor:
    views = reporter.study_views(study)
    pixel_values = reporter.processor(images=[views], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return reporter.model.get_encoder()(pixel_values=pixel_values).disease_logits[0]


def test_thresholds_round_trip_through_save_and_load(tmp_path):
    thresholds = [0.25 * index - 1.0 for index in range(14)]
    tiny_config(observation_thresholds=thresholds).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["observation_thresholds"] == thresholds
    assert CdanConfig.from_pretrained(tmp_path).observation_thresholds == thresholds
    assert CdanConfig().observation_thresholds is None


@pytest.mark.parametrize("thresholds", [[0.0] * 13, [0.0] * 13 + [float("nan")], [0.0] * 13 + [float("inf")]])
def test_bad_thresholds_are_rejected(thresholds):
    with pytest.raises(StrictDataclassClassValidationError, match="observation_thresholds"):
        tiny_config(observation_thresholds=thresholds)


def test_calibration_picks_the_f1_optimal_threshold():
    # Observation 0: positives at logits -1.0 and -0.5, negatives at -2.0 and 1.0. Thresholds below -1.0 and above
    # -2.0 catch both positives and the negative at 1.0 (F1 0.8), the best; the midpoint -1.5 is that candidate.
    # Observation 1: perfectly separated at 2.0 / 3.0, so the midpoint 2.5 (F1 1.0) beats the default 0.0.
    logits = np.array([[-2.0, 0.5], [-1.0, 3.0], [-0.5, 3.0], [1.0, 2.0]])
    targets = np.array([[0, 0], [1, 1], [1, 1], [0, 0]])
    assert calibrate_observation_thresholds(logits, targets) == [-1.5, 2.5]


def test_calibration_ties_go_to_the_candidate_closest_to_zero():
    # Every threshold between the negative (-3) and the positive (5) is perfect: 0.0 itself is a candidate.
    assert calibrate_observation_thresholds(np.array([[-3.0], [5.0]]), np.array([[0], [1]])) == [0.0]
    # Perfect thresholds lie in (2, 4); of the candidates (0.0 and the midpoints 1.0, 3.0) only 3.0 is perfect.
    assert calibrate_observation_thresholds(np.array([[0.0], [2.0], [4.0]]), np.array([[0], [0], [1]])) == [3.0]


def test_calibration_keeps_zero_without_positives():
    logits = np.array([[-2.0, 1.0], [3.0, -1.0], [0.5, 2.0]])
    targets = np.array([[0, 1], [0, 0], [0, 1]])
    assert calibrate_observation_thresholds(logits, targets) == [0.0, 0.0]


def test_validation_calibration_sets_the_thresholds_main_saves():
    processor = tiny_processor()
    model = tiny_report_model(processor)
    image = Image.open(FRONTAL).convert("L").resize((64, 64))
    no_finding = [-2] * 14
    no_finding[0] = 1
    cardiomegaly = [-2] * 14
    cardiomegaly[2] = 1
    report = "the heart is normal in size ."
    validation = datasets.Dataset.from_list(
        [
            {"images": [image, image.rotate(angle)], "findings": report, "chexpert_labels": labels}
            for angle, labels in ((0, no_finding), (10, cardiomegaly), (20, no_finding))
        ]
    )
    collator = CdanDataCollator(processor, observation_names=model.config.observation_names)
    logits, targets = collect_disease_logits(model, validation, collator, batch_size=2)
    assert logits.shape == targets.shape == (3, 14)
    thresholds = train.set_observation_thresholds(model, validation, collator, batch_size=2)
    assert model.config.observation_thresholds == thresholds == calibrate_observation_thresholds(logits, targets)
    assert thresholds[1] == 0.0  # no validation positive

    without_classifier = CdanForConditionalGeneration(tiny_config(use_reverse_attention=False, vocab_size=40))
    assert train.set_observation_thresholds(without_classifier, validation, collator, batch_size=2) is None
    assert without_classifier.config.observation_thresholds is None


def test_main_saves_calibrated_thresholds(r2gen_fixture, tmp_path):  # noqa: F811
    run_main_for_one_step(r2gen_fixture, tmp_path / "run", "use_semantic_consistency=False", "--ablation", "+RA")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(saved["observation_thresholds"]) == 14
    assert all(np.isfinite(saved["observation_thresholds"]))


def test_return_labels_keeps_the_text_and_gives_calibrated_labels(reporter):
    config = reporter.model.config
    plain = reporter(STUDIES)
    labelled = reporter(STUDIES, return_labels=True)
    assert [[{"generated_text": result["generated_text"]}] for [result] in labelled] == plain

    study_logits = study_disease_logits(reporter, STUDIES[0])
    [result] = labelled[0]
    assert list(result["labels"]) == list(result["probabilities"]) == config.observation_names
    probabilities = torch.tensor(list(result["probabilities"].values()))
    torch.testing.assert_close(probabilities, torch.sigmoid(study_logits), rtol=1e-5, atol=1e-6)
    assert [label == "positive" for label in result["labels"].values()] == (study_logits > 0).tolist()

    # A threshold just above the first observation's logit flips it to negative; one below flips it to positive
    flipped = 0.1 if study_logits[0] > 0 else -0.1
    config.observation_thresholds = [float(study_logits[0]) + flipped] + [0.0] * 13
    try:
        [relabelled] = reporter(STUDIES[0], return_labels=True)
    finally:
        config.observation_thresholds = None
    name = config.observation_names[0]
    assert relabelled["labels"][name] != result["labels"][name]
    assert relabelled["generated_text"] == result["generated_text"]
    assert relabelled["probabilities"] == result["probabilities"]


def test_return_labels_at_construction(reporter):
    labelled = CdanReportPipeline(model=reporter.model, processor=reporter.processor, return_labels=True)
    [result] = labelled(STUDIES[0])
    assert set(result) == {"generated_text", "labels", "probabilities"}
    assert set(labelled(STUDIES[0], return_labels=False)[0]) == {"generated_text"}


def test_return_labels_without_reverse_attention_is_rejected():
    processor = tiny_processor()
    config = tiny_config(vocab_size=len(processor.tokenizer), use_reverse_attention=False)
    reporter = CdanReportPipeline(model=CdanForConditionalGeneration(config).eval(), processor=processor)
    with pytest.raises(ValueError, match="reverse-attention"):
        reporter(STUDIES[0], return_labels=True)
    with pytest.raises(ValueError, match="reverse-attention"):
        CdanReportPipeline(model=reporter.model, processor=processor, return_labels=True)


def test_return_labels_are_uncertain_within_the_margin(reporter):
    config = reporter.model.config
    study_logits = study_disease_logits(reporter, STUDIES[0])
    config.observation_thresholds = [float(study_logits[0]) + 0.1] + [0.0] * 13
    config.diagnosis_uncertainty_margin = 0.5
    try:
        [result] = reporter(STUDIES[0], return_labels=True)
    finally:
        config.observation_thresholds, config.diagnosis_uncertainty_margin = None, 0.0
    assert result["labels"][config.observation_names[0]] == "uncertain"


def test_return_labels_of_a_prompt_model_are_the_decisions_its_decoder_read(tmp_path):
    from transformers import pipeline

    from pipeline_cdan import save_checkpoint

    processor = tiny_processor()
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(
        tiny_config(vocab_size=len(processor.tokenizer), init_std=0.5, tie_word_embeddings=False,
                    use_diagnosis_prompt=True)
    ).eval()  # fmt: skip
    save_checkpoint(model, processor, tmp_path)
    remote = pipeline("image-to-text", model=str(tmp_path), trust_remote_code=True)
    [result] = remote(STUDIES[0], return_labels=True)
    pixel_values = processor(images=[[str(FRONTAL)]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, decoder_input_ids=torch.ones(1, 1, dtype=torch.long))
    read_by_decoder = [("negative", "positive", "uncertain")[state] for state in outputs.diagnosis_states[0].tolist()]
    assert list(result["labels"].values()) == read_by_decoder
