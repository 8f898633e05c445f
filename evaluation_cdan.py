"""Evaluation of generated radiology reports: COCO-caption NLG metrics, clinical efficacy, and reference points.

- NLG metrics are computed the way the R2Gen family does, with `pycocoevalcap`: BLEU-1..4 (corpus level, with the
  closest-reference brevity penalty), METEOR 1.5 (Java), ROUGE-L and CIDEr-D, on whitespace-tokenised, cleaned text
  (at most `MAX_SCORED_WORDS` words per text; an empty reference is an error, an empty prediction scores 0).
- Clinical efficacy (CE) runs the rule labeler (`labeler_cdan`) over the generated and the reference reports and
  compares the 14 CheXpert observations. Positive means the labeler says POSITIVE. UNCERTAIN, NEGATIVE and
  NOT_MENTIONED count as negative, as in the CE evaluations of R2Gen-family papers. Precision, recall and F1 are
  given three ways: micro (pooled over all study-observation pairs), macro (mean over the 14 observations) and
  example-based (mean over studies). The headline is **macro-F1** over all 14 observations, an observation absent
  from both sides counting as F1 = 0, as in R2Gen's CE script and published tables; "CE macro-F1 (observed)"
  averages only the observations present on either side. The same per-observation scores
  (`precision_recall_f1`, `macro_f1`) validate the labeler against IU X-Ray's MeSH tags (`mesh_cdan`).
- Reference points, scored on the same split, so that a metric cannot flatter a model that ignores the image:
  the most frequent training report, the best constant report (the training report with the highest validation
  BLEU-4, emitted for every study), and the model's own reports with images shuffled across studies.

References: Chen et al., EMNLP 2020 (R2Gen) and ACL 2021 (R2GenCMN) for the protocol; Lin et al. 2014 (COCO
captions) for the scorer; Irvin et al., AAAI 2019 (CheXpert) for the observations.
"""

import contextlib
import json
import random
import subprocess
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from tqdm.auto import tqdm

from consistency_cdan import align_reports_with_classifier
from d2r_modules import ALIGNMENT_TEXT_INPUTS
from labeler_cdan import CHEXPERT_OBSERVATIONS, EVALUATION_OBSERVATIONS, label_reports, to_binary

NLG_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
CE_METRICS = ("CE micro-P", "CE micro-R", "CE micro-F1", "CE macro-P", "CE macro-R", "CE macro-F1",
              "CE macro-F1 (observed)", "CE example-P", "CE example-R", "CE example-F1")  # fmt: skip
PAPER_TABLE_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L")

PUBLISHED_IU_XRAY = {
    "R2Gen (Chen et al., 2020)": (0.470, 0.304, 0.219, 0.165, 0.187, 0.371),
    "R2GenCMN (Chen et al., 2021)": (0.475, 0.309, 0.222, 0.170, 0.191, 0.375),
    "CDAN (Chen, Huang & Tan, 2025)": (0.472, 0.315, 0.230, 0.179, 0.200, 0.386),
}
"""Published IU X-Ray test results, in the columns of the paper's Table 1 (PAPER_TABLE_COLUMNS)."""


MAX_SCORED_WORDS = 1000
"""NLG metrics score at most this many words of each text (the longest Open-I report has 230). Longer texts are cut,
with a warning: METEOR and ROUGE-L take minutes on texts of tens of thousands of words."""

METEOR_TIMEOUT_S = 600.0
"""Seconds the METEOR Java process may take for one `compute_nlg_metrics` call before it is killed."""


MODEL_DISPLAY_NAMES = {"cdan": "CDAN", "priorrg": "PriorRG", "d2r_net": "D2R-Net"}
"""Row names of the evaluation tables by `config.model_type`."""

TRAINING_ONLY_INPUTS = ("labels", "disease_labels", "reference_embeddings", "diagnosis_states", *ALIGNMENT_TEXT_INPUTS)
"""Collator outputs that generation never reads."""


