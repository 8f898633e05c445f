"""The Hub-ready checkpoint folder, `pipeline("image-to-text")`, the Auto classes and publishing (CPU, offline)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from PIL import Image

from image_processing_cdan import CdanImageProcessor
from modeling_cdan import CdanForConditionalGeneration
from pipeline_cdan import MIN_TRANSFORMERS_VERSION, CdanReportPipeline, save_checkpoint
from processing_cdan import CdanProcessor
from test_modeling import tiny_config


REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPOSITORY.parent / "shared" / "data" / "cxr_images"
FRONTAL = SHARED_IMAGES / "torchxrayvision_test_images" / "00000001_000.png"
SECOND_FRONTAL = SHARED_IMAGES / "torchxrayvision_test_images" / "00027426_000.png"
JPEG = SHARED_IMAGES / "torchxrayvision_test_images" / "16747_3_1.jpg"
REPORTS = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.",
    "There is a right upper lobe nodule. The heart is normal in size.",
]


def tiny_processor() -> CdanProcessor:
    return CdanProcessor.from_reports(
        REPORTS * 3, threshold=1, report_cleaner="iu_xray", image_processor=CdanImageProcessor(image_size=64, num_views=2)
    )


def tiny_report_model(processor: CdanProcessor) -> CdanForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(processor.tokenizer), init_std=0.5, tie_word_embeddings=False)
    model = CdanForConditionalGeneration(config).eval()
    model.generation_config.update(max_length=12, num_beams=2)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, CdanForConditionalGeneration, CdanProcessor]:
    processor = tiny_processor()
    model = tiny_report_model(processor)
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(model, processor, directory, metrics={"BLEU-4": 0.123}, dataset="iu_xray", license="cc-by-nc-nd-4.0")
    return directory, model, processor


def expected_reports(model, processor, studies) -> list[str]:
    pixel_values = processor(images=studies, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return processor.batch_decode(model.generate(pixel_values=pixel_values), skip_special_tokens=True)


def run_in_fresh_python(code: str, cwd: Path) -> dict:
    """Run `code` in a new interpreter whose working directory is not the repository; it prints one JSON line."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_checkpoint_folder_holds_everything_a_hub_repo_needs(checkpoint):
    directory, _, _ = checkpoint
    files = {path.name for path in directory.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "configuration_cdan.py",
        "modeling_cdan.py",
        "processing_cdan.py",
        "image_processing_cdan.py",
        "tokenization_cdan.py",
        "pipeline_cdan.py",
        "README.md",
    ):
        assert required in files, f"{required} missing from {sorted(files)}"
    assert {"processor_config.json", "preprocessor_config.json"} & files
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_cdan.CdanConfig"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_cdan.CdanForConditionalGeneration"
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_cdan.CdanReportPipeline"
    assert json.loads((directory / "generation_config.json").read_text())["num_beams"] == 2


