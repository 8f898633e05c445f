"""Cold start: inference imports no training-only module (data builders, metrics, plotting, the trainer)."""

import pytest

from pipeline_cdan import save_checkpoint
from test_pipeline import FRONTAL, run_in_fresh_python, tiny_processor, tiny_report_model


TRAINING_ONLY_MODULES = (
    "data_cdan",
    "datasets",
    "sklearn",
    "matplotlib",
    "tensorboard",
    "torch.utils.tensorboard",
    "pycocoevalcap",
    "trainer_cdan",
    "evaluation_cdan",
    "train",
)
"""Packages and modules that only training and evaluation need; a module counts with its sub-modules."""

LIST_TRAINING_ONLY_MODULES = f"""
import json, sys
prefixes = {TRAINING_ONLY_MODULES!r}
loaded = sorted(name for name in sys.modules if any(name == p or name.startswith(p + ".") for p in prefixes))
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    processor = tiny_processor()
    directory = tmp_path_factory.mktemp("cold-start-checkpoint")
    save_checkpoint(tiny_report_model(processor), processor, directory)
    return directory


@pytest.mark.parametrize("module", ["pipeline_cdan", "cli_cdan"])  # cli_cdan imports the modeling and processing
def test_importing_an_inference_module_loads_no_training_module(module, tmp_path):
    assert run_in_fresh_python(f"import {module}\n{LIST_TRAINING_ONLY_MODULES}", cwd=tmp_path) == []


def test_first_report_through_the_remote_code_pipeline_loads_no_training_module(checkpoint, tmp_path):
    code = f"""
import pipeline_cdan
from transformers import pipeline
reporter = pipeline("image-to-text", model={str(checkpoint)!r}, trust_remote_code=True)
assert type(reporter).__module__.startswith("transformers_modules"), type(reporter).__module__
reporter({str(FRONTAL)!r}, return_labels=True)
{LIST_TRAINING_ONLY_MODULES}"""
    assert run_in_fresh_python(code, cwd=tmp_path) == []
