"""The semi-supervised lesion detector (`detection_cdan`) and its script (`scripts/train_detector.py`)."""

import json
import urllib.error

import pytest
import torch
from torch import nn

from data_cdan import LesionBox, load_cdan_dataset
from detection_cdan import (
    DetectionSample,
    FocalRoIHeads,
    average_precision,
    build_detector,
    ema_update,
    focal_loss,
    load_detector,
    predict,
    predict_box_file,
    pseudo_targets,
    save_detector,
    strong_augment,
    to_model_input,
    weak_augment,
    write_box_file,
)
from scripts.train_detector import main as train_detector_main
from scripts.train_detector import select_labelled, split_samples


def boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def truth(box_rows, labels) -> dict[str, torch.Tensor]:
    return {"boxes": boxes(*box_rows), "labels": torch.tensor(labels, dtype=torch.int64)}


def detections(box_rows, labels, scores) -> dict[str, torch.Tensor]:
    return {**truth(box_rows, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


A, B, FAR = (0, 0, 10, 10), (20, 20, 30, 30), (50, 50, 60, 60)


def test_ap_of_perfect_detections_is_one():
    ground_truths = [truth([A, B], [1, 1]), truth([A], [2])]
    predictions = [detections([A, B], [1, 1], [0.9, 0.8]), detections([A], [2], [0.7])]
    assert average_precision(predictions, ground_truths, num_classes=2) == {1: 1.0, 2: 1.0}


def test_ap_with_one_missed_box_is_half():
    predictions = [detections([A], [1], [0.9])]
    assert average_precision(predictions, [truth([A, B], [1, 1])], num_classes=1) == {1: 0.5}


def test_ap_counts_a_false_positive_only_where_it_outranks_a_hit():
    ground_truths = [truth([A], [1])]
    above = [detections([FAR, A], [1, 1], [0.9, 0.8])]  # precision 1/2 at recall 1
    below = [detections([A, FAR], [1, 1], [0.9, 0.8])]
    assert average_precision(above, ground_truths, num_classes=1) == {1: 0.5}
    assert average_precision(below, ground_truths, num_classes=1) == {1: 1.0}


def test_ap_counts_a_duplicate_detection_as_a_false_positive():
    ground_truths = [truth([A, B], [1, 1])]
    predictions = [detections([A, A, B], [1, 1, 1], [0.9, 0.8, 0.7])]  # hit, duplicate, hit: 1/1, 1/2, 2/3
    assert average_precision(predictions, ground_truths, num_classes=1)[1] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ap_needs_the_right_class_and_skips_classes_without_a_box():
    ground_truths = [truth([A], [1])]
    predictions = [detections([A], [2], [0.9])]
    assert average_precision(predictions, ground_truths, num_classes=3) == {1: 0.0}


def test_ema_update_moves_the_teacher_towards_the_student():
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(2.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, decay=0.75)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.25 * 2.0))
    assert int(teacher.num_batches_tracked) == 7
    assert torch.equal(student.weight, torch.full((3,), 3.0))


def test_pseudo_targets_keep_scores_at_or_above_the_threshold():
    prediction = detections([A, B, FAR], [1, 2, 3], [0.95, 0.89, 0.5])
    (kept,) = pseudo_targets([prediction], threshold=0.89)
    assert torch.equal(kept["boxes"], boxes(A, B))
    assert kept["labels"].tolist() == [1, 2]
    assert set(kept) == {"boxes", "labels"}


def square_image(box: tuple[int, int, int, int], size: int = 64) -> torch.Tensor:
    image = torch.full((3, size, size), 0.2)
    x_min, y_min, x_max, y_max = box
    image[:, y_min:y_max, x_min:x_max] = 0.9
    return image


def test_weak_augmentation_flips_boxes_with_the_image():
    box = (5, 10, 20, 30)
    flips = 0
    for seed in range(8):
        image, (moved,) = weak_augment(square_image(box), boxes(box), torch.Generator().manual_seed(seed))
        rows, columns = torch.nonzero(image[0] > 0.5, as_tuple=True)
        drawn = [columns.min().item(), rows.min().item(), columns.max().item() + 1, rows.max().item() + 1]
        assert moved.tolist() == drawn
        flips += drawn != list(box)
    assert 0 < flips < 8


def test_strong_augmentation_keeps_the_object_in_its_box():
    box = (20, 24, 40, 44)
    for seed in range(10):
        image = strong_augment(square_image(box), torch.Generator().manual_seed(seed), cutouts=0)
        brighter = image[0] > image[0].mean()
        rows, columns = torch.nonzero(brighter, as_tuple=True)
        assert box[0] - 3 <= columns.min() and columns.max() < box[2] + 3
        assert box[1] - 3 <= rows.min() and rows.max() < box[3] + 3


def test_strong_augmentation_with_cutouts_changes_the_image_but_not_its_size():
    image = square_image((20, 24, 40, 44))
    augmented = strong_augment(image, torch.Generator().manual_seed(0))
    assert augmented.shape == image.shape
    assert not torch.equal(augmented, image)


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_above():
    logits, labels = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]), torch.tensor([0, 2])
    cross_entropy = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(focal_loss(logits, labels, 0.0), cross_entropy)
    assert focal_loss(logits, labels, 2.0) < cross_entropy


