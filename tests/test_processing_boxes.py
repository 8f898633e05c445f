"""Lesion boxes through `CdanProcessor` (resize, augmentation, cleaning, padding) and `CdanDataCollator`."""

import logging

import numpy as np
import pytest
import torch

from data_cdan import LesionBox, boxes_from_rows, load_cdan_dataset
from image_processing_cdan import DEFAULT_MAX_LESION_BOXES, CdanImageProcessor
from processing_cdan import CdanProcessor
from tokenization_cdan import build_report_tokenizer
from trainer_cdan import CdanDataCollator


IMAGE_SIZE = 32
REPORTS = ["the heart is normal in size . the lungs are clear ."] * 3


def make_processor(max_lesion_boxes: int = 4, **image_processor_kwargs) -> CdanProcessor:
    image_processor = CdanImageProcessor(image_size=IMAGE_SIZE, num_views=2, **image_processor_kwargs)
    tokenizer = build_report_tokenizer(REPORTS, threshold=1)
    return CdanProcessor(image_processor, tokenizer, max_lesion_boxes=max_lesion_boxes)


def noise_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A greyscale `(height, width)` uint8 image of low noise (not degenerate)."""
    return np.random.default_rng(seed).integers(0, 40, size=(height, width), dtype=np.uint8)


def bright_rectangle_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = noise_image(width, height)
    x_min, y_min, x_max, y_max = box
    image[y_min:y_max, x_min:x_max] = 255
    return image


def box_dict(x_min, y_min, x_max, y_max, score=1.0, label="Nodule") -> dict:
    return LesionBox(x_min, y_min, x_max, y_max, label=label, score=score).to_row()


# --------------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------------


def test_resize_maps_a_box_into_the_pixels_of_the_processed_view():
    width, height, box = 100, 50, (10.0, 5.0, 60.0, 40.0)
    image = noise_image(width, height)
    outputs = make_processor()(images=[(image, image)], boxes=[[[list(box)], None]])
    x_scale, y_scale = IMAGE_SIZE / width, IMAGE_SIZE / height
    expected = torch.tensor([box[0] * x_scale, box[1] * y_scale, box[2] * x_scale, box[3] * y_scale])
    assert outputs["lesion_boxes"].shape == (1, 2, 4, 4)
    torch.testing.assert_close(outputs["lesion_boxes"][0, 0, 0], expected)
    assert outputs["lesion_box_mask"][0].tolist() == [[True, False, False, False], [False] * 4]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augmentation_moves_the_box_with_the_bright_rectangle(seed):
    width, height, rectangle = 96, 80, (30, 20, 62, 52)
    processor = make_processor(augment_rotation_degrees=20.0, augment_translate=0.1, augment_horizontal_flip=True)
    image = bright_rectangle_image(width, height, rectangle)
    torch.manual_seed(seed)
    outputs = processor(images=[(image, image)], boxes=[[[list(rectangle)], [list(rectangle)]]], do_augment=True)
    mean, std = processor.image_processor.image_mean[0], processor.image_processor.image_std[0]
    for view in range(2):
        grey = outputs["pixel_values"][0, view, 0] * std + mean  # (H, W) in [0, 1]
        rows, columns = torch.nonzero(grey > 0.6, as_tuple=True)
        bright = torch.tensor([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=torch.float32)
        assert outputs["lesion_box_mask"][0, view, 0]
        torch.testing.assert_close(outputs["lesion_boxes"][0, view, 0], bright, atol=1.5, rtol=0.0)
    resized = make_processor()(images=[(image, image)], boxes=[[[list(rectangle)], None]])["lesion_boxes"][0, 0, 0]
    assert (outputs["lesion_boxes"][0, 0, 0] - resized).abs().max() > 1.0  # the augmentation did move it


def test_boxes_do_not_change_the_random_draw_of_the_image():
    image = bright_rectangle_image(96, 80, (30, 20, 62, 52))
    processor = make_processor()
    torch.manual_seed(5)
    with_boxes = processor(images=[image], boxes=[[[[30, 20, 62, 52]]]], do_augment=True)["pixel_values"]
    torch.manual_seed(5)
    without_boxes = processor(images=[image], do_augment=True)["pixel_values"]
    torch.testing.assert_close(with_boxes, without_boxes, rtol=0.0, atol=0.0)


def test_a_box_moved_out_of_the_view_by_augmentation_is_dropped():
    # A sliver at the right edge: the shorter-side resize and the random crop of a wide image leave it outside.
    image = noise_image(150, 40)
    processor = make_processor(augment_rotation_degrees=0.0, augment_translate=0.0, augment_scale_range=0.0)
    torch.manual_seed(0)
    outputs = processor(images=[image], boxes=[[[[147, 10, 150, 30], [0, 10, 3, 30]]]], do_augment=True)
    assert outputs["lesion_box_mask"][0, 0].sum() < 2
    kept = outputs["lesion_boxes"][0, 0][outputs["lesion_box_mask"][0, 0]]
    assert ((kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])).all()
    assert ((kept >= 0) & (kept <= IMAGE_SIZE)).all()


# --------------------------------------------------------------------------------------------------------------------
# Layout: repetition, padding, truncation
# --------------------------------------------------------------------------------------------------------------------


def test_a_study_given_as_one_image_gets_its_boxes_repeated():
    image = noise_image(64, 64)
    outputs = make_processor()(images=[image], boxes=[[[[8, 8, 40, 24]]]])
    assert outputs["lesion_box_mask"][0, :, 0].tolist() == [True, True]
    torch.testing.assert_close(outputs["lesion_boxes"][0, 0], outputs["lesion_boxes"][0, 1])


def test_padding_rows_are_zero_and_the_mask_marks_the_real_boxes():
    image = noise_image(64, 64)
    boxes = [[[[0, 0, 32, 32], [32, 32, 64, 64]], []], None]
    outputs = make_processor(max_lesion_boxes=3)(images=[(image, image), (image, image)], boxes=boxes)
    assert outputs["lesion_box_mask"].tolist() == [[[True, True, False], [False] * 3], [[False] * 3, [False] * 3]]
    assert (outputs["lesion_boxes"][~outputs["lesion_box_mask"]] == 0).all()
    assert outputs["lesion_boxes"].dtype == torch.float32 and outputs["lesion_box_mask"].dtype == torch.bool


def test_more_boxes_than_k_keep_the_highest_scores_and_are_counted(caplog):
    image = noise_image(64, 64)
    view_boxes = [box_dict(0, 0, 10, 10, 0.2), box_dict(10, 10, 20, 20, 0.9), box_dict(20, 20, 30, 30, 0.5)]
    with caplog.at_level(logging.WARNING):
        outputs = make_processor()(images=[image], boxes=[[view_boxes]], max_lesion_boxes=2)
    scale = IMAGE_SIZE / 64
    expected = torch.tensor([[10, 10, 20, 20], [20, 20, 30, 30]], dtype=torch.float32) * scale  # input order kept
    assert outputs["lesion_boxes"].shape == (1, 2, 2, 4)
    torch.testing.assert_close(outputs["lesion_boxes"][0, 0], expected)
    assert "1 over-max-boxes" in caplog.text and "studies [0]" in caplog.text


def test_k_is_the_processor_attribute_unless_the_call_overrides_it():
    image = noise_image(64, 64)
    processor = make_processor(max_lesion_boxes=6)
    assert processor(images=[image], boxes=[None])["lesion_boxes"].shape == (1, 2, 6, 4)
    assert processor(images=[image], boxes=[None], max_lesion_boxes=3)["lesion_box_mask"].shape == (1, 2, 3)
    assert CdanProcessor(processor.image_processor, processor.tokenizer).max_lesion_boxes == DEFAULT_MAX_LESION_BOXES


# --------------------------------------------------------------------------------------------------------------------
# Bad boxes and bad structure
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_box, reason",
    [
        ([float("nan"), 0, 10, 10], "1 non-finite"),
        ([20, 20, 10, 30], "1 inverted"),
        ([10, 10, 10, 30], "1 zero-area"),
        ([70, 10, 90, 30], "1 outside"),
    ],
)
def test_a_bad_box_is_dropped_and_counted_in_one_warning(caplog, bad_box, reason):
    image = noise_image(64, 64)
    with caplog.at_level(logging.WARNING):
        outputs = make_processor()(images=[image], boxes=[[[bad_box, [8, 8, 16, 16]]]])
    assert outputs["lesion_box_mask"][0, 0].sum() == 1
    torch.testing.assert_close(outputs["lesion_boxes"][0, 0, 0], torch.tensor([4.0, 4.0, 8.0, 8.0]))
    assert f"dropped 1 boxes: {reason}" in caplog.text


def test_a_box_crossing_the_border_is_clipped_and_counted(caplog):
    image = noise_image(64, 64)
    with caplog.at_level(logging.WARNING):
        outputs = make_processor()(images=[image], boxes=[[[[-10, 32, 32, 80]]]])
    torch.testing.assert_close(outputs["lesion_boxes"][0, 0, 0], torch.tensor([0.0, 16.0, 16.0, 32.0]))
    assert "kept 1 boxes (1 clipped)" in caplog.text


def test_cleaning_of_several_studies_gives_one_warning_naming_them(caplog):
    image = noise_image(64, 64)
    boxes = [[[[20, 20, 10, 30]], [[10, 10, 10, 30]]], [[[8, 8, 16, 16]], None], [[[10, 10, 10, 30]], None]]
    with caplog.at_level(logging.WARNING):
        make_processor()(images=[(image, image)] * 3, boxes=boxes)
    warnings = [record for record in caplog.records if "Lesion boxes" in record.getMessage()]
    assert len(warnings) == 1
    assert "studies [0, 2]" in warnings[0].getMessage()
    assert "dropped 3 boxes: 1 inverted, 2 zero-area" in warnings[0].getMessage()


def test_clean_boxes_give_no_warning(caplog):
    image = noise_image(64, 64)
    with caplog.at_level(logging.WARNING):
        make_processor()(images=[(image, image)], boxes=[[[[8, 8, 16, 16]], None]])
    assert "Lesion boxes" not in caplog.text


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[[[8, 8, 16, 16]]]], "has 1 entries but the study was given 2 view"),
        ([[[[8, 8, 16]], None]], "must be 4 numbers"),
        ([[[{"x_min": 1, "y_min": 1, "x_max": 5, "y_max": 5}], None]], "not a BOX_FEATURES row"),
        ([[[8, 8, 16, 16], None]], "box 0 is a int"),
        ([None, None], "2 item"),
    ],
)
def test_a_wrong_structure_is_a_value_error(boxes, message):
    image = noise_image(64, 64)
    with pytest.raises(ValueError, match=message):
        make_processor()(images=[(image, image)], boxes=boxes)


def test_boxes_without_images_are_a_value_error():
    with pytest.raises(ValueError, match="needs the studies' `images`"):
        make_processor()(text=REPORTS[:1], boxes=[None])


# --------------------------------------------------------------------------------------------------------------------
# Saving, and the collator
# --------------------------------------------------------------------------------------------------------------------


def test_save_and_load_keep_max_lesion_boxes(tmp_path):
    processor = make_processor(max_lesion_boxes=7)
    assert processor.to_dict()["max_lesion_boxes"] == 7
    processor.save_pretrained(tmp_path)
    assert CdanProcessor.from_pretrained(tmp_path).max_lesion_boxes == 7


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory) -> list[dict]:
    cache_dir = tmp_path_factory.mktemp("demo")
    dataset = load_cdan_dataset("demo", cache_dir=cache_dir, max_studies_per_split=3, image_size=64)
    rows = [dataset["train"][index] for index in range(len(dataset["train"]))]  # decoded images, as in training
    assert any(any(view) for row in rows for view in row["boxes"])
    return rows


def test_collator_include_boxes_puts_the_rows_boxes_in_the_batch(demo_rows):
    processor = make_processor(max_lesion_boxes=6)
    batch = CdanDataCollator(processor, include_boxes=True)(demo_rows)
    for row_index, row in enumerate(demo_rows):
        for view_index, view_boxes in enumerate(row["boxes"]):
            boxes = boxes_from_rows(view_boxes)
            expected = torch.tensor([box.xyxy for box in boxes], dtype=torch.float32).reshape(-1, 4) * IMAGE_SIZE / 64
            mask = batch["lesion_box_mask"][row_index, view_index]
            assert mask.tolist() == [True] * len(boxes) + [False] * (6 - len(boxes))
            torch.testing.assert_close(batch["lesion_boxes"][row_index, view_index, : len(boxes)], expected)


def test_collator_without_include_boxes_gives_no_box_keys(demo_rows):
    batch = CdanDataCollator(make_processor())(demo_rows)
    assert "lesion_boxes" not in batch and "lesion_box_mask" not in batch
    assert batch["pixel_values"].shape == (len(demo_rows), 2, 3, IMAGE_SIZE, IMAGE_SIZE)
