"""NLG metrics against pycocoevalcap, clinical efficacy, and the reference points (CPU, offline)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from evaluation_cdan import (
    MAX_SCORED_WORDS,
    NLG_METRICS,
    best_constant_report,
    compute_clinical_efficacy,
    compute_nlg_metrics,
    macro_f1,
    markdown_table,
    meteor_score,
    most_frequent_report,
    precision_recall_f1,
    shuffled_image_predictions,
    write_evaluation,
)
import evaluation_cdan
from labeler_cdan import CHEXPERT_OBSERVATIONS
from tokenization_cdan import clean_report_iu_xray


REPOSITORY = Path(__file__).resolve().parents[1]
ANNOTATION = REPOSITORY.parent / "shared" / "data" / "iu_xray" / "annotation.json"
# The training report with the highest R2Gen-validation BLEU-4 (found by `best_constant_report` over all 2,069
# training reports; that search takes about 90 s, so `test_best_constant_report_scores_the_published_reference_point`
# scores the report it found, and `test_best_constant_report_returns_the_best_scoring_training_report` runs the search
# on a real subset).
BEST_CONSTANT_REPORT = (
    "the lungs are clear . there is no focal airspace consolidation . no pleural effusion or pneumothorax . heart "
    "size and mediastinal contour are within normal limits . there are degenerative changes of the spine ."
)


@pytest.fixture(scope="module")
def iu_reports() -> dict[str, list[str]]:
    splits = json.loads(ANNOTATION.read_text())
    return {split: [clean_report_iu_xray(entry["report"]) for entry in entries] for split, entries in splits.items()}


@pytest.fixture(scope="module")
def iu_test_references(iu_reports) -> list[str]:
    return iu_reports["test"]


def run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root; a hang ends as a failed test, not a stuck run."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_nlg_metrics_equal_pycocoevalcap_on_identical_inputs(iu_test_references):
    references = iu_test_references[:40]
    predictions = iu_test_references[40:80]
    scores = compute_nlg_metrics(references, predictions)
    # The metrics score texts with whitespace collapsed (one cleaned test reference ends ".  .").
    gts = {index: [" ".join(text.split())] for index, text in enumerate(references)}
    res = {index: [" ".join(text.split())] for index, text in enumerate(predictions)}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [scores[f"BLEU-{n}"] for n in range(1, 5)] == bleu
    assert scores["METEOR"] == Meteor().compute_score(gts, res)[0]
    assert scores["ROUGE-L"] == Rouge().compute_score(gts, res)[0]
    assert scores["CIDEr"] == Cider().compute_score(gts, res)[0]


def test_best_constant_report_scores_the_published_reference_point(iu_test_references):
    scores = compute_nlg_metrics(iu_test_references, [BEST_CONSTANT_REPORT] * len(iu_test_references))
    measured = [round(scores[name], 3) for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L")]
    assert measured == [0.503, 0.341, 0.242, 0.174, 0.227, 0.363]


def test_best_constant_report_returns_the_best_scoring_training_report(iu_reports):
    candidates, validation = iu_reports["train"][:25], iu_reports["val"][:40]
    report, bleu4 = best_constant_report(candidates, validation)
    scored = [
        compute_nlg_metrics(validation, [candidate] * len(validation), with_meteor=False)["BLEU-4"]
        for candidate in candidates
    ]
    best = scored.index(max(scored))
    assert best > 0  # the subset is informative: the first candidate is not the answer
    assert (report, bleu4) == (candidates[best], scored[best])


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


def test_line_breaks_inside_reports_are_scored_as_spaces_without_hanging():
    code = (
        "import json; from evaluation_cdan import compute_nlg_metrics as score\n"
        "broken = score(['the heart is normal .\\nno effusion .'], ['the heart\\n\\tis  normal .'])\n"
        "spaced = score(['the heart is normal . no effusion .'], ['the heart is normal .'])\n"
        "print(json.dumps([broken, spaced]))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    broken, spaced = json.loads(result.stdout)
    assert broken == spaced and set(broken) == set(NLG_METRICS)


def test_meteor_process_that_never_answers_is_killed_with_a_clear_error():
    code = (
        "import sys; from evaluation_cdan import meteor_score\n"
        "silent = [sys.executable, '-c', 'import time; time.sleep(3600)']\n"
        "try:\n"
        "    meteor_score(['a b'], ['a b'], timeout_s=2, command=silent)\n"
        "except RuntimeError as error:\n"
        "    print(error)"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "METEOR gave no statistics for study 0 within 2 s; its Java process was killed." in result.stdout


def test_meteor_error_answer_raises_instead_of_being_read_as_a_score():
    answers_an_error = [sys.executable, "-c", "print('Error: specify SCORE or EVAL or SING', flush=True); input()"]
    with pytest.raises(RuntimeError, match="METEOR answered 'Error: specify SCORE or EVAL or SING' instead of"):
        meteor_score(["a b"], ["a b"], command=answers_an_error)


def test_long_texts_are_cut_to_the_scored_word_limit_with_a_warning():
    words = [f"word{index % 50}" for index in range(5 * MAX_SCORED_WORDS)]
    long_reference, long_prediction = " ".join(words), " ".join(reversed(words))
    with pytest.warns(UserWarning, match=f"2 of 2 texts to score are longer than {MAX_SCORED_WORDS} words"):
        scores = compute_nlg_metrics([long_reference], [long_prediction], with_meteor=False)
    cut_reference = " ".join(long_reference.split()[:MAX_SCORED_WORDS])
    cut_prediction = " ".join(long_prediction.split()[:MAX_SCORED_WORDS])
    assert scores == compute_nlg_metrics([cut_reference], [cut_prediction], with_meteor=False)


def test_empty_reference_is_an_error():
    with pytest.raises(ValueError, match=r"references\[1\] is empty: a reference report must say something"):
        compute_nlg_metrics(["mild cardiomegaly .", " \n"], ["mild cardiomegaly .", ""], with_meteor=False)


def test_empty_prediction_scores_zero_on_every_nlg_metric():
    scores = compute_nlg_metrics(["the heart is normal . no pleural effusion ."], [""])
    assert scores == dict.fromkeys(NLG_METRICS, 0.0)


def test_empty_prediction_has_no_positive_label():
    scores = compute_clinical_efficacy(["the lungs are clear ."], [""])
    assert scores["CE F1 No Finding"] == scores["CE micro-R"] == scores["CE example-F1"] == 0.0


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: compute_nlg_metrics("abc", "abd"), TypeError, "references must be a list of reports"),
        (lambda: compute_nlg_metrics(["a b ."], [None]), TypeError, r"predictions\[0\] must be a report as a str"),
        (lambda: compute_clinical_efficacy(["a ."], "a ."), TypeError, "predictions must be a list of reports"),
        (lambda: compute_clinical_efficacy({"s1": "a ."}, ["a ."]), TypeError, "references must be a list of reports"),
        (lambda: compute_clinical_efficacy([], []), ValueError, "references is empty"),
        (lambda: compute_nlg_metrics(["a ."], ["a .", "b ."]), ValueError, "1 references but 2 predictions"),
        (lambda: most_frequent_report([]), ValueError, "train_reports is empty"),
        (lambda: best_constant_report([], ["a b ."]), ValueError, "train_reports is empty"),
        (lambda: best_constant_report(["a b ."], []), ValueError, "validation_references is empty"),
    ],
)
def test_bad_evaluation_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ce_macro_f1_counts_absent_observations_as_zero_and_the_observed_variant_does_not():
    # Identical reports with three observations present: Cardiomegaly, Pleural Effusion, No Finding.
    reports = ["mild cardiomegaly .", "small left pleural effusion .", "the lungs are clear ."]
    scores = compute_clinical_efficacy(reports, reports)
    assert scores["CE macro-F1"] == 3 / len(CHEXPERT_OBSERVATIONS)
    assert scores["CE macro-F1 (observed)"] == 1.0


def test_example_based_scores_count_a_study_without_positives_on_either_side_as_perfect():
    # Study 1: only an uncertain finding, so no positive label in either report (P = R = F1 = 1 by convention);
    # study 2: the prediction misses the reference's cardiomegaly and calls the study normal (P = R = F1 = 0).
    references = ["possible pneumonia .", "mild cardiomegaly ."]
    predictions = ["possible pneumonia .", "the lungs are clear ."]
    scores = compute_clinical_efficacy(references, predictions)
    assert scores["CE example-P"] == scores["CE example-R"] == scores["CE example-F1"] == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# The classifier beside the reports
# ---------------------------------------------------------------------------------------------------------------------

CLASSIFIER_REFERENCES = [
    "mild cardiomegaly . small left pleural effusion .",
    "mild cardiomegaly .",
    "the lungs are clear .",
    "small left pleural effusion .",
]


def classifier_logits(
    cardiomegaly: list[float], effusion: list[float], no_finding: list[float] | None = None
) -> np.ndarray:
    """Logits of the 14 observations (all -5), with the given Cardiomegaly, Pleural Effusion (No Finding) columns."""
    logits = np.full((len(cardiomegaly), 14), -5.0)
    if no_finding is not None:
        logits[:, CHEXPERT_OBSERVATIONS.index("No Finding")] = no_finding
    logits[:, CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = cardiomegaly
    logits[:, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = effusion
    return logits


def test_classifier_scores_are_on_the_scale_of_the_reports_ce_macro_f1():
    perfect = classifier_logits([3, 3, -3, -3], [3, -3, -3, 3], no_finding=[-3, -3, 3, -3])
    scores = evaluation_cdan.classifier_scores(perfect, CLASSIFIER_REFERENCES)
    as_reports = compute_clinical_efficacy(CLASSIFIER_REFERENCES, CLASSIFIER_REFERENCES)["CE macro-F1"]
    assert scores["classifier macro-F1"] == pytest.approx(as_reports)  # the same 14-observation average


def test_classifier_scores_apply_each_observations_threshold():
    logits = classifier_logits([1.0, 1.0, 0.5, 0.5], [3, -3, -3, 3])  # Cardiomegaly separable only above 0.75
    thresholds = [0.0] * 14
    untuned = evaluation_cdan.classifier_scores(logits, CLASSIFIER_REFERENCES, thresholds=thresholds)
    thresholds[CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = 0.75
    tuned = evaluation_cdan.classifier_scores(logits, CLASSIFIER_REFERENCES, thresholds=thresholds)
    assert tuned["classifier macro-F1"] == pytest.approx(2 / 14)
    assert untuned["classifier macro-F1"] == pytest.approx((1 + 2 / 3) / 14)


def test_classifier_auroc_averages_observations_with_enough_positives():
    logits = classifier_logits([2, 1, 0, -1], [0, 1, 2, 3])  # Cardiomegaly ranked perfectly, effusion 2 of 4 pairs
    scores = evaluation_cdan.classifier_scores(logits, CLASSIFIER_REFERENCES, min_positives_for_auroc=2)
    assert scores["classifier mean AUROC"] == pytest.approx((1.0 + 0.5) / 2)
    assert math.isnan(evaluation_cdan.classifier_scores(logits, CLASSIFIER_REFERENCES)["classifier mean AUROC"])


def test_classifier_scores_refuse_logits_of_another_shape():
    with pytest.raises(ValueError, match="4 studies, 14 observations"):
        evaluation_cdan.classifier_scores(np.zeros((3, 14)), CLASSIFIER_REFERENCES)