def test_focal_gamma_swaps_the_roi_heads_and_keeps_training_losses():
    model = build_detector(2, focal_gamma=2.0, image_size=64)
    assert isinstance(model.roi_heads, FocalRoIHeads)
    model.train()
    losses = model([square_image((10, 10, 30, 30))], [truth([(10, 10, 30, 30)], [1])])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(value) for value in losses.values())


def test_pretrained_resnet_offline_fails_with_a_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(OSError, match="offline"):
        build_detector(2, backbone="resnet18", pretrained_backbone=True)


def test_labelled_selection_is_seeded_and_drops_the_boxes_of_unlabelled_studies(tmp_path):
    dataset = load_cdan_dataset("demo", cache_dir=tmp_path, max_studies_per_split=4, image_size=64)
    samples = split_samples(dataset["train"], "train")
    labelled, unlabelled = select_labelled(samples, 0.5, seed=3)
    again, _ = select_labelled(samples, 0.5, seed=3)
    assert [sample.key for sample in labelled] == [sample.key for sample in again]
    assert len({sample.key["study_id"] for sample in labelled}) == 2
    assert len(labelled) + len(unlabelled) == len(samples)
    assert all(len(sample.boxes) == 0 for sample in unlabelled)


def test_two_step_semi_supervised_run_writes_a_valid_box_file(tmp_path):
    output_dir = tmp_path / "detector"
    arguments = ["--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "cache")]
    arguments += ["--max_studies_per_split", "2", "--iterations", "2", "--burn_in", "1", "--batch_size", "2"]
    arguments += ["--labelled_fraction", "0.5", "--pseudo_threshold", "0.0", "--detector_image_size", "64"]
    metrics = train_detector_main(arguments)
    lines = [json.loads(line) for line in (output_dir / "boxes.jsonl").read_text().splitlines()]
    assert len(lines) == 12  # 2 studies x 2 views x 3 splits
    assert {line["split"] for line in lines} == {"train", "validation", "test"}
    assert sum(len(line["boxes"]) for line in lines) == metrics["box_file_boxes"]
    for line in lines:
        assert {"study_id", "image_index", "view", "image_size"} <= set(line)
        scores = [row["score"] for row in line["boxes"]]
        assert scores == sorted(scores, reverse=True)
        for row in line["boxes"]:
            box = LesionBox.from_row(row)
            assert box.source == "pseudo"
            assert 0 <= box.x_min <= box.x_max <= line["image_size"][0]
    history = [json.loads(line) for line in (output_dir / "history.jsonl").read_text().splitlines()]
    assert "pseudo_boxes" not in history[0] and "pseudo_boxes" in history[1]


def tiny_detector(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(2, image_size=64).eval()


def noise_samples(count: int) -> list[DetectionSample]:
    generator = torch.Generator().manual_seed(1)
    return [
        DetectionSample(
            torch.randint(0, 256, (48, 64), generator=generator, dtype=torch.uint8),
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.int64),
            {"study_id": f"s{index // 2}", "image_index": index % 2},
        )
        for index in range(count)
    ]


def box_corners(line: dict) -> torch.Tensor:
    """The `(N, 4)` corners of the boxes of one box-file line."""
    corners = [[box[name] for name in ("x_min", "y_min", "x_max", "y_max")] for box in line["boxes"]]
    return torch.tensor(corners, dtype=torch.float32).reshape(-1, 4)


def test_a_saved_detector_loads_with_its_weights_and_labels(tmp_path):
    model = tiny_detector()
    save_detector(model, tmp_path, ["Nodule", "Effusion"], image_size=64)
    loaded, labels = load_detector(tmp_path)
    assert labels == ["Nodule", "Effusion"]
    assert not loaded.training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0.0, atol=0.0)
    image = [to_model_input(noise_samples(1)[0].image)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(image)[0]["boxes"], model(image)[0]["boxes"])


def test_loading_a_detector_folder_without_its_config_names_the_file(tmp_path):
    save_detector(tiny_detector(), tmp_path, ["Nodule", "Effusion"], image_size=64)
    (tmp_path / "detector_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="detector_config.json not found"):
        load_detector(tmp_path)


def test_predict_box_file_streams_the_lines_write_box_file_writes(tmp_path):
    model, samples, labels = tiny_detector(), noise_samples(5), ["Nodule", "Effusion"]
    write_box_file(tmp_path / "expected.jsonl", samples, predict(model, samples, batch_size=5), labels)
    counts = predict_box_file(model, iter(samples), labels, tmp_path / "streamed.jsonl", batch_size=2)
    expected = [json.loads(line) for line in (tmp_path / "expected.jsonl").read_text().splitlines()]
    streamed = [json.loads(line) for line in (tmp_path / "streamed.jsonl").read_text().splitlines()]
    assert counts == {"images": 5, "boxes": sum(len(line["boxes"]) for line in expected)} and counts["boxes"] > 0
    assert [line["study_id"] for line in streamed] == [line["study_id"] for line in expected]
    for got, wanted in zip(streamed, expected):
        assert got["image_size"] == wanted["image_size"] == [64, 48]
        assert [box["label"] for box in got["boxes"]] == [box["label"] for box in wanted["boxes"]]
        torch.testing.assert_close(box_corners(got), box_corners(wanted), atol=1e-4, rtol=0.0)
    assert not (tmp_path / "streamed.jsonl.partial").exists()
