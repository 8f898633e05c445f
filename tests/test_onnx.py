"""ONNX export of CDAN and ONNX Runtime generation (`onnx_cdan.py`) against the PyTorch model's `generate()`."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from modeling_cdan import CdanForConditionalGeneration
from onnx_cdan import DECODER_STEP_FILE, ENCODER_FILE, METADATA_FILE, OnnxReportGenerator, export_onnx
from onnx_quantization_cdan import (
    DEFAULT_EXTRACTOR_INT8_MODULES,
    EXTRACTOR_INT8_OPERATORS,
    PixelValuesCalibrationReader,
    calibration_batches,
    in_extractor_backbone,
    linear_module_name,
    quantize_onnx_extractor_int8,
    quantize_onnx_int8,
)
from pipeline_cdan import save_checkpoint
from test_modeling import study_batch, tiny_model
from test_pipeline import FRONTAL, SECOND_FRONTAL, tiny_processor, tiny_report_model


REPOSITORY = Path(__file__).resolve().parents[1]
EOS_TOKEN_ID = 2
MAX_LENGTH = 30


def eos_prone_model() -> CdanForConditionalGeneration:
    """
    The tiny random model with its `<eos>` logit scaled up, so greedy and beam search end reports at different
    lengths per study and the length penalty changes which report beam search returns.
    """
    model = tiny_model(seed=2).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS_TOKEN_ID] *= 3.0
    model.generation_config.update(max_length=MAX_LENGTH)
    return model


def distinct_studies(batch_size: int = 3) -> torch.Tensor:
    """Random views at different brightness and contrast per study, so the studies get different reports."""
    scales = torch.tensor([0.5, 2.0, 4.0, 1.0])[:batch_size].view(-1, 1, 1, 1, 1)
    offsets = torch.tensor([-1.0, 0.0, 1.5, 0.5])[:batch_size].view(-1, 1, 1, 1, 1)
    return study_batch(batch_size) * scales + offsets


@pytest.fixture(scope="module")
def model() -> CdanForConditionalGeneration:
    return eos_prone_model()


@pytest.fixture(scope="module")
def onnx_folder(model, tmp_path_factory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx"), image_size=64)


@pytest.fixture(scope="module")
def generator(onnx_folder) -> OnnxReportGenerator:
    return OnnxReportGenerator(onnx_folder, num_threads=1)


def torch_generate(model: CdanForConditionalGeneration, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(pixel_values=pixel_values, **kwargs)


def assert_same_tokens(onnx_sequences: torch.Tensor, torch_sequences: torch.Tensor) -> None:
    assert onnx_sequences.shape == torch_sequences.shape
    assert torch.equal(onnx_sequences, torch_sequences)


def test_encoder_outputs_match_the_torch_encoder(model, generator):
    pixel_values = distinct_studies(3)  # the graph was exported with 2 studies: the batch is dynamic
    with torch.inference_mode():
        expected = model.get_encoder()(pixel_values=pixel_values)
    encoded = generator.encode(pixel_values)
    np.testing.assert_allclose(encoded["memory"], expected.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(encoded["disease_logits"], expected.disease_logits.numpy(), atol=1e-4, rtol=1e-4)


def test_the_studies_get_different_reports(model):
    """Guards the parity tests below: a mix-up of studies can only show when their reports differ."""
    sequences = torch_generate(model, distinct_studies(3))
    assert len({tuple(row.tolist()) for row in sequences}) == 3


def test_greedy_search_writes_the_tokens_of_generate(model, generator):
    pixel_values = distinct_studies(3)
    assert_same_tokens(generator.generate(pixel_values, num_beams=1), torch_generate(model, pixel_values, num_beams=1))


def test_beam_search_writes_the_tokens_of_generate(model, generator):
    pixel_values = distinct_studies(3)
    assert_same_tokens(generator.generate(pixel_values, num_beams=3), torch_generate(model, pixel_values, num_beams=3))


def test_beam_search_of_a_single_study_writes_the_tokens_of_generate(model, generator):
    pixel_values = distinct_studies(3)[2:]
    assert_same_tokens(generator.generate(pixel_values), torch_generate(model, pixel_values))


@pytest.mark.parametrize("length_penalty", [0.0, 3.0])
def test_beam_search_applies_the_length_penalty_of_generate(model, generator, length_penalty):
    pixel_values = distinct_studies(3)
    default_penalty = torch_generate(model, pixel_values, num_beams=3)
    expected = torch_generate(model, pixel_values, num_beams=3, length_penalty=length_penalty)
    assert expected.shape != default_penalty.shape or not torch.equal(expected, default_penalty)  # it matters here
    assert_same_tokens(generator.generate(pixel_values, num_beams=3, length_penalty=length_penalty), expected)


def test_beam_search_without_early_stopping_returns_the_sequences_of_generate(model, generator):
    pixel_values = distinct_studies(2)
    options = {"num_beams": 3, "early_stopping": False, "num_return_sequences": 2}
    assert_same_tokens(generator.generate(pixel_values, **options), torch_generate(model, pixel_values, **options))


def test_beam_search_blocks_repeated_ngrams_like_generate(model, generator):
    pixel_values = distinct_studies(3)
    options = {"num_beams": 3, "no_repeat_ngram_size": 2}
    assert_same_tokens(generator.generate(pixel_values, **options), torch_generate(model, pixel_values, **options))


def test_forced_length_beam_search_writes_the_tokens_of_generate(model, generator):
    """The benchmark's setting: `min_length = max_length`, so no report ends before `max_length`."""
    pixel_values = distinct_studies(3)
    options = {"num_beams": 3, "min_length": MAX_LENGTH, "max_length": MAX_LENGTH}
    sequences = generator.generate(pixel_values, **options)
    assert sequences.shape == (3, MAX_LENGTH) and not (sequences[:, 1:] == EOS_TOKEN_ID).any()
    assert_same_tokens(sequences, torch_generate(model, pixel_values, **options))


