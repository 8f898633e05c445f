"""Checks that the synthetic demo images carry their report labels, and draws a contact sheet of them.

Every demo study (`data/demo/reports.jsonl`, verbatim Open-I text) is labeled with `labeler_cdan.label_report` over
its FINDINGS and IMPRESSION joined by a newline, as the demo builder does, and rendered by
`data_cdan.synthetic_cxr.render_study` with the builder's seed (CRC-32 of the R2Gen id). Then:

1. An image classifier must recover the labels. It is one L2-regularised logistic regression per observation
   (balanced class weights; UNCERTAIN train labels left out; all fitted at once with L-BFGS) on fixed image features
   of both views: the image
   average-pooled to 16 x 16 (global layout: heart width, fluid, lucency), and, at three octaves, the positive and
   negative parts of a difference of Gaussians (a blob detector in the spirit of Lindeberg, "Feature detection with
   automatic scale selection", IJCV 30(2), 1998) max-pooled over an 8 x 8 grid (small local findings: nodules,
   callus, wires), plus the mean gradient magnitude over the same grid (lines). Trained on the demo train split;
   per-label AUROC and F1 on the test split for labels with at least `--min_support` POSITIVE and negative (NEGATIVE
   or NOT_MENTIONED) test studies, UNCERTAIN test labels left out; the F1 threshold of each label is tuned on val.
2. Two image-blind controls must not: the train prevalence (a constant score, so AUROC 0.5 by definition), and the
   same classifier trained on the same train images with the labels shuffled across studies (mean over `--shuffles`
   shuffles).
3. As the test split has too few positives of the rarer observations, the same comparison (image classifier vs
   shuffled labels) by 4-fold cross-validation on the train split, for every observation with enough train positives.
4. `outputs/synthetic_cxr_examples.png`: a few train studies per observation, both views, titled with their labels.

If `labeler_cdan` cannot be imported, this script (and only this script) falls back to `FALLBACK_KEYWORDS`: an
observation is POSITIVE when one of its keywords appears in a sentence without a negation word, and "No Finding" when
no pathology is POSITIVE. The printed header says which labeler was used.

AUROC: Hanley & McNeil, Radiology 143(1), 1982, via `sklearn.metrics.roc_auc_score`.

Usage:
    python scripts/check_synthetic_cxr.py [--image_size 128] [--output outputs/synthetic_cxr_examples.png]
"""

import argparse
import json
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from configuration_cdan import CHEXPERT_OBSERVATIONS
from data_cdan import DEMO_REPORTS_FILE
from data_cdan.synthetic_cxr import NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN, render_study

REPOSITORY = Path(__file__).resolve().parents[1]
REPORTS_FILE = DEMO_REPORTS_FILE
DEFAULT_SHEET = REPOSITORY / "outputs" / "synthetic_cxr_examples.png"
SHORT_NAMES = {
    "No Finding": "Normal",
    "Enlarged Cardiomediastinum": "Wide mediast.",
    "Cardiomegaly": "Cardiomeg.",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Edema": "Edema",
    "Consolidation": "Consol.",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelect.",
    "Pneumothorax": "PTX",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "Pl. other",
    "Fracture": "Fracture",
    "Support Devices": "Devices",
}
FALLBACK_KEYWORDS = {
    "Enlarged Cardiomediastinum": ("mediastinal widening", "widened mediastinum", "enlarged cardiomediastinal"),
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "enlarged heart", "heart size is enlarged"),
    "Lung Opacity": ("opacity", "opacities", "infiltrate", "airspace disease"),
    "Lung Lesion": ("nodule", "mass", "lesion"),
    "Edema": ("edema", "vascular congestion"),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("effusion",),
    "Pleural Other": ("pleural thickening", "pleural scarring"),
    "Fracture": ("fracture",),
    "Support Devices": ("pacemaker", "sternotomy", "catheter", "picc", "tube", "wires"),
}
_NEGATION = re.compile(r"\b(no|not|without|negative|free of|resolved)\b")


def fallback_label_report(text: str) -> list[int]:
    """Keyword labels, used only when `labeler_cdan` is unavailable (see the module docstring)."""
    states = {name: NOT_MENTIONED for name in CHEXPERT_OBSERVATIONS}
    for sentence in re.split(r"[.;\n]", text.lower()):
        negated = bool(_NEGATION.search(sentence))
        for name, keywords in FALLBACK_KEYWORDS.items():
            if any(keyword in sentence for keyword in keywords):
                states[name] = max(states[name], NEGATIVE if negated else POSITIVE)
    pathologies = [name for name in CHEXPERT_OBSERVATIONS if name not in ("No Finding", "Support Devices")]
    states["No Finding"] = POSITIVE if all(states[name] != POSITIVE for name in pathologies) else NOT_MENTIONED
    return [states[name] for name in CHEXPERT_OBSERVATIONS]


