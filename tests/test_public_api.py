"""The public imports users and the README rely on, and the scripts' imports (no repository paths, nothing from tests)."""

import importlib
import re
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]
MODULES = [
    "cli_cdan",
    "configuration_cdan",
    "consistency_cdan",
    "dicom_cdan",
    "priorrg_modules",
    "modeling_cdan",
    "processing_cdan",
    "image_processing_cdan",
    "tokenization_cdan",
    "pipeline_cdan",
    "heatmaps_cdan",
    "labeler_cdan",
    "mesh_cdan",
    "evaluation_cdan",
    "trainer_cdan",
    "train",
    "configuration_priorrg",
    "modeling_priorrg",
    "trainer_priorrg",
    "detection_cdan",
    "inference_cdan",
    "onnx_cdan",
    "onnx_quantization_cdan",
    *sorted(f"data_cdan.{path.stem}" for path in (REPOSITORY / "data_cdan").glob("*.py") if path.stem != "__init__"),
    "data_cdan",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_every_name_in_all_exists(module_name):
    module = importlib.import_module(module_name)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_readmes_data_imports_work():
    import data_cdan
    from data_cdan import export_to_parquet, load_cdan_dataset  # noqa: F401

    assert callable(data_cdan.push_to_hub)


@pytest.mark.parametrize("script", sorted((REPOSITORY / "scripts").glob("*.py")), ids=lambda path: path.name)
def test_scripts_import_the_installed_modules_only(script):
    source = script.read_text()
    assert "sys.path" not in source
    assert not re.search(r"^\s*(from|import) (tests|fixtures_data|test_\w+)\b", source, flags=re.MULTILINE)