def test_cached_decoder_steps_give_the_logits_of_one_uncached_pass(generator):
    encoded = generator.encode(distinct_studies(2))
    cross = {name: value for name, value in encoded.items() if name.startswith("cross_")}
    tokens = np.array([[1, 5, 9, 3, 7], [1, 8, 4, 4, 6]])  # (N, T)
    uncached_logits, _ = generator.decoder_step(tokens, generator.empty_past(2), cross)  # (N, T, V)
    past, cached_logits = generator.empty_past(2), []
    for position in range(tokens.shape[1]):
        logits, past = generator.decoder_step(tokens[:, position : position + 1], past, cross)
        cached_logits.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(cached_logits, axis=1), uncached_logits, atol=1e-4, rtol=1e-4)


def test_decoder_step_logits_match_the_torch_model(model, generator):
    pixel_values = distinct_studies(2)
    tokens = torch.tensor([[1, 5, 9, 3, 7], [1, 8, 4, 4, 6]])
    with torch.inference_mode():
        expected = model(pixel_values=pixel_values, decoder_input_ids=tokens).logits
    encoded = generator.encode(pixel_values)
    cross = {name: value for name, value in encoded.items() if name.startswith("cross_")}
    logits, _ = generator.decoder_step(tokens.numpy(), generator.empty_past(2), cross)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX folder not found"):
        OnnxReportGenerator(tmp_path / "missing")


def test_an_incomplete_folder_names_the_missing_file(onnx_folder, tmp_path):
    incomplete = shutil.copytree(onnx_folder, tmp_path / "incomplete")
    (incomplete / DECODER_STEP_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=DECODER_STEP_FILE):
        OnnxReportGenerator(incomplete)


def test_a_wrong_number_of_views_is_a_clear_error(generator):
    with pytest.raises(ValueError, match="reads 2 view"):
        generator.generate(study_batch(2, num_views=3))


def test_a_wrong_image_size_is_a_clear_error(generator):
    with pytest.raises(ValueError, match="64 x 64"):
        generator.generate(torch.randn(1, 2, 3, 32, 32))