def check_reports(texts: Iterable[str], name: str) -> list[str]:
    """`texts` as a list, after checking that it is a collection of `str` (one report per study), not one string."""
    if isinstance(texts, (str, bytes, bytearray, Mapping)) or not isinstance(texts, Iterable):
        raise TypeError(
            f"{name} must be a list of reports (one str per study), got {type(texts).__name__}; "
            "wrap a single report in a list."
        )
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a report as a str, got {type(text).__name__}.")
    return texts


def check_references(texts: Iterable[str], name: str = "references") -> list[str]:
    """`texts` as a list, after checking that it holds at least one report and no empty one: a reference must say
    something (the dataset builders already drop studies with empty findings)."""
    texts = check_reports(texts, name)
    if not texts:
        raise ValueError(f"{name} is empty: there are no reports to score.")
    for index, text in enumerate(texts):
        if not text.split():
            raise ValueError(f"{name}[{index}] is empty: a reference report must say something; leave that study out.")
    return texts


def check_report_pairs(references: Iterable[str], predictions: Iterable[str]) -> tuple[list[str], list[str]]:
    """References and predictions as lists, after checking them (`check_references`, `check_reports`) and their
    lengths. An empty prediction is allowed: it scores 0 (see `compute_nlg_metrics`, `compute_clinical_efficacy`)."""
    references, predictions = check_references(references), check_reports(predictions, "predictions")
    if len(references) != len(predictions):
        raise ValueError(
            f"{len(references)} references but {len(predictions)} predictions: give one prediction per reference, "
            "in the same order."
        )
    return references, predictions


def scoring_texts(texts: Sequence[str]) -> list[str]:
    """The texts as the NLG metrics see them: whitespace (line breaks, tabs, repeated spaces) collapsed to single
    spaces, and each text cut to its first `MAX_SCORED_WORDS` words."""
    words = [text.split() for text in texts]
    cut = sum(len(text_words) > MAX_SCORED_WORDS for text_words in words)
    if cut:
        warnings.warn(
            f"{cut} of {len(texts)} texts to score are longer than {MAX_SCORED_WORDS} words; each was scored on its "
            f"first {MAX_SCORED_WORDS} words (evaluation_cdan.MAX_SCORED_WORDS).",
            stacklevel=3,
        )
    return [" ".join(text_words[:MAX_SCORED_WORDS]) for text_words in words]


def meteor_command() -> tuple[list[str], Path]:
    """The METEOR 1.5 command line of `pycocoevalcap` (its bundled jar, English, normalised), and its folder."""
    from pycocoevalcap.meteor import meteor as pycocoevalcap_meteor

    folder = Path(pycocoevalcap_meteor.__file__).resolve().parent
    jar = pycocoevalcap_meteor.METEOR_JAR
    return ["java", "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"], folder


