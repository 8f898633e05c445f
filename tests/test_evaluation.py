"""NLG metrics against pycocoevalcap, clinical efficacy, and the reference points (CPU, offline)."""

import json
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from evaluation_cdan import (
    compute_clinical_efficacy,
    compute_nlg_metrics,
    macro_f1,
    markdown_table,
    most_frequent_report,
    precision_recall_f1,
    shuffled_image_predictions,
    write_evaluation,
)
from labeler_cdan import CHEXPERT_OBSERVATIONS
from processing_cdan import clean_report_iu_xray


ANNOTATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray" / "annotation.json"
# The training report with the highest R2Gen-validation BLEU-4 (found by `best_constant_report` over all 2,069
# training reports; that search takes about 90 s, so this test scores the report it found).
BEST_CONSTANT_REPORT = (
    "the lungs are clear . there is no focal airspace consolidation . no pleural effusion or pneumothorax . heart "
    "size and mediastinal contour are within normal limits . there are degenerative changes of the spine ."
)


@pytest.fixture(scope="module")
def iu_test_references() -> list[str]:
    return [clean_report_iu_xray(entry["report"]) for entry in json.loads(ANNOTATION.read_text())["test"]]


def test_nlg_metrics_equal_pycocoevalcap_on_identical_inputs(iu_test_references):
    references = iu_test_references[:40]
    predictions = iu_test_references[40:80]
    scores = compute_nlg_metrics(references, predictions)
    gts = {index: [text] for index, text in enumerate(references)}
    res = {index: [text] for index, text in enumerate(predictions)}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [scores[f"BLEU-{n}"] for n in range(1, 5)] == bleu
    assert scores["METEOR"] == Meteor().compute_score(gts, res)[0]
    assert scores["ROUGE-L"] == Rouge().compute_score(gts, res)[0]
    assert scores["CIDEr"] == Cider().compute_score(gts, res)[0]


def test_best_constant_report_scores_the_published_reference_point(iu_test_references):
    scores = compute_nlg_metrics(iu_test_references, [BEST_CONSTANT_REPORT] * len(iu_test_references))
    measured = [round(scores[name], 3) for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L")]
    assert measured == [0.503, 0.341, 0.242, 0.174, 0.227, 0.363]


def test_most_frequent_report_is_the_modal_training_report():
    assert most_frequent_report(["a .", "b .", "b .", "c ."]) == "b ."


def test_shuffled_predictions_move_every_report():
    predictions = [f"report {index}" for index in range(25)]
    shuffled = shuffled_image_predictions(predictions, seed=3)
    assert sorted(shuffled) == sorted(predictions)
    assert all(moved != original for moved, original in zip(shuffled, predictions))
    assert shuffled == shuffled_image_predictions(predictions, seed=3)


def test_clinical_efficacy_is_perfect_for_identical_reports():
    reports = ["mild cardiomegaly .", "small left pleural effusion .", "the lungs are clear ."]
    scores = compute_clinical_efficacy(reports, reports)
    assert scores["CE micro-F1"] == scores["CE example-F1"] == 1.0


def test_clinical_efficacy_counts_a_missed_finding():
    references = ["mild cardiomegaly . small left pleural effusion ."]
    predictions = ["mild cardiomegaly ."]
    scores = compute_clinical_efficacy(references, predictions)
    assert scores["CE micro-P"] == 1.0
    assert scores["CE micro-R"] == 0.5
    assert scores["CE F1 Cardiomegaly"] == 1.0
    assert scores["CE F1 Pleural Effusion"] == 0.0


def test_precision_recall_f1_on_a_hand_made_case():
    cardiomegaly, edema = CHEXPERT_OBSERVATIONS.index("Cardiomegaly"), CHEXPERT_OBSERVATIONS.index("Edema")

    def row(*positive_columns: int) -> list[int]:
        return [int(column in positive_columns) for column in range(len(CHEXPERT_OBSERVATIONS))]

    predictions = [row(cardiomegaly), row(cardiomegaly), row(), row(edema)]
    references = [row(cardiomegaly), row(), row(cardiomegaly), row()]
    scores = precision_recall_f1(predictions, references, ("Cardiomegaly", "Edema", "Fracture"))
    assert scores["Cardiomegaly"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert scores["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}
    assert scores["Fracture"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    assert macro_f1(scores, ("Cardiomegaly", "Edema")) == 0.25


def test_clinical_efficacy_macro_f1_is_the_mean_over_the_14_observations(iu_test_references):
    references, predictions = iu_test_references[:60], iu_test_references[60:120]
    scores = compute_clinical_efficacy(references, predictions)
    per_observation = {name: {"f1": scores[f"CE F1 {name}"]} for name in CHEXPERT_OBSERVATIONS}
    assert scores["CE macro-F1"] == macro_f1(per_observation, CHEXPERT_OBSERVATIONS)


def test_evaluation_files_hold_predictions_metrics_and_table(tmp_path):
    results = {"CDAN (this run)": {"BLEU-4": 0.2, "CE macro-F1": 0.3}}
    paths = write_evaluation(tmp_path, ["s1", "s2"], ["a .", "b ."], ["a .", "c ."], results)
    lines = [json.loads(line) for line in paths["predictions"].read_text().splitlines()]
    assert lines[1] == {"id": "s2", "reference": "b .", "generated": "c ."}
    assert json.loads(paths["metrics"].read_text()) == results
    assert "| CDAN (this run) | – | – | – | 0.200 |" in paths["table"].read_text()


def test_markdown_table_lists_published_rows_first():
    table = markdown_table({"run": {"BLEU-4": 0.1}}, {"CDAN (paper)": (0.472, 0.315, 0.230, 0.179, 0.200, 0.386)})
    rows = table.splitlines()
    assert rows[0].startswith("| method | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L |")
    assert rows[2].startswith("| CDAN (paper) (published) | 0.472 |")
    assert rows[3].startswith("| run |")