def test_an_unsupported_generation_option_is_a_clear_error(generator):
    with pytest.raises(ValueError, match="repetition_penalty"):
        generator.generate(distinct_studies(1), repetition_penalty=1.3)


@pytest.fixture(scope="module")
def prompt_model() -> CdanForConditionalGeneration:
    """A tiny model with the diagnosis prompt, whose reports end at different lengths (see `eos_prone_model`)."""
    model = tiny_model(seed=2, use_diagnosis_prompt=True).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS_TOKEN_ID] *= 3.0
    model.generation_config.update(max_length=MAX_LENGTH)
    return model


@pytest.fixture(scope="module")
def prompt_generator(prompt_model, tmp_path_factory) -> OnnxReportGenerator:
    return OnnxReportGenerator(export_onnx(prompt_model, tmp_path_factory.mktemp("onnx_prompt"), image_size=64), 1)


def test_a_diagnosis_prompt_model_writes_the_tokens_of_generate(prompt_model, prompt_generator):
    pixel_values = distinct_studies(3)
    assert_same_tokens(prompt_generator.generate(pixel_values), torch_generate(prompt_model, pixel_values))


def test_given_diagnosis_states_condition_the_reports_like_generate(prompt_model, prompt_generator):
    pixel_values = distinct_studies(3)
    diagnosis_states = torch.randint(
        0, 3, (3, prompt_model.config.num_observations), generator=torch.Generator().manual_seed(0)
    )
    expected = torch_generate(prompt_model, pixel_values, diagnosis_states=diagnosis_states)
    classifier_prompt = torch_generate(prompt_model, pixel_values)
    assert expected.shape != classifier_prompt.shape or not torch.equal(expected, classifier_prompt)  # it matters
    assert_same_tokens(prompt_generator.generate(pixel_values, diagnosis_states=diagnosis_states), expected)


def test_out_of_range_diagnosis_states_are_a_clear_error(prompt_generator):
    diagnosis_states = torch.full((1, prompt_generator.config.num_observations), 3)
    with pytest.raises(ValueError, match="indices 0 to 2"):
        prompt_generator.generate(distinct_studies(1), diagnosis_states=diagnosis_states)


def test_diagnosis_states_without_a_diagnosis_prompt_are_a_clear_error(generator):
    with pytest.raises(ValueError, match="no diagnosis prompt"):
        generator.generate(distinct_studies(1), diagnosis_states=torch.zeros(1, 14, dtype=torch.long))


def test_export_refuses_a_model_that_reads_a_prior_study(tmp_path):
    with pytest.raises(ValueError, match="use_prior_study"):
        export_onnx(tiny_model(use_prior_study=True), tmp_path, image_size=64)


