"""The rule-based CheXpert labeler (`labeler_cdan`): mentions, negation, uncertainty, "No Finding"; its validation
against IU X-Ray's MeSH tags (`mesh_cdan`).

Hand-written sentences check one rule each; one test scores the labeler against the expert MeSH tags of the R2Gen
validation split of IU X-Ray (offline, from the shared data folder).
"""

from pathlib import Path

import pytest

import configuration_cdan
import labeler_cdan
from evaluation_cdan import macro_f1, precision_recall_f1
from labeler_cdan import (
    CHEXPERT_OBSERVATIONS,
    EVALUATION_OBSERVATIONS,
    MAX_SENTENCE_WORDS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    CheXpertRuleLabeler,
    label_report,
    label_reports,
    to_binary,
)
from mesh_cdan import labels_from_mesh, load_mesh_validation_set, report_text

IU_XRAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray"

# Nine-observation macro-F1 on the R2Gen val split (292 tagged reports, UNCERTAIN counted as negative), measured with
# this labeler: 0.9476 (scripts/evaluate_labeler.py, docs/labeler.md). The threshold leaves a small margin below it.
VAL_MACRO_F1_THRESHOLD = 0.93


def state(text: str, observation: str) -> int:
    return label_report(text)[CHEXPERT_OBSERVATIONS.index(observation)]


def test_observation_order_is_the_configuration_tuple():
    assert CHEXPERT_OBSERVATIONS is configuration_cdan.CHEXPERT_OBSERVATIONS


def test_state_constants_follow_chexpert_csv():
    assert (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED) == (1, 0, -1, -2)


def test_label_report_returns_one_state_per_observation():
    states = label_report("Mild cardiomegaly.")
    assert len(states) == len(CHEXPERT_OBSERVATIONS) == 14


def test_plain_mention_is_positive():
    assert state("There is a large right pleural effusion.", "Pleural Effusion") == POSITIVE


@pytest.mark.parametrize(
    "text, observation",
    [
        ("No pleural effusion.", "Pleural Effusion"),
        ("Without evidence of pneumothorax.", "Pneumothorax"),
        ("Negative for pneumothorax.", "Pneumothorax"),
        ("The lungs are free of focal airspace disease.", "Lung Opacity"),
        ("There is no evidence of focal consolidation.", "Consolidation"),
        ("The heart is not enlarged.", "Cardiomegaly"),
        ("A pneumothorax is not seen.", "Pneumothorax"),
        ("The left pleural effusion has resolved.", "Pleural Effusion"),
        ("Pneumonia is unlikely.", "Pneumonia"),
    ],
)
def test_negation_cue_makes_the_mention_negative(text, observation):
    assert state(text, observation) == NEGATIVE


@pytest.mark.parametrize(
    "text, observation",
    [
        ("The lungs are clear.", "Lung Opacity"),
        ("Heart size is within normal limits.", "Cardiomegaly"),
        ("No acute bony abnormality.", "Fracture"),
    ],
)
def test_normal_statement_makes_the_observation_negative(text, observation):
    assert state(text, observation) == NEGATIVE


def test_negation_covers_every_item_of_a_list():
    states = label_report("No focal consolidation, pneumothorax, or pleural effusion.")
    negated = [
        states[CHEXPERT_OBSERVATIONS.index(name)] for name in ("Consolidation", "Pneumothorax", "Pleural Effusion")
    ]
    assert negated == [NEGATIVE, NEGATIVE, NEGATIVE]


@pytest.mark.parametrize(
    "text",
    [
        "No pneumothorax, but there is a small left pleural effusion.",
        "No pneumothorax; however, a small left pleural effusion is present.",
        "No pneumothorax however small left pleural effusion.",
    ],
)
def test_negation_scope_ends_at_but_or_however(text):
    assert (state(text, "Pneumothorax"), state(text, "Pleural Effusion")) == (NEGATIVE, POSITIVE)


def test_negation_scope_ends_at_the_sentence_end():
    assert state("No pneumothorax. Small left pleural effusion.", "Pleural Effusion") == POSITIVE


@pytest.mark.parametrize(
    "text, observation",
    [
        ("Possible small left pleural effusion.", "Pleural Effusion"),
        ("Right lower lobe opacity may represent pneumonia.", "Pneumonia"),
        ("A small apical pneumothorax cannot be excluded.", "Pneumothorax"),
        ("Cannot exclude a small pneumothorax.", "Pneumothorax"),
        ("Findings suggestive of pulmonary edema.", "Edema"),
        ("Questionable left lower lobe nodule.", "Lung Lesion"),
        ("Left basilar atelectasis versus scarring.", "Atelectasis"),
    ],
)
def test_uncertainty_cue_makes_the_mention_uncertain(text, observation):
    assert state(text, observation) == UNCERTAIN


