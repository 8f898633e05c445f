"""The label-balanced options of L_mlc (Eq. 15): `CdanConfig.mlc_loss` = "bce" (the paper's), "weighted_bce" and
"asymmetric" (Ridnik et al., ICCV 2021), and the positive weights that `CdanTrainer` computes from its labels."""

import math

import datasets
import pytest
import torch
from torch import nn

from configuration_cdan import CdanConfig
from labeler_cdan import NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN
from modeling_cdan import CdanForConditionalGeneration
from test_modeling import tiny_config
from train import CdanTrainingArguments
from trainer_cdan import CdanTrainer, asymmetric_loss, multi_label_loss, positive_weights_from_labels


LOGITS = torch.tensor([[2.0, -1.0, 0.5, -4.0], [-0.3, 3.0, -2.0, 1.0]])
TARGETS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def labels_with(states_by_observation: dict[int, int]) -> list[int]:
    """14 CheXpert states: NOT_MENTIONED except the given observations."""
    states = [NOT_MENTIONED] * 14
    for index, state in states_by_observation.items():
        states[index] = state
    return states


def tiny_trainer(tmp_path, train_dataset=None, lambda_sc=0.0, **config_overrides) -> CdanTrainer:
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(tiny_config(dropout=0.0, attention_dropout=0.0, **config_overrides))
    arguments = CdanTrainingArguments(
        output_dir=str(tmp_path), report_to="none", lambda_mlc=0.5, lambda_sc=lambda_sc, remove_unused_columns=False
    )
    return CdanTrainer(model=model, args=arguments, train_dataset=train_dataset)


