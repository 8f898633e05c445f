"""Reports that agree with the classifier: sentence-level editing of a generated report by CheXpert decisions.

A report generator trained on a few hundred reports writes the common normal sentences even when its own classifier
sees a finding. This module makes the text state the classifier's decisions, at the sentence level, with the same
rule-based labeler the evaluation uses to read reports (`labeler_cdan`):

1. every sentence of the generated report that asserts (POSITIVE or UNCERTAIN) an observation the classifier calls
   negative is removed (a Lung Opacity that the labeler infers from a child observation the classifier calls
   positive does not count);
2. for every observation the classifier calls positive that no remaining sentence asserts, the observation's
   sentence from the training reports is appended (`observation_sentences`: its most frequent training sentence that
   asserts that observation and no other, see `build_observation_sentences`).

"No Finding" is never edited directly: it follows from the other observations. The edit is an option of a checkpoint
(`CdanConfig.observation_sentences`), off by default and outside the paper's CDAN; reports are not changed otherwise.

References: the CheXpert labels of Irvin et al. (AAAI 2019); the idea of keeping a generated report consistent with
predicted labels follows the label-guided refinement of, e.g., Nishino et al. ("Reinforcement learning with
imbalanced dataset for data-to-text medical report generation", Findings of EMNLP 2020) and retrieval of label-matched
sentences as in KERP (Li et al., AAAI 2019). The rules here are ours.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

try:
    from .configuration_cdan import CHEXPERT_OBSERVATIONS, DIAGNOSIS_STATES
    from .labeler_cdan import LUNG_OPACITY_CHILDREN, NO_FINDING, POSITIVE, UNCERTAIN, label_report
except ImportError:
    from configuration_cdan import CHEXPERT_OBSERVATIONS, DIAGNOSIS_STATES
    from labeler_cdan import LUNG_OPACITY_CHILDREN, NO_FINDING, POSITIVE, UNCERTAIN, label_report


LUNG_OPACITY = "Lung Opacity"


def split_sentences(report: str) -> list[str]:
    """The sentences of a cleaned report ("a b . c d ." -> ["a b .", "c d ."]); text after the last period counts."""
    pieces = [piece.strip() for piece in report.split(".")]
    return [f"{piece} ." for piece in pieces if piece]


def asserted_observations(sentence: str) -> set[str]:
    """The observations (not "No Finding") a sentence asserts: POSITIVE or UNCERTAIN under the labeler."""
    states = label_report(sentence)
    pairs = zip(CHEXPERT_OBSERVATIONS, states)
    return {name for name, state in pairs if name != NO_FINDING and state in (POSITIVE, UNCERTAIN)}


def build_observation_sentences(
    reports: Iterable[str], observation_names: Sequence[str] = CHEXPERT_OBSERVATIONS
) -> dict[str, str]:
    """
    For each observation, the most frequent sentence of `reports` that asserts it and no other observation (a child
    of Lung Opacity may come with it); ties go to the shorter, then alphabetically first sentence. Observations that
    no such sentence asserts are left out, and so is "No Finding".

    Args:
        reports (`Iterable[str]`): cleaned training reports (as the processor's `clean_report` gives them).
        observation_names (`Sequence[str]`): the observations to find sentences for (`config.observation_names`).
    """
    counts: dict[str, Counter] = {name: Counter() for name in observation_names if name != NO_FINDING}
    for report in reports:
        for sentence in split_sentences(report):
            asserted = asserted_observations(sentence)
            direct = asserted - {LUNG_OPACITY} if asserted & set(LUNG_OPACITY_CHILDREN) else asserted
            if len(direct) == 1 and (name := next(iter(direct))) in counts:
                counts[name][sentence] += 1
    return {
        name: min(sentence_counts.items(), key=lambda item: (-item[1], len(item[0]), item[0]))[0]
        for name, sentence_counts in counts.items()
        if sentence_counts
    }


def align_report_with_decisions(
    report: str, decisions: Mapping[str, str], observation_sentences: Mapping[str, str]
) -> str:
    """
    Edit `report` so that it asserts the observations `decisions` calls "positive" and none it calls "negative".

    Args:
        report (`str`): a generated (cleaned) report.
        decisions (`Mapping[str, str]`): observation -> "positive", "negative" or "uncertain" (the pipeline's
            `labels`); "uncertain" observations are left as the report has them.
        observation_sentences (`Mapping[str, str]`): see `build_observation_sentences`.

    Returns:
        `str`: the edited report, its kept sentences in their order, then the added ones in observation order.
    """
    negative = {name for name, decision in decisions.items() if decision == "negative" and name != NO_FINDING}
    positive = [name for name, decision in decisions.items() if decision == "positive" and name != NO_FINDING]
    kept, asserted_in_kept = [], set()
    for sentence in split_sentences(report):
        asserted = asserted_observations(sentence)
        if set(positive) & set(LUNG_OPACITY_CHILDREN) & asserted:
            asserted = asserted - {LUNG_OPACITY}  # inferred from a child the classifier confirms
        if asserted & negative:
            continue
        kept.append(sentence)
        asserted_in_kept |= asserted
    missing = [name for name in positive if name not in asserted_in_kept and name in observation_sentences]
    return " ".join(kept + [observation_sentences[name] for name in missing])


def align_reports_with_classifier(
    reports: Sequence[str], decisions: Sequence[Sequence[int]], observation_names: Sequence[str],
    observation_sentences: Mapping[str, str],
) -> list[str]:
    """
    `align_report_with_decisions` for a batch: `decisions` holds one row of indices into `DIAGNOSIS_STATES` per
    report (as `CdanForConditionalGeneration.diagnosis_decisions` gives them), in `observation_names` order.
    """
    if len(reports) != len(decisions):
        raise ValueError(f"{len(reports)} reports but {len(decisions)} rows of decisions.")
    return [
        align_report_with_decisions(
            report, dict(zip(observation_names, (DIAGNOSIS_STATES[state] for state in row))), observation_sentences
        )
        for report, row in zip(reports, decisions)
    ]  # fmt: skip


__all__ = [
    "align_report_with_decisions",
    "align_reports_with_classifier",
    "asserted_observations",
    "build_observation_sentences",
    "split_sentences",
]