def test_probable_hedge_asserts_the_finding():
    assert state("Likely left basilar atelectasis.", "Atelectasis") == POSITIVE


def test_negation_carries_through_a_following_hedge():
    assert state("No focal airspace opacity to suggest pneumonia.", "Pneumonia") == NEGATIVE


def test_hypothetical_mention_is_ignored():
    text = "If there is continued concern for rib fracture, dedicated rib films could be obtained."
    assert state(text, "Fracture") == NOT_MENTIONED


@pytest.mark.parametrize(
    "text, observation",
    [
        ("No change in the small left pleural effusion.", "Pleural Effusion"),
        ("No significant interval change in mild cardiomegaly.", "Cardiomegaly"),
        ("Stable cardiomegaly.", "Cardiomegaly"),
    ],
)
def test_no_change_and_stable_keep_the_finding_positive(text, observation):
    assert state(text, observation) == POSITIVE


def test_pericardial_effusion_is_not_a_pleural_effusion():
    assert state("Small pericardial effusion.", "Pleural Effusion") == NOT_MENTIONED


def test_calcified_granuloma_is_not_a_lung_lesion():
    assert state("Calcified granuloma in the right upper lobe.", "Lung Lesion") == NOT_MENTIONED


def test_consolidation_raises_lung_opacity():
    assert state("Right lower lobe consolidation.", "Lung Opacity") == POSITIVE


def test_no_finding_is_positive_for_a_normal_report():
    text = "Heart size is normal. The lungs are clear. No pneumothorax or pleural effusion."
    assert state(text, "No Finding") == POSITIVE


def test_positive_pathology_rules_out_no_finding_despite_normal_summary():
    assert state("Mild cardiomegaly. No acute cardiopulmonary disease.", "No Finding") == NOT_MENTIONED


def test_uncertain_pathology_rules_out_no_finding():
    assert state("Possible small left pleural effusion.", "No Finding") == NOT_MENTIONED


def test_support_device_does_not_rule_out_no_finding():
    text = "Right PICC line with tip in the SVC. The lungs are clear."
    assert (state(text, "Support Devices"), state(text, "No Finding")) == (POSITIVE, POSITIVE)


def test_strict_rule_lets_other_abnormality_rule_out_no_finding():
    assert state("Calcified granuloma in the right upper lobe. No acute disease.", "No Finding") == NOT_MENTIONED


def test_chexpert_rule_ignores_other_abnormality():
    labeler = CheXpertRuleLabeler(no_finding_rule="chexpert")
    states = labeler("Calcified granuloma in the right upper lobe. No acute disease.")
    assert states[CHEXPERT_OBSERVATIONS.index("No Finding")] == POSITIVE


def test_no_finding_is_never_negative():
    texts = ["Mild cardiomegaly.", "No pleural effusion.", "Possible pneumonia.", "", "Calcified granuloma."]
    no_finding = [states[CHEXPERT_OBSERVATIONS.index("No Finding")] for states in label_reports(texts)]
    assert set(no_finding) <= {POSITIVE, NOT_MENTIONED}


@pytest.mark.parametrize(
    "text",
    [
        "Median sternotomy wires are intact.",
        "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
        "Right internal jugular central line with tip in the SVC.",
        "Endotracheal tube tip 4 cm above the carina.",
        "Left chest Port-A-Cath with tip at the cavoatrial junction.",
        "Cholecystectomy clips in the right upper quadrant.",
    ],
)
def test_support_device_variants_are_positive(text):
    assert state(text, "Support Devices") == POSITIVE


def test_removed_device_is_negative():
    assert state("Interval removal of the endotracheal tube.", "Support Devices") == NEGATIVE


def test_deidentification_tokens_match_nothing():
    assert label_report("XXXX XXXX. XXXX-XXXX XXXX.") == label_report("")


def test_deidentification_token_stays_inside_the_negation_scope():
    assert state("There are no XXXX of a pleural effusion.", "Pleural Effusion") == NEGATIVE


def test_empty_report_is_not_mentioned_except_no_finding():
    expected = [POSITIVE if name == "No Finding" else NOT_MENTIONED for name in CHEXPERT_OBSERVATIONS]
    assert label_report("") == expected


@pytest.mark.parametrize(
    "text",
    [
        "No pleural effusion. Possible small left pleural effusion.",
        "Possible small left pleural effusion. No pleural effusion.",
    ],
)
def test_uncertain_mention_outranks_a_negated_one(text):
    assert state(text, "Pleural Effusion") == UNCERTAIN


def test_full_width_text_labels_like_ascii():
    full_width = "ＮＯ　ＰＮＥＵＭＯＴＨＯＲＡＸ．　ＭＩＬＤ　ＣＡＲＤＩＯＭＥＧＡＬＹ．"
    assert label_report(full_width) == label_report("NO PNEUMOTHORAX. MILD CARDIOMEGALY.")