def tiny_batch(num_studies: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(num_studies, 2, 3, 64, 64, generator=generator),
        "labels": torch.randint(3, 40, (num_studies, 6), generator=generator),
        "disease_labels": torch.randint(0, 2, (num_studies, 14), generator=generator).float(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------------------------------


def test_default_is_the_papers_bce_bit_for_bit():
    config = CdanConfig()
    assert config.mlc_loss == "bce"
    expected = nn.functional.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none").mean(dim=-1)
    assert torch.equal(multi_label_loss(LOGITS, TARGETS, config), expected)


def test_default_compute_loss_is_the_old_loss_bit_for_bit(tmp_path):
    trainer = tiny_trainer(tmp_path)
    batch = tiny_batch()
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    # The loss as computed before `mlc_loss` existed.
    per_study = nn.functional.binary_cross_entropy_with_logits(
        outputs.disease_logits.float(), batch["disease_labels"], reduction="none"
    ).mean(dim=-1)
    mlc_loss = per_study.sum() / len(batch["labels"])
    expected = outputs.loss + 0.5 * mlc_loss + 0.0 * outputs.loss.new_zeros(())
    assert torch.equal(loss, expected)


def test_weighted_bce_multiplies_the_positive_terms_by_their_weight():
    weights = [3.0, 1.0, 0.5, 10.0]
    config = tiny_config(num_observations=4, disease_top_k=2, mlc_loss="weighted_bce", mlc_positive_weights=weights)
    expected = []
    for logits, targets in zip(LOGITS.tolist(), TARGETS.tolist()):
        terms = [
            -(weight * target * math.log(sigmoid(logit)) + (1 - target) * math.log(1 - sigmoid(logit)))
            for logit, target, weight in zip(logits, targets, weights)
        ]
        expected.append(sum(terms) / len(terms))
    torch.testing.assert_close(multi_label_loss(LOGITS, TARGETS, config), torch.tensor(expected))


def test_asymmetric_loss_follows_the_formula_of_ridnik_et_al():
    gamma_positive, gamma_negative, clip = 1.0, 4.0, 0.05
    logits = torch.tensor([[2.0, -1.0, 0.5, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = []
    for logit, target in zip(logits[0].tolist(), targets[0].tolist()):
        p = sigmoid(logit)
        p_m = max(p - clip, 0.0)
        positive = (1 - p) ** gamma_positive * math.log(p)
        negative = p_m**gamma_negative * math.log(1 - p_m)
        expected.append(-target * positive - (1 - target) * negative)
    actual = asymmetric_loss(logits, targets, gamma_positive, gamma_negative, clip)
    torch.testing.assert_close(actual, torch.tensor([expected]))
    assert actual[0, 3] == 0  # p = 0.018 < m: an easy negative adds nothing


def test_asymmetric_loss_down_weights_easy_negatives_relative_to_bce():
    config = tiny_config(num_observations=4, disease_top_k=2, mlc_loss="asymmetric")
    assert (config.mlc_asymmetric_gamma_positive, config.mlc_asymmetric_gamma_negative) == (0.0, 4.0)
    assert config.mlc_asymmetric_clip == 0.05
    logits = torch.tensor([[-1.0, -2.0, 2.0, 0.5]])
    targets = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    asymmetric = asymmetric_loss(
        logits, targets, config.mlc_asymmetric_gamma_positive, config.mlc_asymmetric_gamma_negative,
        config.mlc_asymmetric_clip,
    )  # fmt: skip
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert (asymmetric[0, :2] < 0.01 * bce[0, :2]).all()  # easy negatives almost vanish
    torch.testing.assert_close(asymmetric[0, 2:], bce[0, 2:])  # gamma+ = 0: positives keep their BCE
    torch.testing.assert_close(multi_label_loss(logits, targets, config), asymmetric.mean(dim=-1))


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asymmetric_loss_has_finite_gradients_for_saturated_logits(clip):
    logits = torch.tensor([[30.0, -30.0, 50.0, 100.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    asymmetric_loss(logits, targets, 0.0, 4.0, clip).sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("mlc_loss", ["bce", "weighted_bce", "asymmetric"])
def test_every_loss_is_normalised_per_study_so_accumulation_stays_exact(mlc_loss):
    config = tiny_config(num_observations=4, disease_top_k=2, mlc_loss=mlc_loss, mlc_positive_weights=[2.0] * 4)
    full = multi_label_loss(LOGITS, TARGETS, config).sum() / 2
    halves = sum(multi_label_loss(LOGITS[[row]], TARGETS[[row]], config).sum() / 2 for row in range(2))
    torch.testing.assert_close(halves, full)


# ---------------------------------------------------------------------------------------------------------------------
# Positive weights
# ---------------------------------------------------------------------------------------------------------------------


def test_positive_weights_are_negatives_over_positives_clipped():
    names = ["No Finding", "Cardiomegaly", "Edema", "Pneumothorax"]  # CheXpert indices 0, 2, 5, 9
    chexpert_labels = [
        labels_with({0: POSITIVE, 2: POSITIVE, 9: UNCERTAIN}),
        labels_with({0: POSITIVE, 2: NEGATIVE}),
        labels_with({0: POSITIVE}),
        labels_with({0: POSITIVE}),
    ]
    u_ones = positive_weights_from_labels(chexpert_labels, names, uncertain_label_as=1, max_weight=50.0)
    assert u_ones == pytest.approx([1 / 50, 3.0, 50.0, 3.0])  # all positive, 1 in 4, none, 1 (uncertain) in 4
    u_zeros = positive_weights_from_labels(chexpert_labels, names, uncertain_label_as=0, max_weight=2.0)
    assert u_zeros == pytest.approx([1 / 2, 2.0, 2.0, 2.0])


def test_trainer_sets_the_weights_from_its_training_labels_in_logit_order(tmp_path, caplog):
    chexpert_labels = [labels_with({2: POSITIVE}), labels_with({5: UNCERTAIN}), labels_with({}), labels_with({})]
    dataset = datasets.Dataset.from_dict({"chexpert_labels": chexpert_labels})
    observations = ["Edema", "Cardiomegaly"]
    with caplog.at_level("INFO", logger="trainer_cdan"):
        trainer = tiny_trainer(
            tmp_path, dataset, num_observations=2, disease_top_k=1, observation_names=observations,
            mlc_loss="weighted_bce",
        )  # fmt: skip
    assert trainer.model.config.mlc_positive_weights == pytest.approx([3.0, 3.0])
    assert "Edema: 3" in caplog.text


def test_trainer_keeps_weights_given_in_the_configuration(tmp_path):
    dataset = datasets.Dataset.from_dict({"chexpert_labels": [labels_with({2: POSITIVE})] * 2})
    weights = [float(index + 1) for index in range(14)]
    trainer = tiny_trainer(tmp_path, dataset, mlc_loss="weighted_bce", mlc_positive_weights=weights)
    assert trainer.model.config.mlc_positive_weights == weights


def test_trainer_without_chexpert_labels_says_what_is_missing(tmp_path):
    dataset = datasets.Dataset.from_dict({"findings": ["the heart is normal ."]})
    with pytest.raises(ValueError, match="chexpert_labels"):
        tiny_trainer(tmp_path, dataset, mlc_loss="weighted_bce")


def test_weights_round_trip_through_save_pretrained(tmp_path):
    weights = [0.5, 3.0, 50.0]
    config = tiny_config(
        num_observations=3, mlc_loss="weighted_bce", mlc_positive_weights=weights, mlc_max_positive_weight=50.0
    )
    config.save_pretrained(tmp_path)
    reloaded = CdanConfig.from_pretrained(tmp_path)
    assert (reloaded.mlc_loss, reloaded.mlc_positive_weights) == ("weighted_bce", weights)
    asymmetric = tiny_config(mlc_loss="asymmetric", mlc_asymmetric_gamma_positive=1.0, mlc_asymmetric_clip=0.1)
    asymmetric.save_pretrained(tmp_path / "asymmetric")
    reloaded = CdanConfig.from_pretrained(tmp_path / "asymmetric")
    assert (reloaded.mlc_asymmetric_gamma_positive, reloaded.mlc_asymmetric_clip) == (1.0, 0.1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mlc_loss": "focal"}, "mlc_loss"),
        ({"mlc_positive_weights": [1.0, 2.0]}, "mlc_positive_weights"),
        ({"mlc_positive_weights": [0.0] * 14}, "finite and positive"),
        ({"mlc_positive_weights": [float("inf")] * 14}, "finite and positive"),
        ({"mlc_max_positive_weight": 0.5}, "mlc_max_positive_weight"),
        ({"mlc_asymmetric_gamma_negative": -1.0}, "mlc_asymmetric_gamma_negative"),
        ({"mlc_asymmetric_gamma_positive": float("nan")}, "mlc_asymmetric_gamma_positive"),
        ({"mlc_asymmetric_clip": 1.0}, "mlc_asymmetric_clip"),
        ({"mlc_asymmetric_clip": -0.1}, "mlc_asymmetric_clip"),
    ],
)
def test_bad_loss_settings_are_rejected(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_weighted_bce_without_weights_says_how_to_get_them():
    config = tiny_config(num_observations=4, disease_top_k=2, mlc_loss="weighted_bce")
    with pytest.raises(ValueError, match="mlc_positive_weights"):
        multi_label_loss(LOGITS, TARGETS, config)