def test_a_missing_onnxruntime_names_the_install_command(onnx_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "cdan-report\[onnx\]"'):
        OnnxReportGenerator(onnx_folder)


# --------------------------------------------------------------------------------------------------------------------
# int8 quantisation with ONNX Runtime
# --------------------------------------------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def graph_op_count(path: Path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def int8_folder(onnx_folder, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("onnx_int8") / "export"
    shutil.copytree(onnx_folder, folder)
    return folder, quantize_onnx_int8(folder)


def test_exported_linear_nodes_are_named_as_the_model_s_modules(model, onnx_folder):
    decoder_nodes = onnx.load(onnx_folder / DECODER_STEP_FILE).graph.node
    named = {linear_module_name(node) for node in decoder_nodes} - {None}
    decoder_linear = {name for name in linear_names(model) if name.startswith("model.decoder.") or name == "lm_head"}
    cross_key_values = {
        name for name in decoder_linear if ".encoder_attn." in name and name.endswith(("k_proj", "v_proj"))
    }
    assert named == decoder_linear - cross_key_values  # the encoder graph projects the memory's keys and values


def test_int8_onnx_quantises_the_default_scope_s_linear_layers(model, int8_folder):
    folder, quantized = int8_folder
    linear = linear_names(model)
    cross_attention = {name for name in linear if ".encoder_attn." in name}
    assert set(quantized[ENCODER_FILE]) == {name for name in linear if name.startswith("model.encoder.layers.")} | {
        name for name in cross_attention if name.endswith(("k_proj", "v_proj"))
    }
    per_step = {name for name in cross_attention if name.endswith(("q_proj", "out_proj"))}
    assert set(quantized[DECODER_STEP_FILE]) == per_step
    for file_name, names in quantized.items():
        assert graph_op_count(folder / file_name, "MatMulInteger") == len(names)


def test_int8_onnx_keeps_the_language_model_head_in_float(int8_folder):
    folder, _ = int8_folder
    head_nodes = [
        node for node in onnx.load(folder / DECODER_STEP_FILE).graph.node if linear_module_name(node) == "lm_head"
    ]
    assert [node.op_type for node in head_nodes] == ["MatMul"]


def test_int8_onnx_decoder_step_logits_stay_close_to_float(onnx_folder, int8_folder):
    pixel_values = distinct_studies(2)
    float_generator, int8_generator = OnnxReportGenerator(onnx_folder, 1), OnnxReportGenerator(int8_folder[0], 1)
    logits = []
    for generator in (float_generator, int8_generator):
        encoded = generator.encode(pixel_values.numpy())
        cross = {name: encoded[name] for name in generator.metadata["encoder_outputs"] if name.startswith("cross_")}
        input_ids = np.array([[1, 5, 9, 12], [1, 7, 3, 20]], dtype=np.int64)  # (N, T)
        logits.append(generator.decoder_step(input_ids, generator.empty_past(2), cross)[0])  # (N, T, V)
    relative_error = np.linalg.norm(logits[1] - logits[0]) / np.linalg.norm(logits[0])
    assert 0 < relative_error < 0.1


def test_int8_onnx_generates_reports_of_valid_tokens(model, int8_folder):
    sequences = OnnxReportGenerator(int8_folder[0], 1).generate(distinct_studies(3), num_beams=2)
    assert sequences.shape[0] == 3 and sequences.shape[1] <= MAX_LENGTH
    assert ((sequences >= 0) & (sequences < model.config.vocab_size)).all()


def test_int8_onnx_refuses_a_folder_already_quantised(int8_folder):
    with pytest.raises(ValueError, match="already quantised"):
        quantize_onnx_int8(int8_folder[0])


def test_int8_onnx_refuses_an_unknown_scope(onnx_folder):
    with pytest.raises(ValueError, match="Unknown int8_scope 'everything'"):
        quantize_onnx_int8(onnx_folder, "everything")


# --------------------------------------------------------------------------------------------------------------------
# static int8 visual extractor with ONNX Runtime
# --------------------------------------------------------------------------------------------------------------------


def calibration_studies(scale: float = 1.0) -> list[torch.Tensor]:
    return [distinct_studies(3) * scale, study_batch(2, seed=5) * scale]


def static_int8_copy(onnx_folder: Path, destination: Path, scale: float = 1.0, **kwargs) -> tuple[Path, list[str]]:
    folder = destination / "export"
    shutil.copytree(onnx_folder, folder)
    return folder, quantize_onnx_extractor_int8(folder, calibration_studies(scale), **kwargs)


@pytest.fixture(scope="module")
def extractor_int8_folder(onnx_folder, tmp_path_factory) -> tuple[Path, list[str]]:
    return static_int8_copy(onnx_folder, tmp_path_factory.mktemp("onnx_extractor_int8"))


def producers(graph) -> dict[str, object]:
    return {output: node for node in graph.node for output in node.output}


def convolution_weight_types(folder: Path) -> dict[str, tuple[bool, str]]:
    """Per convolution of the encoder graph: whether it lies in the third stage, and `"int8"` when its weight is
    dequantised from an int8 initializer and its input from a quantised activation, `"float"` when both are float."""
    graph = onnx.load(folder / ENCODER_FILE).graph
    initializers, produced_by = {tensor.name: tensor for tensor in graph.initializer}, producers(graph)
    kinds = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight, activation = produced_by.get(node.input[1]), produced_by.get(node.input[0])
        if weight is not None and weight.op_type == "DequantizeLinear":
            assert initializers[weight.input[0]].data_type == onnx.TensorProto.INT8
            assert activation.op_type == "DequantizeLinear"  # uint8 activations in
            kind = "int8"
        else:
            assert initializers[node.input[1]].data_type == onnx.TensorProto.FLOAT
            kind = "float"
        kinds[node.name] = (in_extractor_backbone(node, ("layer3",)), kind)
    return kinds


def test_extractor_int8_quantises_the_convolutions_of_the_third_stage_only(extractor_int8_folder):
    kinds = convolution_weight_types(extractor_int8_folder[0])
    assert DEFAULT_EXTRACTOR_INT8_MODULES == ("layer3",)
    assert {kind for in_stage, kind in kinds.values() if in_stage} == {"int8"}
    assert {kind for in_stage, kind in kinds.values() if not in_stage} == {"float"}


def test_extractor_int8_of_the_whole_backbone_quantises_every_convolution(onnx_folder, tmp_path):
    folder, _ = static_int8_copy(onnx_folder, tmp_path, backbone_modules=None)
    kinds = convolution_weight_types(folder)
    assert len(kinds) == graph_op_count(onnx_folder / ENCODER_FILE, "Conv")
    assert {kind for _, kind in kinds.values()} == {"int8"}


def test_extractor_int8_refuses_modules_the_backbone_does_not_have(onnx_folder, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_folder, folder)
    with pytest.raises(ValueError, match=r"No node of .* lies in the backbone modules \('stage9',\)"):
        quantize_onnx_extractor_int8(folder, calibration_studies(), backbone_modules=("stage9",))


def test_extractor_int8_leaves_the_layers_after_the_backbone_in_float(onnx_folder, extractor_int8_folder):
    _, quantized = extractor_int8_folder
    graph = onnx.load(extractor_int8_folder[0] / ENCODER_FILE).graph
    float_matmuls = graph_op_count(onnx_folder / ENCODER_FILE, "MatMul")
    assert graph_op_count(extractor_int8_folder[0] / ENCODER_FILE, "MatMul") == float_matmuls
    produced_by = producers(graph)
    matmul_inputs = [produced_by.get(name) for node in graph.node if node.op_type == "MatMul" for name in node.input]
    assert not any(node is not None and node.op_type == "DequantizeLinear" for node in matmul_inputs)
    float_nodes = {node.name: node for node in onnx.load(onnx_folder / ENCODER_FILE).graph.node}
    assert {float_nodes[name].op_type for name in quantized} <= set(EXTRACTOR_INT8_OPERATORS)
    assert all(in_extractor_backbone(float_nodes[name], DEFAULT_EXTRACTOR_INT8_MODULES) for name in quantized)


def test_extractor_int8_memory_stays_close_to_float(onnx_folder, extractor_int8_folder):
    pixel_values = distinct_studies(3).numpy()
    float_memory = OnnxReportGenerator(onnx_folder, 1).encode(pixel_values)["memory"]
    int8_memory = OnnxReportGenerator(extractor_int8_folder[0], 1).encode(pixel_values)["memory"]
    relative_error = np.linalg.norm(int8_memory - float_memory) / np.linalg.norm(float_memory)
    assert 0 < relative_error < 0.1


def input_scale(folder: Path) -> float:
    """The scale with which the graph quantises `pixel_values` on its way into the first convolution."""
    graph = onnx.load(folder / ENCODER_FILE).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    first_quantize = next(node for node in graph.node if node.op_type == "QuantizeLinear")
    return float(onnx.numpy_helper.to_array(initializers[first_quantize.input[1]]))


def test_extractor_int8_activation_ranges_come_from_the_calibration_studies(onnx_folder, tmp_path):
    options = {"backbone_modules": None, "calibration_method": "MinMax"}  # from the views on; ranges scale exactly
    folder, _ = static_int8_copy(onnx_folder, tmp_path / "1x", **options)
    wider_folder, _ = static_int8_copy(onnx_folder, tmp_path / "4x", scale=4.0, **options)
    assert input_scale(wider_folder) == pytest.approx(4.0 * input_scale(folder), rel=1e-3)


def test_extractor_int8_records_its_calibration_in_the_metadata(extractor_int8_folder):
    metadata = json.loads((extractor_int8_folder[0] / METADATA_FILE).read_text())
    assert metadata["extractor_int8"] == {
        "calibration_studies": 5,
        "calibration_method": "Percentile",
        "backbone_modules": ["layer3"],
    }


def test_extractor_int8_then_linear_int8_generates_reports_of_valid_tokens(model, extractor_int8_folder, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(extractor_int8_folder[0], folder)
    quantized = quantize_onnx_int8(folder)
    assert graph_op_count(folder / ENCODER_FILE, "MatMulInteger") == len(quantized[ENCODER_FILE]) > 0
    sequences = OnnxReportGenerator(folder, 1).generate(distinct_studies(3), num_beams=2)
    assert sequences.shape[0] == 3 and ((sequences >= 0) & (sequences < model.config.vocab_size)).all()


def test_extractor_int8_refuses_a_folder_already_quantised(extractor_int8_folder):
    with pytest.raises(ValueError, match="already quantised"):
        quantize_onnx_extractor_int8(extractor_int8_folder[0], calibration_studies())


def test_calibration_reader_hands_over_one_study_at_a_time_within_its_range():
    batches = calibration_studies()  # a batch of 3 studies, then one of 2
    reader = PixelValuesCalibrationReader(batches)
    assert len(reader) == 5
    reader.set_range(start_index=2, end_index=4)
    handed = [reader.get_next() for _ in range(3)]
    assert handed[2] is None
    expected = [batches[0][2:3], batches[1][0:1]]  # studies 2 and 3, each (1, V, 3, H, W)
    for inputs, study in zip(handed[:2], expected):
        np.testing.assert_array_equal(inputs["pixel_values"], study.numpy())


def test_extractor_int8_refuses_an_empty_calibration_set(onnx_folder, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_folder, folder)
    with pytest.raises(ValueError, match="no batch to calibrate on"):
        quantize_onnx_extractor_int8(folder, [])
    assert "extractor_int8" not in json.loads((folder / METADATA_FILE).read_text())


def test_extractor_int8_refuses_an_unknown_calibration_method(onnx_folder):
    with pytest.raises(ValueError, match="Unknown calibration_method 'Median'"):
        quantize_onnx_extractor_int8(onnx_folder, calibration_studies(), "Median")


def test_calibration_batches_process_the_studies_a_batch_at_a_time():
    processor = tiny_processor()
    studies = [[FRONTAL, SECOND_FRONTAL], [SECOND_FRONTAL, FRONTAL], [FRONTAL, FRONTAL]]
    batches = list(calibration_batches(processor, studies, batch_size=2))
    assert [tuple(batch.shape) for batch in batches] == [(2, 2, 3, 64, 64), (1, 2, 3, 64, 64)]
    torch.testing.assert_close(torch.cat(batches), processor(images=studies, return_tensors="pt")["pixel_values"])


def test_export_script_calibrates_the_static_int8_extractor_on_the_asked_split(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY / "scripts"))
    export_script = importlib.import_module("export_onnx")
    processor = tiny_processor()
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(tiny_report_model(processor), processor, checkpoint)
    arguments = ["--model", str(checkpoint), "--output_dir", str(tmp_path / "onnx"), "--parity_studies", "1",
                 "--threads", "1", "--extractor_int8_calibration", "demo", "--calibration_studies", "3",
                 "--int8_scope", "encoder-and-cross-attention"]  # fmt: skip
    assert export_script.main(arguments) == 0  # the parity check ran on the float32 export
    metadata = json.loads((tmp_path / "onnx" / METADATA_FILE).read_text())
    assert metadata["extractor_int8"]["calibration_studies"] == 3
    assert metadata["int8_scope"] == "encoder-and-cross-attention"


def test_importing_onnx_cdan_imports_no_onnx_package():
    code = "import sys, onnx_cdan; print(sorted({'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