def meteor_score(
    references: Sequence[str],
    predictions: Sequence[str],
    timeout_s: float = METEOR_TIMEOUT_S,
    command: Sequence[str] | None = None,
) -> float:
    """
    Corpus METEOR 1.5 of `predictions` against `references`, with the jar and the line protocol that
    `pycocoevalcap`'s `Meteor` uses (one `SCORE` line per study, then one `EVAL` line), so the score is the same. The
    Java process is ours: it is killed after `timeout_s` seconds or on any unexpected answer, and the failure raises
    a `RuntimeError` instead of hanging.

    Args:
        references (`Sequence[str]`): one reference per study, whitespace already collapsed (`scoring_texts`).
        predictions (`Sequence[str]`): one prediction per study, in the same order.
        timeout_s (`float`, *optional*, defaults to `METEOR_TIMEOUT_S`): seconds before the process is killed.
        command (`Sequence[str]`, *optional*): the process to run instead of `meteor_command()`.
    """
    folder = None
    if command is None:
        command, folder = meteor_command()
    try:
        process = subprocess.Popen(
            list(command), cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError as error:
        raise RuntimeError(
            f"METEOR could not start {command[0]!r}: it needs a Java runtime on PATH. Install Java (8 or newer) or "
            "pass with_meteor=False."
        ) from error
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        process.kill()

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.daemon = True
    watchdog.start()

    def ask(line: str) -> None:
        process.stdin.write((line + "\n").encode("utf-8"))
        process.stdin.flush()

    def answer(what: str) -> str:
        line = process.stdout.readline().decode("utf-8", errors="replace").strip()
        try:
            numbers = [float(value) for value in line.split()]
        except ValueError:
            numbers = []
        if numbers:
            return line
        if expired.is_set():
            raise RuntimeError(f"METEOR gave no {what} within {timeout_s:g} s; its Java process was killed.")
        if not line:
            raise RuntimeError(f"METEOR's Java process stopped before giving {what}.")
        raise RuntimeError(f"METEOR answered {line[:200]!r} instead of {what}; its Java process was killed.")

    try:
        statistics = []
        for index, (reference, prediction) in enumerate(zip(references, predictions, strict=True)):
            # "|||" separates the fields of METEOR's protocol, so it cannot appear inside a text.
            reference, prediction = (" ".join(text.replace("|||", " ").split()) for text in (reference, prediction))
            ask(f"SCORE ||| {reference} ||| {prediction}")
            statistics.append(answer(f"statistics for study {index}"))
        ask("EVAL ||| " + " ||| ".join(statistics))
        for index in range(len(statistics)):
            answer(f"the score of study {index}")
        return float(answer("the corpus score"))
    except OSError as error:
        reason = f"no answer within {timeout_s:g} s" if expired.is_set() else f"its pipe broke ({error})"
        raise RuntimeError(f"METEOR failed: {reason}; its Java process was killed.") from error
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.stdout.close()


def compute_nlg_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    with_meteor: bool = True,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float]:
    """
    BLEU-1..4, METEOR, ROUGE-L and CIDEr as `pycocoevalcap` computes them.

    Every text is first collapsed to single spaces (a line break inside a report would break METEOR's line
    protocol) and cut to its first `MAX_SCORED_WORDS` words, with a warning that counts the texts cut.

    Conventions: an empty reference is an error (a reference must say something). An empty prediction is scored as
    a report without words: it matches nothing, so its own BLEU, METEOR, ROUGE-L and CIDEr are 0, and the
    corpus-level BLEU and METEOR count its reference's words as missed. Predictions that are all empty score 0 on
    every metric.

    Args:
        references (`Sequence[str]`): one cleaned reference report per study.
        predictions (`Sequence[str]`): one generated report per study, in the same order.
        with_meteor (`bool`, *optional*, defaults to `True`): METEOR starts a Java process; turn it off for fast
            validation during training.
        meteor_timeout_s (`float`, *optional*, defaults to `METEOR_TIMEOUT_S`): seconds before METEOR's Java
            process is killed and a `RuntimeError` raised.
    """
    references, predictions = check_report_pairs(references, predictions)
    texts = scoring_texts([*references, *predictions])
    references, predictions = texts[: len(references)], texts[len(references) :]
    gts = {index: [text] for index, text in enumerate(references)}
    res = {index: [text] for index, text in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    if with_meteor:
        scores["METEOR"] = meteor_score(references, predictions, timeout_s=meteor_timeout_s)
    # `Rouge` divides by the prediction's length, so an empty prediction gets its score of 0 here.
    rouge = Rouge()
    per_study = [rouge.calc_score([p], [r]) if p else 0.0 for r, p in zip(references, predictions)]
    scores["ROUGE-L"] = float(np.mean(np.array(per_study)))
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def binary_labels(reports: Sequence[str]) -> list[list[int]]:
    """0/1 observations of each report: POSITIVE is 1; UNCERTAIN, NEGATIVE and NOT_MENTIONED are 0. A report without
    words asserts nothing and has no positive label (the labeler itself would call it "No Finding")."""
    labels = [to_binary(states, uncertain_as=0) for states in label_reports(reports)]
    return [row if report.split() else [0] * len(row) for report, row in zip(reports, labels)]


def harmonic_mean(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def precision_recall_f1(
    predictions: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    observations: Sequence[str] = CHEXPERT_OBSERVATIONS,
) -> dict[str, dict[str, float]]:
    """Per-observation precision, recall, F1 and support of 0/1 predictions against 0/1 references.

    Args:
        predictions (`Sequence[Sequence[int]]`):
            0/1 predictions, one row per report, columns in `CHEXPERT_OBSERVATIONS` order.
        references (`Sequence[Sequence[int]]`):
            0/1 ground truth of the same shape.
        observations (`Sequence[str]`, *optional*):
            The observations to score.

    Returns:
        `dict[str, dict[str, float]]`: For each observation, ``precision``, ``recall``, ``f1`` (0 where undefined),
        ``support`` (reference positives) and ``predicted`` (predicted positives).
    """
    scores = {}
    for name in observations:
        column = CHEXPERT_OBSERVATIONS.index(name)
        true_positives = sum(1 for p, r in zip(predictions, references) if p[column] and r[column])
        predicted = sum(1 for p in predictions if p[column])
        support = sum(1 for r in references if r[column])
        precision = true_positives / predicted if predicted else 0.0
        recall = true_positives / support if support else 0.0
        f1 = harmonic_mean(precision, recall)
        scores[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}
    return scores


def macro_f1(scores: dict[str, dict[str, float]], observations: Sequence[str] = EVALUATION_OBSERVATIONS) -> float:
    """Mean F1 over `observations` (by default `EVALUATION_OBSERVATIONS`, the labeler's nine headline observations)."""
    return sum(scores[name]["f1"] for name in observations) / len(observations)


def compute_clinical_efficacy(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """
    CE precision, recall and F1 over the 14 CheXpert observations: micro, macro and example-based.

    - "CE macro-P/R/F1" average over all 14 observations, and an observation positive in neither the references
      nor the predictions counts as 0 (scikit-learn's `f1_score(average="macro", zero_division=0)` over the 14
      columns, as in R2Gen's CE script), so identical reports score below 1 unless all 14 occur. This is the
      figure published tables report.
    - "CE macro-F1 (observed)" averages F1 only over the observations positive in the references or the
      predictions; identical reports score 1.0 (also when no observation is positive anywhere).
    - Example-based scores count a study with no positive observation in either report as perfect (P = R = F1 = 1).

    An empty reference is an error; an empty prediction has no positive label. Per-observation F1 values are
    returned as `CE F1 <observation>`.
    """
    references, predictions = check_report_pairs(references, predictions)
    reference_labels, predicted_labels = binary_labels(references), binary_labels(predictions)
    per_observation = precision_recall_f1(predicted_labels, reference_labels)
    scores: dict[str, float] = {f"CE F1 {name}": values["f1"] for name, values in per_observation.items()}
    for key, label in (("precision", "P"), ("recall", "R"), ("f1", "F1")):
        scores[f"CE macro-{label}"] = sum(values[key] for values in per_observation.values()) / len(per_observation)
    observed = [values["f1"] for values in per_observation.values() if values["support"] or values["predicted"]]
    scores["CE macro-F1 (observed)"] = sum(observed) / len(observed) if observed else 1.0

    true_positives = sum(
        p * r for row_p, row_r in zip(predicted_labels, reference_labels) for p, r in zip(row_p, row_r)
    )
    predicted, actual = sum(map(sum, predicted_labels)), sum(map(sum, reference_labels))
    scores["CE micro-P"] = true_positives / predicted if predicted else 0.0
    scores["CE micro-R"] = true_positives / actual if actual else 0.0
    scores["CE micro-F1"] = harmonic_mean(scores["CE micro-P"], scores["CE micro-R"])

    per_example = []
    for row_p, row_r in zip(predicted_labels, reference_labels):
        hits, guessed, true = sum(p * r for p, r in zip(row_p, row_r)), sum(row_p), sum(row_r)
        if not guessed and not true:
            per_example.append((1.0, 1.0, 1.0))
            continue
        precision, recall = hits / guessed if guessed else 0.0, hits / true if true else 0.0
        per_example.append((precision, recall, harmonic_mean(precision, recall)))
    for position, label in enumerate(("P", "R", "F1")):
        scores[f"CE example-{label}"] = sum(values[position] for values in per_example) / len(per_example)
    return scores


def most_frequent_report(train_reports: Sequence[str]) -> str:
    """The training report that occurs most often (ties broken by first occurrence)."""
    train_reports = check_reports(train_reports, "train_reports")
    if not train_reports:
        raise ValueError("train_reports is empty: the most frequent report needs at least one training report.")
    return Counter(train_reports).most_common(1)[0][0]


def best_constant_report(train_reports: Sequence[str], validation_references: Sequence[str]) -> tuple[str, float]:
    """
    The training report that, emitted for every validation study, scores the highest BLEU-4 (the first such report
    on a tie). Texts are scored as in `compute_nlg_metrics`.

    Returns:
        `(report, validation_bleu4)`.
    """
    train_reports = check_reports(train_reports, "train_reports")
    if not train_reports:
        raise ValueError("train_reports is empty: the best constant report needs at least one training report.")
    references = check_references(validation_references, "validation_references")
    candidates = list(dict.fromkeys(train_reports))  # unique, in order
    texts = scoring_texts([*references, *candidates])
    gts = {index: [text] for index, text in enumerate(texts[: len(references)])}
    best_report, best_bleu4 = None, -1.0
    for candidate, scored in zip(candidates, texts[len(references) :]):
        bleu, _ = Bleu(4).compute_score(gts, {index: [scored] for index in gts}, verbose=0)
        if bleu[3] > best_bleu4:
            best_report, best_bleu4 = candidate, float(bleu[3])
    return best_report, best_bleu4


def shuffled_image_predictions(predictions: Sequence[str], seed: int = 0) -> list[str]:
    """
    The model's reports with images shuffled across studies: study `i` receives the report the model wrote for the
    images of study `permutation[i]`, a random permutation without fixed points. Generation is per study, so this is
    exactly what generating from shuffled images gives, without a second pass.
    """
    predictions = check_reports(predictions, "predictions")
    if len(predictions) < 2:
        raise ValueError(f"Shuffling images needs at least two studies; predictions has {len(predictions)}.")
    order = list(range(len(predictions)))
    rng = random.Random(seed)
    rng.shuffle(order)
    derangement = order[1:] + order[:1]  # a cyclic shift of a random order has no fixed point
    permutation = [0] * len(order)
    for source, target in zip(order, derangement):
        permutation[source] = target
    return [predictions[permutation[index]] for index in range(len(predictions))]


def score_reports(references: Sequence[str], predictions: Sequence[str], with_meteor: bool = True) -> dict[str, float]:
    """NLG and CE metrics together."""
    return {
        **compute_nlg_metrics(references, predictions, with_meteor),
        **compute_clinical_efficacy(references, predictions),
    }


def evaluate_with_reference_points(
    references: Sequence[str],
    predictions: Sequence[str],
    train_reports: Sequence[str],
    validation_references: Sequence[str],
    seed: int = 0,
    with_meteor: bool = True,
    model_name: str = "CDAN",
) -> dict[str, dict[str, float]]:
    """
    Score the model and the three reference points on the same split.

    Returns:
        `{row_name: metrics}` with rows "{model_name} (this run)", "most frequent training report", "best constant
        report", "{model_name}, images shuffled".
    """
    frequent = most_frequent_report(train_reports)
    constant, _ = best_constant_report(train_reports, validation_references)
    rows = {
        f"{model_name} (this run)": predictions,
        "most frequent training report": [frequent] * len(references),
        "best constant report": [constant] * len(references),
        f"{model_name}, images shuffled": shuffled_image_predictions(predictions, seed),
    }
    return {name: score_reports(references, texts, with_meteor) for name, texts in rows.items()}


def markdown_table(results: dict[str, dict[str, float]], published: dict[str, Sequence[float]] | None = None) -> str:
    """
    A Markdown table with the columns of the paper's Table 1, then CIDEr and the headline CE scores, and the
    classifier's scores (`classifier_scores`) when a row has them.
    """
    columns = (*PAPER_TABLE_COLUMNS, "CIDEr", "CE macro-F1", "CE micro-F1", "CE example-F1", "CE macro-F1 (observed)")
    classifier_columns = ("classifier macro-F1", "classifier mean AUROC", "report/classifier macro-F1")
    if any(column in metrics for metrics in results.values() for column in classifier_columns):
        columns += classifier_columns
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in (published or {}).items():
        cells = [f"{value:.3f}" for value in values] + ["–"] * (len(columns) - len(values))
        lines.append(f"| {name} (published) | " + " | ".join(cells) + " |")
    for name, metrics in results.items():
        cells = [f"{metrics[column]:.3f}" if column in metrics else "–" for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evaluation(
    output_dir: str | Path,
    ids: Sequence[str],
    references: Sequence[str],
    predictions: Sequence[str],
    results: dict[str, dict[str, float]],
    published: dict[str, Sequence[float]] | None = None,
) -> dict[str, Path]:
    """
    Write `predictions.jsonl` (id, reference, generated), `metrics.json` and `metrics.md`.

    Returns:
        The paths written, by kind.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": output_dir / "predictions.jsonl",
        "metrics": output_dir / "metrics.json",
        "table": output_dir / "metrics.md",
    }
    with paths["predictions"].open("w", encoding="utf-8") as handle:
        for study_id, reference, generated in zip(ids, references, predictions, strict=True):
            handle.write(json.dumps({"id": study_id, "reference": reference, "generated": generated}) + "\n")
    paths["metrics"].write_text(json.dumps(results, indent=2), encoding="utf-8")
    paths["table"].write_text(markdown_table(results, published), encoding="utf-8")
    return paths


def model_display_name(model) -> str:
    """The name of a model's rows in the evaluation tables: "CDAN" (also without a model) or "PriorRG"."""
    model_type = getattr(getattr(model, "config", None), "model_type", "cdan")
    return MODEL_DISPLAY_NAMES.get(model_type, model_type)


def generate_reports_and_disease_logits(
    model, processor, dataset, batch_size: int = 16, collator=None, **generation_kwargs
) -> tuple[list[str], np.ndarray | None]:
    """
    Generate one report per study of `dataset` (rows with `images`, or cached `visual_features`), in order, and keep
    the classifier's disease logits `u_c` of the same encoder pass (each study is encoded once). A model with
    `config.observation_sentences` has its reports edited to agree with its classifier (`consistency_cdan`).

    Args:
        model (`CdanForConditionalGeneration`): the model.
        processor (`CdanProcessor`): its processor.
        dataset (`datasets.Dataset`): the studies.
        batch_size (`int`, *optional*, defaults to 16): studies per `generate()` call.
        collator (`CdanDataCollator`, *optional*): builds the model inputs from the rows, for models that read more
            than the images (clinical context, prior study, view positions); the images alone when `None`.
        generation_kwargs: passed to `generate()` (e.g. `num_beams=3, max_length=60`).

    Returns:
        `(reports, disease_logits)`: the reports, and the `(studies, num_observations)` logits (`None` for a model
        without the reverse-attention classifier).
    """
    model.eval()
    reports: list[str] = []
    disease_logits: list[np.ndarray] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Generating reports", unit="batch"):
        if collator is not None:  # the collator takes row dicts; the batch is decoded once, here
            batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
            inputs = {key: value for key, value in batch.items() if key not in TRAINING_ONLY_INPUTS}
        else:
            rows = dataset[start : start + batch_size]
            if "visual_features" in rows:
                inputs = {"visual_features": torch.as_tensor(np.asarray(rows["visual_features"], dtype=np.float32))}
            else:
                inputs = {"pixel_values": processor(images=rows["images"], return_tensors="pt")["pixel_values"]}
        with torch.inference_mode():
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            encoder_outputs = model.get_encoder()(**inputs)
            generated = model.generate(**inputs, encoder_outputs=encoder_outputs, **generation_kwargs)
        batch_reports = processor.batch_decode(generated, skip_special_tokens=True)
        if getattr(encoder_outputs, "disease_logits", None) is not None:
            disease_logits.append(encoder_outputs.disease_logits.float().cpu().numpy())
            if model.config.observation_sentences:  # reports edited to agree with the classifier (an option)
                batch_reports = align_reports_with_classifier(
                    batch_reports, model.diagnosis_decisions(encoder_outputs.disease_logits).tolist(),
                    model.config.observation_names, model.config.observation_sentences,
                )  # fmt: skip
        reports.extend(batch_reports)
    return reports, (np.concatenate(disease_logits) if disease_logits else None)


def generate_reports(model, processor, dataset, batch_size: int = 16, **generation_kwargs) -> list[str]:
    """The reports of `generate_reports_and_disease_logits`, without the logits."""
    return generate_reports_and_disease_logits(model, processor, dataset, batch_size, **generation_kwargs)[0]


def mean_auroc(targets: np.ndarray, scores: np.ndarray, min_positives: int = 1) -> float:
    """
    Mean AUROC over the columns of `(studies, observations)` 0/1 `targets` with at least `min_positives` positives and
    one negative; NaN when no column qualifies.
    """
    from sklearn.metrics import roc_auc_score

    targets, scores = np.asarray(targets), np.asarray(scores)
    aurocs = [
        roc_auc_score(targets[:, column], scores[:, column])
        for column in range(targets.shape[1])
        if min_positives <= targets[:, column].sum() < len(targets)
    ]
    return float(np.mean(aurocs)) if aurocs else float("nan")


def classifier_scores(
    disease_logits: np.ndarray,
    references: Sequence[str],
    observation_names: Sequence[str] = CHEXPERT_OBSERVATIONS,
    thresholds: Sequence[float] | None = None,
    min_positives_for_auroc: int = 3,
) -> dict[str, float]:
    """
    What the model sees: its reverse-attention classifier scored against the labels of the reference reports, on the
    same scale as the reports' CE scores, so the two can be compared study for study.

    - "classifier macro-F1": an observation is positive when its logit exceeds its threshold; F1 per observation
      against the references' labels (POSITIVE is 1, the rest 0, as in `compute_clinical_efficacy`), averaged over
      all 14 observations like "CE macro-F1" (observations the model does not classify count as 0).
    - "classifier mean AUROC": mean over the observations with at least `min_positives_for_auroc` positive and one
      negative reference.

    Args:
        disease_logits (`np.ndarray`): `(studies, len(observation_names))` logits `u_c`.
        references (`Sequence[str]`): the reference reports, in the same order.
        observation_names (`Sequence[str]`): the logits' observations (`config.observation_names`).
        thresholds (`Sequence[float]`, *optional*): per-observation logit thresholds (`config.observation_thresholds`);
            0.0 for all when `None`.
        min_positives_for_auroc (`int`): see above.
    """
    disease_logits = np.asarray(disease_logits, dtype=np.float64)
    references = check_references(references)
    if disease_logits.shape != (len(references), len(observation_names)):
        raise ValueError(
            f"`disease_logits` has shape {disease_logits.shape}; expected ({len(references)} studies, "
            f"{len(observation_names)} observations)."
        )
    thresholds = np.zeros(len(observation_names)) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    reference_labels = np.asarray(binary_labels(references))  # (studies, 14), CHEXPERT_OBSERVATIONS order
    columns = [CHEXPERT_OBSERVATIONS.index(name) for name in observation_names]
    predicted_labels = np.zeros_like(reference_labels)
    predicted_labels[:, columns] = disease_logits > thresholds
    per_observation = precision_recall_f1(predicted_labels.tolist(), reference_labels.tolist())
    return {
        "classifier macro-F1": sum(values["f1"] for values in per_observation.values()) / len(per_observation),
        "classifier mean AUROC": mean_auroc(reference_labels[:, columns], disease_logits, min_positives_for_auroc),
    }


def reference_reports(processor, dataset) -> list[str]:
    """The reference reports of a split: each study's `findings`, cleaned by the processor's report cleaner."""
    return [processor.clean_report(report) for report in dataset["findings"]]


def evaluate_split(
    model,
    processor,
    dataset_dict,
    output_dir: str | Path,
    split: str = "test",
    batch_size: int = 16,
    seed: int = 0,
    published: dict[str, Sequence[float]] | None = None,
    with_meteor: bool = True,
    collator=None,
    **generation_kwargs,
) -> dict[str, dict[str, float]]:
    """
    Generate reports for `split`, score them with the reference points, and write predictions, metrics and table.

    The references are the cleaned `findings` of each study; the reference points use the `train` and `validation`
    splits of `dataset_dict`. For a model with the reverse-attention classifier, the model's row also has the
    classifier's own scores on the same studies (`classifier_scores`) and "report/classifier macro-F1", the share of
    what the model sees that its reports say.
    """
    dataset = dataset_dict[split]
    predictions, disease_logits = generate_reports_and_disease_logits(
        model, processor, dataset, batch_size, collator=collator, **generation_kwargs
    )
    model_name = model_display_name(model)
    references = reference_reports(processor, dataset)
    results = evaluate_with_reference_points(
        references,
        predictions,
        train_reports=reference_reports(processor, dataset_dict["train"]),
        validation_references=reference_reports(processor, dataset_dict["validation"]),
        seed=seed,
        with_meteor=with_meteor,
        model_name=model_name,
    )
    if disease_logits is not None:
        model_row = results[f"{model_name} (this run)"]
        model_row.update(
            classifier_scores(
                disease_logits, references, model.config.observation_names, model.config.observation_thresholds
            )
        )
        classifier_f1 = model_row["classifier macro-F1"]
        model_row["report/classifier macro-F1"] = model_row["CE macro-F1"] / classifier_f1 if classifier_f1 else 0.0
    write_evaluation(Path(output_dir), dataset["id"], references, predictions, results, published)
    return results


__all__ = [
    "CE_METRICS",
    "MAX_SCORED_WORDS",
    "METEOR_TIMEOUT_S",
    "MODEL_DISPLAY_NAMES",
    "NLG_METRICS",
    "PAPER_TABLE_COLUMNS",
    "PUBLISHED_IU_XRAY",
    "TRAINING_ONLY_INPUTS",
    "best_constant_report",
    "check_references",
    "check_report_pairs",
    "check_reports",
    "classifier_scores",
    "compute_clinical_efficacy",
    "compute_nlg_metrics",
    "evaluate_split",
    "evaluate_with_reference_points",
    "generate_reports",
    "generate_reports_and_disease_logits",
    "macro_f1",
    "markdown_table",
    "mean_auroc",
    "meteor_score",
    "model_display_name",
    "most_frequent_report",
    "precision_recall_f1",
    "reference_reports",
    "score_reports",
    "scoring_texts",
    "shuffled_image_predictions",
    "write_evaluation",
]