def test_report_without_latin_letters_is_all_not_mentioned():
    assert label_report("右侧少量胸腔积液。心影增大。") == [NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS)


@pytest.mark.parametrize("text", [123, b"No pneumothorax.", None])
def test_label_report_rejects_what_is_not_a_str(text):
    with pytest.raises(TypeError, match="text must be a report as a str"):
        label_report(text)


@pytest.mark.parametrize("texts", ["No pneumothorax.", None, {"study 1": "No pneumothorax."}])
def test_label_reports_rejects_what_is_not_a_collection_of_reports(texts):
    with pytest.raises(TypeError, match="texts must be an iterable of reports"):
        label_reports(texts)


def test_label_reports_names_the_report_that_is_not_a_str():
    with pytest.raises(TypeError, match=r"texts\[1\] must be a report as a str, got NoneType"):
        label_reports(["No pneumothorax.", None])


def test_work_per_mention_is_bounded_in_a_long_unbroken_sentence(monkeypatch):
    decide_state = CheXpertRuleLabeler._decide_state
    cues_compared: list[int] = []

    def counting_decide_state(text, start, end, sentence_cues, terminator_starts):
        cues_compared.append(len(sentence_cues))
        return decide_state(text, start, end, sentence_cues, terminator_starts)

    monkeypatch.setattr(CheXpertRuleLabeler, "_decide_state", staticmethod(counting_decide_state))
    repeats = 2000  # 6,000 words, no sentence end
    with pytest.warns(UserWarning, match=f"longer than {MAX_SENTENCE_WORDS} words without a sentence end"):
        CheXpertRuleLabeler()("no pleural effusion " * repeats)
    assert len(cues_compared) == repeats
    assert max(cues_compared) <= MAX_SENTENCE_WORDS


def test_labeling_is_deterministic():
    text = "Stable cardiomegaly. Possible left basilar atelectasis. No pneumothorax. Left PICC tip in the SVC."
    assert label_report(text) == label_report(text) == CheXpertRuleLabeler()(text)


def test_label_reports_matches_label_report():
    texts = ["Mild cardiomegaly.", "No pleural effusion.", "Possible pneumonia."]
    assert label_reports(texts) == [label_report(text) for text in texts]


def test_mentions_report_the_deciding_cue():
    mentions = CheXpertRuleLabeler().extract_mentions("No pneumothorax.")
    assert [(m.observations, m.text, m.state, m.cue) for m in mentions] == [
        (("Pneumothorax",), "pneumothorax", NEGATIVE, "no")
    ]


def test_to_binary_counts_uncertain_as_positive_by_default():
    assert to_binary([POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED]) == [1, 0, 1, 0]


def test_to_binary_can_count_uncertain_as_negative():
    assert to_binary([POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED], uncertain_as=0) == [1, 0, 0, 0]


def test_to_binary_rejects_an_unknown_state():
    with pytest.raises(ValueError):
        to_binary([3])


def test_labeler_module_holds_labeling_only():
    moved = {"labels_from_mesh", "load_mesh_validation_set", "report_text", "MESH_TO_OBSERVATIONS", "macro_f1",
             "precision_recall_f1"}  # fmt: skip
    assert not moved & (set(labeler_cdan.__all__) | set(vars(labeler_cdan)))


def test_mesh_terms_map_to_observations():
    labels = labels_from_mesh(["Cardiomegaly/mild", "Opacity/lung/base/left/patchy", "Catheters, Indwelling"])
    positives = {name for name, value in zip(CHEXPERT_OBSERVATIONS, labels) if value}
    assert positives == {"Cardiomegaly", "Lung Opacity", "Support Devices"}


def test_mesh_density_outside_the_lung_is_not_a_lung_opacity():
    assert labels_from_mesh(["Density/ribs/right/anterior"]) == [0] * len(CHEXPERT_OBSERVATIONS)


def test_mesh_normal_maps_to_no_finding():
    assert labels_from_mesh(["normal"]) == [int(name == "No Finding") for name in CHEXPERT_OBSERVATIONS]


def test_mesh_validation_set_leaves_out_untagged_and_unindexed_reports():
    # R2Gen val has 296 studies, 4 of them indexed "No Indexing"; the R2Gen test split's tags are withheld.
    counts = [len(load_mesh_validation_set(IU_XRAY, splits=(split,))) for split in ("val", "test")]
    assert counts == [292, 0]


def test_macro_f1_on_iu_xray_val_mesh_tags_meets_the_measured_level():
    reports = load_mesh_validation_set(IU_XRAY, splits=("val",))
    predictions = [to_binary(states, uncertain_as=0) for states in label_reports(report_text(r) for r in reports)]
    references = [labels_from_mesh(report["mesh_major"]) for report in reports]
    scores = precision_recall_f1(predictions, references, EVALUATION_OBSERVATIONS)
    assert macro_f1(scores) >= VAL_MACRO_F1_THRESHOLD