def test_model_card_has_hub_metadata(checkpoint):
    card = (checkpoint[0] / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "pipeline_tag: image-to-text" in front_matter
    assert "license: cc-by-nc-nd-4.0" in front_matter
    assert "library_name: transformers" in front_matter
    assert f"transformers>={MIN_TRANSFORMERS_VERSION}" in card
    assert "| BLEU-4 | 0.123 |" in card


def test_model_card_states_the_processors_input_size(checkpoint):
    card = (checkpoint[0] / "README.md").read_text()
    assert "`test_resnet` at 64 px" in card


def test_minimum_transformers_version_is_the_one_the_package_requires():
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    (requirement,) = [line for line in pyproject["project"]["dependencies"] if line.startswith("transformers")]
    lower_bound = re.search(r">=\s*([\d.]+)", requirement).group(1)
    assert Version(lower_bound) == Version(MIN_TRANSFORMERS_VERSION)


def test_pipeline_in_a_fresh_process_matches_the_model(checkpoint, tmp_path):
    directory, model, processor = checkpoint
    outputs = run_in_fresh_python(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        reporter = pipeline("image-to-text", model={str(directory)!r}, trust_remote_code=True)
        single_path = reporter({str(FRONTAL)!r})
        single_pil = reporter(Image.open({str(FRONTAL)!r}))
        study = reporter(({str(FRONTAL)!r}, {str(SECOND_FRONTAL)!r}))
        batch = reporter([{str(FRONTAL)!r}, ({str(SECOND_FRONTAL)!r}, {str(JPEG)!r})])
        print(json.dumps({{"class": type(reporter).__name__, "single_path": single_path, "single_pil": single_pil,
                          "study": study, "batch": batch}}))
        """,
        cwd=tmp_path,
    )
    assert outputs["class"] == "CdanReportPipeline"
    single, two_view, second = expected_reports(
        model, processor, [[str(FRONTAL)], [str(FRONTAL), str(SECOND_FRONTAL)], [str(SECOND_FRONTAL), str(JPEG)]]
    )
    assert outputs["single_path"] == [{"generated_text": single}]
    assert outputs["single_pil"] == [{"generated_text": single}]
    assert outputs["study"] == [{"generated_text": two_view}]
    assert outputs["batch"] == [[{"generated_text": single}], [{"generated_text": second}]]
    assert single.strip(), "the test model should write words"


def test_auto_classes_in_a_fresh_process_generate_what_the_original_did(checkpoint, tmp_path):
    directory, model, processor = checkpoint
    outputs = run_in_fresh_python(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        config = AutoConfig.from_pretrained({str(directory)!r}, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(directory)!r}, trust_remote_code=True)
        inputs = processor(images=[[{str(FRONTAL)!r}, {str(SECOND_FRONTAL)!r}]], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs)
        print(json.dumps({{"config": type(config).__name__, "model": type(model).__name__,
                          "processor": type(processor).__name__, "ids": generated.tolist()}}))
        """,
        cwd=tmp_path,
    )
    assert (outputs["config"], outputs["model"], outputs["processor"]) == (
        "CdanConfig",
        "CdanForConditionalGeneration",
        "CdanProcessor",
    )
    inputs = processor(images=[[str(FRONTAL), str(SECOND_FRONTAL)]], return_tensors="pt")
    with torch.no_grad():
        assert outputs["ids"] == model.generate(**inputs).tolist()


def test_push_to_hub_uploads_the_checkpoint_folder(checkpoint, monkeypatch):
    _, model, processor = checkpoint
    uploaded = {}

    class CreatedRepo:
        repo_id = "someone/cdan-test"

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id
        return CreatedRepo()

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(path.name for path in folder.iterdir())
        uploaded["config"] = json.loads((folder / "config.json").read_text())
        return "https://example.invalid/commit"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", fake_create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", fake_upload_folder)
    reporter = CdanReportPipeline(model=model, processor=processor)
    reporter.push_to_hub("someone/cdan-test", model_card_kwargs={"dataset": "iu_xray"})
    assert uploaded["created"] == uploaded["repo_id"] == "someone/cdan-test"
    for required in ("model.safetensors", "modeling_cdan.py", "pipeline_cdan.py", "tokenizer.json", "README.md"):
        assert required in uploaded["files"]
    assert "image-to-text" in uploaded["config"]["custom_pipelines"]


def test_checkpoint_without_tokenizer_is_rejected_with_a_clear_error(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint[0], broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    from transformers import pipeline

    with pytest.raises((ValueError, FileNotFoundError), match="(?i)tokenizer"):
        pipeline("image-to-text", model=str(broken), trust_remote_code=True)


def test_pipeline_missing_image_names_the_file(checkpoint, tmp_path):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        reporter(str(tmp_path / "absent.png"))


@pytest.mark.parametrize("empty_input", [[], (), None])
def test_pipeline_rejects_an_empty_input(checkpoint, empty_input):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match="No image"):
        reporter(empty_input)


def test_pipeline_rejects_a_study_with_too_many_views(checkpoint):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor)
    image = Image.open(FRONTAL)
    with pytest.raises(ValueError, match="view"):
        reporter((image, image, image))


def test_pipeline_refuses_a_degenerate_image_when_asked(checkpoint):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor, on_degenerate_image="error")
    with pytest.raises(ValueError, match=r"\(a PIL image \(L, 1x1\)\) cannot be a chest X-ray"):
        reporter(Image.new("L", (1, 1)))


def test_pipeline_call_can_ask_to_refuse_a_degenerate_image(checkpoint):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match="all its pixels have the same value"):
        reporter(Image.new("L", (96, 96), 128), on_degenerate_image="error")


@pytest.mark.parametrize("num_beams", [0, -1])
def test_pipeline_rejects_a_non_positive_num_beams_before_generating(checkpoint, num_beams):
    _, model, processor = checkpoint
    reporter = CdanReportPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match=f"`num_beams` must be a positive integer, got {num_beams}"):
        reporter(str(FRONTAL), num_beams=num_beams)