def load_labeler():
    """`(label_report, description)`: `labeler_cdan.label_report`, or the keyword fallback."""
    try:
        from labeler_cdan import label_report
    except ImportError:
        return fallback_label_report, "keyword fallback (labeler_cdan not importable)"
    return label_report, "labeler_cdan.label_report"


def load_demo(label_report) -> list[dict]:
    """Demo records with their 14 label states."""
    studies = []
    with open(REPORTS_FILE, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            sections = (record["findings"], record["impression"])
            text = "\n".join(part.strip() for part in sections if part and part.strip())
            studies.append({**record, "labels": list(label_report(text))})
    return studies


def study_seed(study: dict) -> int:
    """The demo builder's seed: CRC-32 of the R2Gen id."""
    return zlib.crc32(study["r2gen_id"].encode("utf-8"))


def render_all(studies: list[dict], image_size: int) -> tuple[np.ndarray, float]:
    """Both views of every study as uint8 `(n, 2, image_size, image_size)`, and the rate in two-view studies/s."""
    images = np.empty((len(studies), 2, image_size, image_size), dtype=np.uint8)
    start = time.perf_counter()
    for index, study in enumerate(studies):
        for view, image in enumerate(render_study(study["labels"], seed=study_seed(study), image_size=image_size)):
            images[index, view] = np.asarray(image)
    return images, len(studies) / (time.perf_counter() - start)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `(n, 1, height, width)` images with replicated borders."""
    radius = int(3 * sigma + 0.5)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    images = torch.nn.functional.pad(images, (radius, radius, 0, 0), mode="replicate")
    images = torch.nn.functional.conv2d(images, kernel.view(1, 1, 1, -1))
    images = torch.nn.functional.pad(images, (0, 0, radius, radius), mode="replicate")
    return torch.nn.functional.conv2d(images, kernel.view(1, 1, -1, 1))


@torch.no_grad()
def image_features(images: np.ndarray) -> np.ndarray:
    """
    Fixed features of both views (see the module docstring).

    Args:
        images (`np.ndarray` of shape `(n, 2, size, size)`, uint8): the two views of `n` studies.

    Returns:
        `np.ndarray` of shape `(n, 2 * 1024 * ...)`: per view, 16 x 16 pooled pixels, 3 octaves x 2 polarities x
        8 x 8 max-pooled difference-of-Gaussians responses and 2 x 8 x 8 mean absolute gradients.
    """
    pool = torch.nn.functional
    features = []
    for batch in torch.from_numpy(images).split(128):
        views = batch.float().div(255.0).flatten(0, 1).unsqueeze(1)  # (n, 2, s, s) -> (2n, 1, s, s)
        per_view = [pool.adaptive_avg_pool2d(views, 16).flatten(1)]
        level = views
        for octave in range(3):
            fine = _gaussian_blur(level, 1.0)
            blob = fine - _gaussian_blur(level, 2.0)
            per_view += [pool.adaptive_max_pool2d(blob, 8).flatten(1), pool.adaptive_max_pool2d(-blob, 8).flatten(1)]
            if octave == 0:
                vertical, horizontal = fine.diff(dim=2).abs(), fine.diff(dim=3).abs()
                per_view += [
                    pool.adaptive_avg_pool2d(vertical, 8).flatten(1),
                    pool.adaptive_avg_pool2d(horizontal, 8).flatten(1),
                ]
            level = pool.avg_pool2d(fine, 2)
        features.append(torch.cat(per_view, dim=1).reshape(batch.shape[0], -1))  # (2n, f) -> (n, 2f)
    return torch.cat(features).numpy()


@dataclass
class LinearClassifiers:
    """One logistic regression per observation, fitted jointly: `scores = features @ weights + biases`."""

    weights: torch.Tensor  # (features, observations)
    biases: torch.Tensor  # (observations,)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Decision scores of shape `(n, observations)`."""
        return (torch.from_numpy(features).float() @ self.weights + self.biases).numpy()


def fit_classifiers(features: np.ndarray, labels: np.ndarray, l2: float) -> LinearClassifiers:
    """
    L2-regularised logistic regressions, POSITIVE vs NEGATIVE / NOT_MENTIONED with balanced class weights and
    UNCERTAIN labels left out, all observations at once with L-BFGS.

    Args:
        features (`np.ndarray` of shape `(n, f)`): standardised image features.
        labels (`np.ndarray` of shape `(n, 14)`): label states.
        l2 (`float`): weight of `0.5 * ||weights||^2` added to the mean weighted log-loss of each observation.
    """
    inputs = torch.from_numpy(features).float()
    targets = torch.from_numpy(labels == POSITIVE).float()
    known = torch.from_numpy(labels != UNCERTAIN).float()
    positives, negatives = (targets * known).sum(dim=0), ((1 - targets) * known).sum(dim=0)
    usable = ((positives > 0) & (negatives > 0)).float()  # an observation with one class only is not fitted
    sample_weights = (
        known
        * usable
        * (targets * (0.5 / positives.clamp(min=1.0)) + (1 - targets) * (0.5 / negatives.clamp(min=1.0)))
    )
    weights = torch.zeros(inputs.shape[1], labels.shape[1], requires_grad=True)
    biases = torch.zeros(labels.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, biases], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_loss = nn.functional.binary_cross_entropy_with_logits(inputs @ weights + biases, targets, reduction="none")
        loss = (log_loss * sample_weights).sum() + 0.5 * l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearClassifiers(weights.detach(), biases.detach())


def cross_validated_scores(features: np.ndarray, labels: np.ndarray, l2: float, folds: int = 4) -> np.ndarray:
    """Out-of-fold decision scores `(n, 14)` of `fit_classifiers`."""
    scores = np.zeros(labels.shape, dtype=np.float32)
    for fit, held_out in KFold(folds, shuffle=True, random_state=0).split(features):
        scores[held_out] = fit_classifiers(features[fit], labels[fit], l2).scores(features[held_out])
    return scores


def auroc_of(scores: np.ndarray, labels: np.ndarray, index: int) -> float:
    """AUROC of one observation, POSITIVE vs NEGATIVE / NOT_MENTIONED, UNCERTAIN left out."""
    known = labels[:, index] != UNCERTAIN
    return roc_auc_score(labels[known, index] == POSITIVE, scores[known, index])


def evaluate(
    scores: np.ndarray, labels: np.ndarray, val_scores: np.ndarray, val_labels: np.ndarray, index: int
) -> tuple[float, float]:
    """AUROC and F1 of one observation on studies with a definite label; F1 at the threshold best on val."""
    known = labels[:, index] != UNCERTAIN
    truth, score = labels[known, index] == POSITIVE, scores[known, index]
    val_known = val_labels[:, index] != UNCERTAIN
    val_truth, val_score = val_labels[val_known, index] == POSITIVE, val_scores[val_known, index]
    threshold = 0.0
    if val_truth.any() and (~val_truth).any():
        threshold = max(np.unique(val_score), key=lambda value: f1_score(val_truth, val_score >= value))
    return auroc_of(scores, labels, index), f1_score(truth, score >= threshold, zero_division=0.0)


def contact_sheet(studies: list[dict], path: Path, per_observation: int = 3, image_size: int = 192) -> None:
    """A few train studies per observation (frontal | lateral), titled with their POSITIVE (+) / UNCERTAIN (?) labels;
    the studies with the fewest other positive labels are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [study for study in studies if study["split"] == "train"]
    figure, axes = plt.subplots(
        len(CHEXPERT_OBSERVATIONS),
        2 * per_observation,
        figsize=(4.0 * per_observation, 2.3 * len(CHEXPERT_OBSERVATIONS)),
    )
    for row, name in enumerate(CHEXPERT_OBSERVATIONS):
        chosen = sorted(
            (study for study in train if study["labels"][row] == POSITIVE),
            key=lambda study: (sum(state == POSITIVE for state in study["labels"]), study["r2gen_id"]),
        )[:per_observation]
        for axis in axes[row]:
            axis.axis("off")
        for column, study in enumerate(chosen):
            views = render_study(study["labels"], seed=study_seed(study), image_size=image_size)
            for offset, image in enumerate(views):
                axes[row, 2 * column + offset].imshow(image, cmap="gray", vmin=0, vmax=255)
            tags = [
                ("+" if state == POSITIVE else "?") + SHORT_NAMES[observation]
                for observation, state in zip(CHEXPERT_OBSERVATIONS, study["labels"])
                if state in (POSITIVE, UNCERTAIN)
            ]
            title = ", ".join(tags)
            title = title if len(title) <= 50 else title[:47] + "..."
            axes[row, 2 * column].set_title(f"{study['r2gen_id']}\n{title}", fontsize=7, loc="left")
        axes[row, 0].text(
            -0.08,
            0.5,
            SHORT_NAMES[name],
            transform=axes[row, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=10,
            fontweight="bold",
        )
    figure.suptitle("SYNTHETIC renderings of demo studies (labels from their Open-I report text)", fontsize=12)
    figure.tight_layout(rect=(0.01, 0.0, 1.0, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=128, help="side of the renderings the classifier sees")
    parser.add_argument("--min_support", type=int, default=5, help="test positives (and negatives) to report a label")
    parser.add_argument("--l2", type=float, default=0.1, help="L2 weight of the logistic regressions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label shuffles of the image-blind control")
    parser.add_argument("--shuffles", type=int, default=3, help="label shuffles averaged in the image-blind control")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_SHEET, help="contact sheet PNG")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    start = time.perf_counter()

    label_report, labeler_name = load_labeler()
    studies = load_demo(label_report)
    print(f"labels: {labeler_name}; {len(studies)} demo studies")
    images, rate = render_all(studies, arguments.image_size)
    print(f"rendered {len(studies)} two-view studies at {arguments.image_size} px: {rate:.0f} studies/s")
    labels = np.array([study["labels"] for study in studies])
    splits = np.array([study["split"] for study in studies])
    train, val, test = (splits == "train"), (splits == "val"), (splits == "test")

    features = image_features(images)
    scaler = StandardScaler().fit(features[train])
    features = scaler.transform(features)
    classifiers = fit_classifiers(features[train], labels[train], arguments.l2)
    scores, val_scores = classifiers.scores(features[test]), classifiers.scores(features[val])
    shuffle_rng = np.random.default_rng(arguments.seed)
    shuffled_labels = [labels[train][shuffle_rng.permutation(int(train.sum()))] for _ in range(arguments.shuffles)]
    blind_classifiers = [fit_classifiers(features[train], shuffled, arguments.l2) for shuffled in shuffled_labels]
    prevalence = (labels[train] == POSITIVE).mean(axis=0)

    header = (
        f"{'observation':28s} {'pos':>4s} {'neg':>4s} | {'AUROC':>6s} {'F1':>5s} | {'shuffled AUROC':>14s} {'F1':>5s}"
        f" | {'prevalence AUROC':>16s}"
    )
    print(
        f"\nTest split: image classifier vs image-blind controls (UNCERTAIN test labels left out; shuffled: mean of"
        f" {arguments.shuffles})"
    )
    print(header)
    print("-" * len(header))
    image_aurocs, blind_aurocs = [], []
    for index, name in enumerate(CHEXPERT_OBSERVATIONS):
        known = labels[test, index] != UNCERTAIN
        truth = labels[test, index][known] == POSITIVE
        positives, negatives = int(truth.sum()), int((~truth).sum())
        if min(positives, negatives) < arguments.min_support:
            print(f"{name:28s} {positives:4d} {negatives:4d} | (fewer than {arguments.min_support} test positives)")
            continue
        auroc, f1 = evaluate(scores, labels[test], val_scores, labels[val], index)
        blind = [
            evaluate(blind.scores(features[test]), labels[test], blind.scores(features[val]), labels[val], index)
            for blind in blind_classifiers
        ]
        blind_auroc, blind_f1 = np.mean(blind, axis=0)
        prevalence_auroc = roc_auc_score(truth, np.full(len(truth), prevalence[index]))
        image_aurocs.append(auroc)
        blind_aurocs.append(blind_auroc)
        print(
            f"{name:28s} {positives:4d} {negatives:4d} | {auroc:6.3f} {f1:5.3f} | {blind_auroc:14.3f} {blind_f1:5.3f}"
            f" | {prevalence_auroc:16.3f}"
        )
    print("-" * len(header))
    print(
        f"{'mean over reported labels':38s}| {np.mean(image_aurocs):6.3f} {'':5s} | {np.mean(blind_aurocs):14.3f}"
        f" {'':5s} | {0.5:16.3f}"
    )

    train_features, train_labels = features[train], labels[train]
    cross_validated = cross_validated_scores(train_features, train_labels, arguments.l2)
    blind_cross_validated = cross_validated_scores(train_features, shuffled_labels[0], arguments.l2)
    print("\nTrain split, 4-fold cross-validation: image classifier vs shuffled labels (AUROC)")
    print(f"{'observation':28s} {'pos':>4s} {'neg':>4s} | {'AUROC':>6s} | {'shuffled AUROC':>14s}")
    for index, name in enumerate(CHEXPERT_OBSERVATIONS):
        known = train_labels[:, index] != UNCERTAIN
        positives = int((train_labels[known, index] == POSITIVE).sum())
        negatives = int(known.sum()) - positives
        if min(positives, negatives) < arguments.min_support:
            print(f"{name:28s} {positives:4d} {negatives:4d} | (fewer than {arguments.min_support} train positives)")
            continue
        auroc = auroc_of(cross_validated, train_labels, index)
        blind_known = shuffled_labels[0][:, index] != UNCERTAIN
        blind_auroc = roc_auc_score(
            shuffled_labels[0][blind_known, index] == POSITIVE, blind_cross_validated[blind_known, index]
        )
        print(f"{name:28s} {positives:4d} {negatives:4d} | {auroc:6.3f} | {blind_auroc:14.3f}")
    contact_sheet(studies, arguments.output)
    print(f"\ncontact sheet: {arguments.output}")
    print(f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()


__all__ = [
    "LinearClassifiers",
    "contact_sheet",
    "cross_validated_scores",
    "fallback_label_report",
    "fit_classifiers",
    "image_features",
    "load_demo",
]
