"""Report cleaning, the report tokenizer, image loading, `CdanImageProcessor` and `CdanProcessor` (CPU, offline)."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from transformers.utils import logging as hf_logging

from image_processing_cdan import CdanImageProcessor, load_image
from processing_cdan import CdanProcessor
from tokenization_cdan import REPORT_CLEANERS, build_report_tokenizer, clean_report_iu_xray, clean_report_mimic_cxr


ANNOTATION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu_xray" / "annotation.json"
SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr_images"
GREY_PNG = SHARED_IMAGES / "torchxrayvision_test_images" / "00000001_000.png"
SECOND_GREY_PNG = SHARED_IMAGES / "torchxrayvision_test_images" / "00027426_000.png"
JPEG = SHARED_IMAGES / "torchxrayvision_test_images" / "16747_3_1.jpg"
HANNOVER_PNG = SHARED_IMAGES / "covid19_mhh_hannover" / "png" / "006f3a8a.png"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def annotation() -> dict:
    return json.loads(ANNOTATION.read_text())


@pytest.fixture(scope="module")
def reports_by_id(annotation) -> dict[str, str]:
    return {entry["id"]: entry["report"] for split in annotation.values() for entry in split}


@pytest.fixture(scope="module")
def train_reports(annotation) -> list[str]:
    return [entry["report"] for entry in annotation["train"]]


@pytest.fixture(scope="module")
def iu_tokenizer(train_reports):
    return build_report_tokenizer(train_reports, threshold=3, cleaner="iu_xray")


@pytest.fixture(scope="module")
def processor(train_reports) -> CdanProcessor:
    return CdanProcessor.from_reports(train_reports, threshold=3, image_size=IMAGE_SIZE, num_views=2)


def pixel_values(images, **processor_kwargs) -> torch.Tensor:
    return CdanImageProcessor(image_size=IMAGE_SIZE, **processor_kwargs)(images)["pixel_values"]


# ------------------------------------------------------------------------------------------------------------------
# Report cleaning (expected strings derived by hand from R2Gen's rules)
# ------------------------------------------------------------------------------------------------------------------


def test_iu_xray_cleaner_drops_the_enumeration_numbers(reports_by_id):
    assert clean_report_iu_xray(reports_by_id["CXR3260_IM-1547"]) == (
        "cardiomegaly andor pericardial effusion . right base opacity xxxx combination of pleural effusion and "
        "atelectasisairspace disease . cannot exclude elevation right hemidiaphragm . left lung relatively clear . "
        "limited exam due to underpenetrated technique related to large patient habitus . no evidence of "
        "pneumothorax ."
    )
    assert clean_report_iu_xray("Heart normal 2. Lungs clear 3. No effusion") == (
        "heart normal . lungs clear . no effusion ."
    )


def test_iu_xray_cleaner_collapses_repeated_dots(reports_by_id):
    assert clean_report_iu_xray(reports_by_id["CXR1647_IM-0424"]) == (
        "the lungs are clear bilaterally . specifically no evidence of focal consolidation pneumothorax or pleural "
        "effusion . cardio mediastinal silhouette is unremarkable . visualized osseous structures of the thorax are "
        "without acute abnormality ."
    )


def test_iu_xray_cleaner_removes_colons_and_parentheses_but_keeps_hyphens(reports_by_id):
    assert clean_report_iu_xray(reports_by_id["CXR3263_IM-1549"]) == (
        "chest the heart size and cardiomediastinal silhouette are normal . the lungs are clear without focal "
        "airspace opacity pleural effusion or pneumothorax . the osseous structures are intact . left knee there is "
        "no fracture-dislocation . there are degenerative changes with medial compartment osteophytes . there is no "
        "suprapatellar effusion . there is a xxxx ."
    )
    assert clean_report_iu_xray(reports_by_id["CXR2102_IM-0733"]).endswith(
        ". pulmonary vasculature is normal . xxxx xxxx intact . unchanged eventration of the left hemidiaphragm "
        "versus small hernia bochdalek ."
    )


def test_iu_xray_cleaner_keeps_empty_sentences(reports_by_id):
    assert clean_report_iu_xray(reports_by_id["CXR3773_IM-1891"]) == (
        "the lungs and pleural spaces show no acute abnormality . heart size upper limits of normal predominantly "
        "left ventricular contour xxxx visualized on lateral projection pulmonary vascularity within normal "
        "limits .  ."
    )


def test_punctuation_class_range_removes_colon_to_bracket_but_keeps_digits():
    # ':-[' is a range ':' .. '[' (also ;<=>?@), so '3.5' -> '35', '50% & ok' -> '50  ok'; '-' and '#' survive.
    assert clean_report_iu_xray("Nodule measures 3.5 cm; a<b=c>d?e@f [x] {y} 50% & ok.") == (
        "nodule measures 35 cm abcdef x y 50  ok ."
    )
    assert clean_report_iu_xray("Left-sided T11 #2 fracture (old)! Really? Yes*") == (
        "left-sided t11 #2 fracture old really yes ."
    )


def test_mimic_cxr_cleaner_normalises_newlines_underscores_spaces_and_dots():
    raw = "FINDINGS:\nThe heart is ___ normal..  Lungs   clear.\n1. No effusion. 2. No pneumothorax."
    expected = "findings the heart is  normal . lungs clear . no effusion . no pneumothorax ."
    assert clean_report_mimic_cxr(raw) == expected
    assert REPORT_CLEANERS == {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}


# ------------------------------------------------------------------------------------------------------------------
# Report tokenizer
# ------------------------------------------------------------------------------------------------------------------


def test_iu_xray_train_vocabulary_has_759_words(iu_tokenizer):
    special_tokens = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocabulary = iu_tokenizer.get_vocab()
    words = sorted(set(vocabulary) - set(special_tokens))
    assert len(words) == 759
    assert len(iu_tokenizer) == 759 + 4
    assert [vocabulary[token] for token in special_tokens] == [0, 1, 2, 3]
    assert [vocabulary[word] for word in words] == list(range(4, 4 + 759))  # sorted words from id 4
    assert (iu_tokenizer.pad_token_id, iu_tokenizer.bos_token_id) == (0, 1)
    assert (iu_tokenizer.eos_token_id, iu_tokenizer.unk_token_id) == (2, 3)


def test_unseen_and_rare_words_map_to_unk(iu_tokenizer):
    # "bochdalek" occurs once in the training reports, below the threshold of 3.
    assert iu_tokenizer("the zebra bochdalek heart")["input_ids"] == [
        iu_tokenizer.convert_tokens_to_ids("the"),
        3,
        3,
        iu_tokenizer.convert_tokens_to_ids("heart"),
        2,
    ]


def test_tokenizer_round_trip_on_a_cleaned_report(iu_tokenizer, reports_by_id):
    cleaned = clean_report_iu_xray(reports_by_id["CXR2384_IM-0942"])
    input_ids = iu_tokenizer(cleaned)["input_ids"]
    assert input_ids[-1] == iu_tokenizer.eos_token_id and iu_tokenizer.bos_token_id not in input_ids
    assert iu_tokenizer.decode(input_ids, skip_special_tokens=True) == cleaned


# ------------------------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------------------------


def test_truncation_keeps_eos_last_at_max_length(processor, reports_by_id):
    report = reports_by_id["CXR2384_IM-0942"]
    full = processor(text=report, max_length=200)["labels"][0]
    truncated = processor(text=report, max_length=8)["labels"]
    assert len(full) > 8
    assert truncated.shape == (1, 8) and truncated.dtype == torch.long
    assert truncated[0, -1].item() == processor.tokenizer.eos_token_id
    assert truncated[0, :7].tolist() == full[:7].tolist()
    assert processor(text=report)["labels"].shape[1] <= processor.max_length == 60


def test_labels_are_padded_with_minus_100(processor):
    labels = processor(text=["The heart is normal.", "The heart is normal. The lungs are clear."])["labels"]
    short_length = len(processor.tokenizer("the heart is normal .")["input_ids"])
    assert labels.shape == (2, labels.shape[1]) and labels.shape[1] > short_length
    assert labels[0, short_length - 1].item() == processor.tokenizer.eos_token_id
    assert (labels[0, short_length:] == -100).all()
    assert (labels[1] != -100).all()


def test_batch_decode_returns_cleaned_reports_and_ignores_label_padding(processor):
    reports = ["The heart is normal.", "Lungs are clear.. No effusion."]
    labels = processor(text=reports)["labels"]
    assert processor.batch_decode(labels) == ["the heart is normal .", "lungs are clear . no effusion ."]
    assert processor.decode(labels[1]) == "lungs are clear . no effusion ."


def test_post_process_report_generation_strips_bos_eos_and_padding(processor):
    word_ids = processor.tokenizer("the heart is normal .", add_special_tokens=False)["input_ids"]
    generated = torch.tensor([[1, *word_ids, 2, 0, 0], [1, word_ids[1], 2, *[0] * (len(word_ids) + 1)]])
    assert processor.post_process_report_generation(generated) == ["the heart is normal .", "heart"]


# ------------------------------------------------------------------------------------------------------------------
# Image loading
# ------------------------------------------------------------------------------------------------------------------


def test_load_image_reads_8_bit_greyscale_png_as_rgb():
    assert Image.open(GREY_PNG).mode == "L" and Image.open(HANNOVER_PNG).mode == "L"
    image = load_image(GREY_PNG)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == Image.open(GREY_PNG).size
    assert (pixels[..., 0] == np.asarray(Image.open(GREY_PNG))).all()
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert load_image(str(HANNOVER_PNG)).mode == "RGB"


def test_load_image_rescales_16_bit_greyscale_by_its_own_min_max(tmp_path):
    values = np.linspace(1000, 3000, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))[..., 0].astype(int)
    assert pixels.min() == 0 and pixels.max() == 255
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
    assert (np.diff(pixels.ravel()) >= 0).all()
    expected = np.round((values.astype(float) - 1000) * 255 / 2000)
    assert np.abs(pixels - expected).max() <= 0


def test_load_image_handles_big_endian_16_bit_and_constant_images():
    big_endian = Image.fromarray(np.array([[0, 100], [300, 400]], dtype=">u2"))
    assert big_endian.mode == "I;16B"
    assert np.asarray(load_image(big_endian))[..., 0].tolist() == [[0, 64], [191, 255]]
    constant = Image.fromarray(np.full((4, 4), 700, dtype=np.uint16))
    assert np.asarray(load_image(constant)).max() == 0


def test_load_image_reads_rgb_png(tmp_path):
    colours = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(colours).save(path)
    assert (np.asarray(load_image(path)) == colours).all()


def test_load_image_composites_rgba_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, 0, 3] = 255  # one opaque pixel, one half-transparent, the rest transparent
    rgba[0, 1, 3] = 128
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [100, 50, 25]
    assert pixels[1:].max() == 0


def test_load_image_reads_real_jpeg():
    image = load_image(JPEG)
    assert image.mode == "RGB" and image.size == (1036, 885)


def test_load_image_accepts_pil_images_and_arrays():
    grey = Image.open(GREY_PNG)
    from_pil = np.asarray(load_image(grey))
    assert (from_pil == np.asarray(load_image(GREY_PNG))).all()
    assert (np.asarray(load_image(np.asarray(grey))) == from_pil).all()
    assert (np.asarray(load_image(np.asarray(grey)[..., None])) == from_pil).all()
    assert (np.asarray(load_image(np.stack([np.asarray(grey)] * 3, axis=-1))) == from_pil).all()
    uint16 = np.array([[0, 1000], [3000, 4000]], dtype=np.uint16)
    assert np.asarray(load_image(uint16))[..., 0].tolist() == [[0, 64], [191, 255]]
    for mode in ("1", "P", "LA", "CMYK", "I", "F"):
        assert load_image(Image.new(mode, (5, 4))).mode == "RGB"


def test_load_image_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def test_load_image_truncated_png_names_the_path(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(GREY_PNG.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(path)


def test_load_image_non_image_file_names_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(str(path))


def test_load_image_rejects_zero_size_images():
    with pytest.raises(ValueError, match="empty"):
        load_image(Image.new("L", (0, 5)))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4), dtype=np.uint8))


def test_load_image_rejects_unconvertible_modes_and_layouts():
    with pytest.raises(ValueError, match="'La'"):
        load_image(Image.new("La", (3, 3)))
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))  # channels first
    with pytest.raises(TypeError, match="int"):
        load_image(42)


# ------------------------------------------------------------------------------------------------------------------
# CdanImageProcessor
# ------------------------------------------------------------------------------------------------------------------


def test_single_image_is_one_study():
    assert pixel_values(str(GREY_PNG), num_views=1).shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    values = pixel_values(Image.open(GREY_PNG))
    assert values.shape == (1, 2, 3, IMAGE_SIZE, IMAGE_SIZE) and values.dtype == torch.float32


def test_list_of_single_images_is_a_batch_of_studies():
    assert pixel_values([GREY_PNG, JPEG], num_views=1).shape == (2, 1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_list_of_multi_view_studies():
    values = pixel_values([[GREY_PNG, SECOND_GREY_PNG], (JPEG, GREY_PNG)])
    assert values.shape == (2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(values[0, 0], values[1, 1])
    assert not torch.equal(values[0, 0], values[0, 1])


def test_single_view_is_repeated_with_a_warning(caplog):
    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        values = pixel_values([GREY_PNG, [GREY_PNG, SECOND_GREY_PNG]])
    assert values.shape == (2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(values[0, 0], values[0, 1]) and torch.equal(values[0, 0], values[1, 0])
    assert "repeated" in caplog.text


def test_single_view_is_an_error_without_repeat_single_view():
    with pytest.raises(ValueError, match="Study 0 has 1 view"):
        pixel_values(GREY_PNG, repeat_single_view=False)


def test_wrong_view_count_names_the_study_and_counts():
    with pytest.raises(ValueError, match=r"Study 1 has 3 view\(s\).*num_views=2"):
        pixel_values([[GREY_PNG, GREY_PNG], [GREY_PNG, GREY_PNG, GREY_PNG]])


@pytest.mark.parametrize("empty", [[], [[]], [GREY_PNG, ()]])
def test_empty_batch_or_study_is_an_error(empty):
    with pytest.raises(ValueError, match="(?i)no image"):
        pixel_values(empty)


def test_processor_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.png"):
        pixel_values([[GREY_PNG, tmp_path / "absent.png"]])


def test_processor_truncated_png_error_names_the_path(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(GREY_PNG.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.png"):
        pixel_values(str(path))


def test_processor_zero_size_image_error():
    with pytest.raises(ValueError, match="empty"):
        pixel_values(Image.new("RGB", (7, 0)))


def test_deterministic_path_is_r2gen_test_transform():
    r2gen_test_transform = transforms.Compose(
        [
            transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    first = pixel_values([[GREY_PNG, JPEG]])
    second = pixel_values([[GREY_PNG, JPEG]])
    assert torch.equal(first, second)
    expected = r2gen_test_transform(Image.open(JPEG).convert("RGB"))
    torch.testing.assert_close(first[0, 1], expected)


def test_augmentation_differs_from_deterministic_but_repeats_under_a_seed():
    image_processor = CdanImageProcessor(image_size=IMAGE_SIZE)
    study = [[GREY_PNG, JPEG]]
    deterministic = image_processor(study)["pixel_values"]
    torch.manual_seed(0)
    augmented = image_processor(study, do_augment=True)["pixel_values"]
    torch.manual_seed(0)
    repeated = image_processor(study, do_augment=True)["pixel_values"]
    torch.manual_seed(1)
    other_seed = image_processor(study, do_augment=True)["pixel_values"]
    assert augmented.shape == deterministic.shape
    assert not torch.allclose(augmented, deterministic)
    assert torch.equal(augmented, repeated)
    assert not torch.equal(augmented, other_seed)


def test_train_transform_maps_a_pil_image_to_a_normalised_tensor():
    transform = CdanImageProcessor(image_size=IMAGE_SIZE).train_transform()
    output = transform(load_image(JPEG))
    assert output.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and output.dtype == torch.float32
    assert not any("Flip" in type(step).__name__ for step in transform.transforms)


def test_numpy_return_tensors():
    values = CdanImageProcessor(image_size=IMAGE_SIZE)(GREY_PNG, return_tensors="np")["pixel_values"]
    assert isinstance(values, np.ndarray) and values.shape == (1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_image_processor_save_and_load_round_trip(tmp_path):
    image_processor = CdanImageProcessor(image_size=48, num_views=1, augment_rotation_degrees=2.0)
    image_processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = CdanImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.image_size, reloaded.num_views, reloaded.augment_rotation_degrees) == (48, 1, 2.0)
    assert torch.equal(reloaded(GREY_PNG)["pixel_values"], image_processor(GREY_PNG)["pixel_values"])


# ------------------------------------------------------------------------------------------------------------------
# CdanProcessor
# ------------------------------------------------------------------------------------------------------------------


def test_processor_returns_pixel_values_and_labels(processor):
    batch = processor(images=[[GREY_PNG, JPEG]], text=["The heart is normal."])
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert set(processor(images=GREY_PNG)) == {"pixel_values"}
    assert set(processor(text="The heart is normal.")) == {"labels"}


def test_processor_without_images_or_text_is_an_error(processor):
    with pytest.raises(ValueError, match="images"):
        processor()


def test_processor_rejects_report_count_different_from_study_count(processor):
    with pytest.raises(ValueError, match="one report per study"):
        processor(images=[GREY_PNG, JPEG], text=["The heart is normal."])


def test_processor_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = CdanProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (reloaded.report_cleaner, reloaded.max_length) == ("iu_xray", 60)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    studies, reports = [[GREY_PNG, JPEG]], ["Heart size normal.. Lungs clear."]
    original, loaded = processor(images=studies, text=reports), reloaded(images=studies, text=reports)
    assert torch.equal(original["pixel_values"], loaded["pixel_values"])
    assert torch.equal(original["labels"], loaded["labels"])


def test_auto_classes_load_the_saved_folder_in_a_fresh_process(processor, tmp_path):
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    for module_file in ("processing_cdan.py", "image_processing_cdan.py", "tokenization_cdan.py"):
        assert (saved / module_file).is_file(), f"{module_file} missing from the saved folder"
    code = f"""
        import json, sys
        from transformers import AutoImageProcessor, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        batch = processor(images=[[{str(GREY_PNG)!r}, {str(JPEG)!r}]], text=["Heart size normal.. Lungs clear."])
        print(json.dumps({{
            "processor": type(processor).__module__ + "." + type(processor).__name__,
            "image_processor": type(image_processor).__module__ + "." + type(image_processor).__name__,
            "local_module_imported": sorted(
                {{"processing_cdan", "image_processing_cdan", "tokenization_cdan"}} & set(sys.modules)
            ),
            "labels": batch["labels"].tolist(),
            "pixel_sum": float(batch["pixel_values"].double().sum()),
            "decoded": processor.batch_decode(batch["labels"]),
        }}))
    """
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["processor"].startswith("transformers_modules.") and outputs["processor"].endswith(
        "processing_cdan.CdanProcessor"
    )
    assert outputs["image_processor"].startswith("transformers_modules.") and outputs["image_processor"].endswith(
        ".image_processing_cdan.CdanImageProcessor"
    )
    assert outputs["local_module_imported"] == []
    expected = processor(images=[[GREY_PNG, JPEG]], text=["Heart size normal.. Lungs clear."])
    assert outputs["labels"] == expected["labels"].tolist()
    assert outputs["pixel_sum"] == pytest.approx(float(expected["pixel_values"].double().sum()), rel=1e-6)
    assert outputs["decoded"] == ["heart size normal . lungs clear ."]


def test_loading_a_folder_without_tokenizer_names_the_folder(processor, tmp_path):
    broken = tmp_path / "no_tokenizer_here"
    processor.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    with pytest.raises(ValueError, match=r"(?s)tokenizer.*no_tokenizer_here"):
        CdanProcessor.from_pretrained(broken)


def test_from_reports_builds_the_tokenizer_with_the_chosen_cleaner():
    reports = ["Heart: NORMAL.", "Heart: normal."]
    iu_processor = CdanProcessor.from_reports(reports, threshold=2, image_size=IMAGE_SIZE)
    raw_processor = CdanProcessor.from_reports(reports, threshold=1, report_cleaner=None, num_views=1)
    assert set(iu_processor.tokenizer.get_vocab()) - {"<pad>", "<bos>", "<eos>", "<unk>"} == {"heart", "normal", "."}
    assert raw_processor.report_cleaner is None and raw_processor.image_processor.num_views == 1
    assert "Heart:" in raw_processor.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="Unknown report cleaner"):
        CdanProcessor.from_reports(reports, report_cleaner="chexpert")


def test_a_dataset_column_of_studies_is_accepted():
    import datasets

    column = datasets.Dataset.from_dict({"images": [[str(GREY_PNG), str(JPEG)], [str(JPEG), str(GREY_PNG)]]})["images"]
    from_column = pixel_values(column, num_views=2)
    from_list = pixel_values([[str(GREY_PNG), str(JPEG)], [str(JPEG), str(GREY_PNG)]], num_views=2)
    assert torch.equal(from_column, from_list)


# ---------------------------------------------------------------------------------------------------------------------
# Bad image inputs: clear errors, and warnings for images that cannot be a chest X-ray
# ---------------------------------------------------------------------------------------------------------------------

DICOM_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # the SIIM pneumothorax example
DICOM_FILE = SHARED_IMAGES / "torchxrayvision_test_images" / DICOM_NAME
NOISE = np.random.default_rng(0).integers(0, 256, size=(200, 5000), dtype=np.uint8)
DEGENERATE_IMAGES = {
    "1x1": (NOISE[:1, :1], "smaller than 32 px"),
    "1x5000": (NOISE[:1], "aspect ratio"),
    "40x200": (NOISE[:40, :200], "aspect ratio"),
    "constant": (np.full((96, 96), 128, dtype=np.uint8), "same value"),
    "boolean": (NOISE[:96, :96] > 127, "two pixel values"),
}


@pytest.mark.parametrize("load_first", [False, True])
def test_a_closed_pil_image_is_a_clear_error(load_first):
    image = Image.open(GREY_PNG)
    if load_first:
        image.load()
    image.close()
    with pytest.raises(ValueError, match=r"PIL image \(L, 512x512\) cannot be read: it was closed"):
        load_image(image)


def test_a_directory_path_is_called_a_directory():
    with pytest.raises(ValueError, match=f"{SHARED_IMAGES.name} is a directory"):
        load_image(str(SHARED_IMAGES))


def test_an_empty_path_is_called_empty():
    with pytest.raises(ValueError, match="The image path is empty"):
        load_image("")


def test_a_url_is_named_whole_and_not_fetched():
    with pytest.raises(ValueError, match="https://example.org/cxr/frontal.png is a URL, and URLs are not fetched"):
        load_image("https://example.org/cxr/frontal.png")


def test_a_dicom_file_is_read_with_pydicom():
    image = load_image(DICOM_FILE)  # the SIIM-ACR DICOM: JPEG Baseline, 8-bit MONOCHROME2, 1024 x 1024
    assert (image.mode, image.size) == ("RGB", (1024, 1024))


def test_a_dicom_file_reaches_the_normalisation_as_floats():
    processor = CdanImageProcessor(image_size=IMAGE_SIZE, num_views=1)
    from_path = processor(images=str(DICOM_FILE), return_tensors="pt")["pixel_values"]
    from_8_bit = processor(images=load_image(DICOM_FILE), return_tensors="pt")["pixel_values"]
    assert from_path.shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(from_path, from_8_bit, atol=0.05)  # same picture; resized from floats, not 8-bit PIL


@pytest.mark.parametrize("name", list(DEGENERATE_IMAGES))
def test_an_image_that_cannot_be_a_chest_film_warns_with_its_reason(name):
    image, reason = DEGENERATE_IMAGES[name]
    with pytest.warns(UserWarning, match=rf"study 0, view 0 \(an array of shape .*cannot be a chest X-ray.*{reason}"):
        values = pixel_values(image, num_views=1)
    assert values.shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("name", list(DEGENERATE_IMAGES))
def test_on_degenerate_image_error_refuses_an_image_that_cannot_be_a_chest_film(name):
    image, reason = DEGENERATE_IMAGES[name]
    with pytest.raises(ValueError, match=f"cannot be a chest X-ray.*{reason}"):
        pixel_values(image, num_views=1, on_degenerate_image="error")


def test_degenerate_image_error_can_be_asked_per_call_of_the_processor(processor):
    with pytest.raises(ValueError, match="cannot be a chest X-ray"):
        processor(images=[np.zeros((64, 64), dtype=np.uint8)], on_degenerate_image="error")


def test_real_chest_x_rays_and_synthetic_studies_are_not_called_degenerate():
    from data_cdan.synthetic_cxr import render_study

    real = [GREY_PNG, SECOND_GREY_PNG, JPEG, HANNOVER_PNG, *sorted((HANNOVER_PNG.parent).glob("*.png"))[:12]]
    synthetic = [view for seed in range(4) for view in render_study([seed % 2] * 14, seed=seed)]
    image_processor = CdanImageProcessor(image_size=IMAGE_SIZE, num_views=1, on_degenerate_image="error")
    values = image_processor([*map(str, real), *synthetic])["pixel_values"]
    assert values.shape[0] == len(real) + len(synthetic)


def test_on_degenerate_image_is_saved_with_the_image_processor(tmp_path):
    CdanImageProcessor(on_degenerate_image="error").save_pretrained(tmp_path)
    assert CdanImageProcessor.from_pretrained(tmp_path).on_degenerate_image == "error"


def test_an_unknown_on_degenerate_image_is_rejected():
    with pytest.raises(ValueError, match=r"`on_degenerate_image` must be one of \['warn', 'error'\], got 'ignore'"):
        CdanImageProcessor(on_degenerate_image="ignore")


def test_text_that_is_not_a_report_or_a_list_of_reports_is_a_clear_error(processor):
    with pytest.raises(TypeError, match="`text` must be a report string or a list of report strings, got int"):
        processor(text=123)
