"""Faster CPU inference (`inference_cdan.py`): int8 layers, the bfloat16 gate, compile, pipeline and CLI wiring."""

import copy
import fnmatch
import importlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from transformers import pipeline

import cli_cdan
import inference_cdan
from inference_cdan import (
    DEFAULT_INT8_SCOPE,
    INT8_KEPT_FLOAT_MODULES,
    INT8_SCOPES,
    NAMED_OPTIONS,
    InferenceOptions,
    cpu_flags,
    cpu_supports_bf16,
    optimize_for_inference,
)
from modeling_cdan import CdanLinear
from pipeline_cdan import PIPELINE_MODULE_FILES, CdanReportPipeline, save_checkpoint
from test_modeling import study_batch, tiny_model
from test_pipeline import tiny_processor, tiny_report_model


INT8_LOGITS_RELATIVE_TOLERANCE = 0.10
"""Largest relative (Frobenius) error of int8 teacher-forced logits on the tiny model. Dynamic int8 quantisation
guarantees no exact tokens: each linear layer rounds its input to 8 bits per call and its weights to 8 bits per
output channel. On `tiny_model()` (init std 0.5, so large activations) the error is about 5 %; wrongly quantised
weights would give errors of order 100 %."""

NO_BF16_FLAGS = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})
"""An AVX-512 CPU without AVX512-BF16 or AMX (Ice Lake, Zen 3 servers have none of the bfloat16 flags)."""

DECODE_KWARGS = {"max_length": 10, "num_beams": 2, "do_sample": False}


@pytest.fixture
def model() -> nn.Module:
    return tiny_model().eval()


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that reports AVX512-BF16 (this test machine's own flags are not read)."""
    monkeypatch.setattr(inference_cdan, "cpu_flags", lambda *args: frozenset({"avx512f", "avx512_bf16"}))


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(inference_cdan, "cpu_flags", lambda *args: NO_BF16_FLAGS)


def linear_layer_names(model: nn.Module, layer_type: type) -> set[str]:
    return {name for name, module in model.named_modules() if type(module) is layer_type}


def kept_float(name: str) -> bool:
    return any(name == kept or name.startswith(kept + ".") for kept in INT8_KEPT_FLOAT_MODULES)


def teacher_forced_logits(model: nn.Module) -> torch.Tensor:
    decoder_input_ids = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return model(pixel_values=study_batch(), decoder_input_ids=decoder_input_ids).logits  # (B, T, V)


def generate(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(pixel_values=study_batch(), **DECODE_KWARGS)


# --------------------------------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------------------------------


def float_linear_names(model: nn.Module) -> set[str]:
    return linear_layer_names(model, CdanLinear) | linear_layer_names(model, nn.Linear)


def test_int8_all_scope_replaces_every_linear_layer_outside_the_float_modules(model):
    float_linear = float_linear_names(model)
    quantized = optimize_for_inference(model, precision="int8", int8_scope="all")
    assert linear_layer_names(quantized, quantized_dynamic.Linear) == {
        name for name in float_linear if not kept_float(name)
    }
    remaining = float_linear_names(quantized)
    assert remaining and all(kept_float(name) for name in remaining)


def test_int8_default_scope_quantises_the_encoder_layers_and_the_cross_attention_only(model):
    float_linear = float_linear_names(model)
    quantized = optimize_for_inference(model, precision="int8")
    expected = {name for name in float_linear if name.startswith("model.encoder.layers.") or ".encoder_attn." in name}
    assert linear_layer_names(quantized, quantized_dynamic.Linear) == expected
    decoder_linear = {name for name in float_linear if name.startswith("model.decoder.")}
    assert float_linear_names(quantized) & decoder_linear == {
        name for name in decoder_linear if ".self_attn." in name or ".feed_forward." in name
    }


@pytest.mark.parametrize("scope", list(INT8_SCOPES))
def test_int8_scope_quantises_exactly_its_layers(model, scope):
    def selected(name: str) -> bool:
        return not kept_float(name) and any(fnmatch.fnmatchcase(name, pattern) for pattern in INT8_SCOPES[scope])

    float_linear = float_linear_names(model)
    quantized = optimize_for_inference(model, precision="int8", int8_scope=scope)
    assert linear_layer_names(quantized, quantized_dynamic.Linear) == {name for name in float_linear if selected(name)}
    assert float_linear_names(quantized) == {name for name in float_linear if not selected(name)}


def test_int8_scope_is_recorded_on_the_prepared_model(model):
    prepared = optimize_for_inference(model, precision="int8", int8_scope="decoder")
    assert prepared.inference_options == InferenceOptions(precision="int8", int8_scope="decoder")


def test_unknown_int8_scope_is_refused(model):
    with pytest.raises(ValueError, match="Unknown int8_scope 'lm_head'"):
        optimize_for_inference(model, precision="int8", int8_scope="lm_head")


def test_int8_scope_without_int8_precision_is_refused(model):
    with pytest.raises(ValueError, match="applies to precision='int8' only"):
        optimize_for_inference(model, precision="fp32", int8_scope="all")


def test_named_int8_options_take_the_default_and_the_all_scope():
    assert NAMED_OPTIONS["int8"].int8_scope == DEFAULT_INT8_SCOPE == "encoder-and-cross-attention"
    assert NAMED_OPTIONS["int8-all"] == InferenceOptions(precision="int8", int8_scope="all")


def test_int8_leaves_the_original_model_unchanged(model):
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    types_before = {name: type(module) for name, module in model.named_modules()}
    optimize_for_inference(model, precision="int8")
    assert {name: type(module) for name, module in model.named_modules()} == types_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], tensor) for name, tensor in state_before.items())


def test_int8_logits_stay_close_to_float32(model):
    reference = teacher_forced_logits(model)
    quantized = teacher_forced_logits(optimize_for_inference(model, precision="int8"))
    relative_error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < relative_error < INT8_LOGITS_RELATIVE_TOLERANCE


def test_int8_generates_full_reports_of_valid_tokens(model):
    sequences = generate(optimize_for_inference(model, precision="int8"))
    assert sequences.shape[0] == 2 and sequences.shape[1] <= DECODE_KWARGS["max_length"]
    assert ((sequences >= 0) & (sequences < model.config.vocab_size)).all()


# --------------------------------------------------------------------------------------------------------------------
# bfloat16 gate and autocast
# --------------------------------------------------------------------------------------------------------------------


def test_cpu_flags_reads_the_flags_line_of_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16", "amx_tile"}


def test_cpu_flags_of_an_unreadable_cpuinfo_is_empty(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_bf16_gate_accepts_a_cpu_with_native_bfloat16(flag):
    assert cpu_supports_bf16(NO_BF16_FLAGS | {flag})


def test_bf16_gate_refuses_avx512_without_bfloat16():
    assert not cpu_supports_bf16(NO_BF16_FLAGS)


def test_bf16_is_refused_with_a_clear_error_on_a_cpu_without_it(model, cpu_without_bf16):
    with pytest.raises(ValueError, match=r"AVX512-BF16 or AMX.*precision='fp32' or precision='int8'"):
        optimize_for_inference(model, precision="bf16")


def test_bf16_decoding_steps_run_under_bfloat16_autocast(model, bf16_cpu):
    prepared = optimize_for_inference(model, precision="bf16")
    seen = []
    prepared.model.decoder.layers[0].register_forward_hook(
        lambda *args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    generate(prepared)
    assert seen and set(seen) == {(True, torch.bfloat16)}


def test_bf16_encoder_called_alone_runs_under_bfloat16_autocast(model, bf16_cpu):
    prepared = optimize_for_inference(model, precision="bf16")
    seen = []
    prepared.model.encoder.layers[0].register_forward_hook(lambda *args: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.inference_mode():
        prepared.get_encoder()(pixel_values=study_batch())
    assert seen == [True]


def test_bf16_returns_float32_logits_close_to_float32(model, bf16_cpu):
    reference = teacher_forced_logits(model)
    logits = teacher_forced_logits(optimize_for_inference(model, precision="bf16"))
    assert logits.dtype == torch.float32
    assert ((logits - reference).norm() / reference.norm()).item() < 0.05  # bfloat16 keeps 8 significant bits


def test_bf16_wrapper_of_a_deep_copy_runs_the_copy(model, bf16_cpu):
    prepared = optimize_for_inference(model, precision="bf16")
    copied = copy.deepcopy(prepared)
    assert copied.forward.__self__ is copied and copied.get_encoder().forward.__self__ is copied.get_encoder()


# --------------------------------------------------------------------------------------------------------------------
# compile (the real Inductor compile of even the tiny model takes about a minute on two shared cores, so these tests
# compile with Dynamo's counting backend: they check which code is compiled and that it generates the same tokens;
# Inductor's own agreement is checked on the trained model by scripts/check_inference_agreement.py)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def compile_counter(monkeypatch) -> CompileCounter:
    counter = CompileCounter()
    real_compile = torch.compile

    def counting_compile(function, **kwargs):
        return real_compile(function, backend=counter)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_compile_compiles_the_visual_extractor_and_generates_the_same_tokens(model, compile_counter):
    reference = generate(model)
    sequences = generate(optimize_for_inference(model, compile=True))
    assert compile_counter.frame_count >= 1
    assert torch.equal(sequences, reference)


def test_compile_asks_inductor_to_freeze_the_weights(model, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: calls.append(kwargs) or function)
    optimize_for_inference(model, compile=True)
    assert calls == [{"options": {"freezing": True}}]


# --------------------------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------------------------


def test_options_are_recorded_on_the_prepared_model(model):
    prepared = optimize_for_inference(model, precision="int8")
    assert prepared.inference_options == InferenceOptions(precision="int8")


def test_a_prepared_model_cannot_be_prepared_again(model):
    prepared = optimize_for_inference(model, precision="int8")
    with pytest.raises(ValueError, match="already prepared"):
        optimize_for_inference(prepared, precision="int8")


def test_unknown_precision_is_refused(model):
    with pytest.raises(ValueError, match="Unknown precision 'fp16'"):
        optimize_for_inference(model, precision="fp16")


# --------------------------------------------------------------------------------------------------------------------
# pipeline and CLI
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    processor = tiny_processor()
    directory = tmp_path_factory.mktemp("inference-checkpoint")
    save_checkpoint(tiny_report_model(processor), processor, directory)
    return directory


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "study.png"
    Image.linear_gradient("L").resize((48, 48)).save(path)
    return path


def test_pipeline_precision_argument_prepares_the_model():
    processor = tiny_processor()
    reporter = CdanReportPipeline(model=tiny_report_model(processor), processor=processor, precision="int8")
    assert reporter.model.inference_options == InferenceOptions(precision="int8")
    assert linear_layer_names(reporter.model, quantized_dynamic.Linear)


def test_remote_code_pipeline_takes_precision(checkpoint, image):
    assert "inference_cdan.py" in PIPELINE_MODULE_FILES and (checkpoint / "inference_cdan.py").is_file()
    reporter = pipeline("image-to-text", model=str(checkpoint), trust_remote_code=True, precision="int8")
    assert type(reporter).__module__.startswith("transformers_modules")  # the checkpoint's copy, not this library
    assert reporter.model.inference_options.precision == "int8"
    quantized = linear_layer_names(reporter.model, quantized_dynamic.Linear)  # the remote code's own `CdanLinear`s
    in_default_scope = [name.startswith("model.encoder.layers.") or ".encoder_attn." in name for name in quantized]
    assert quantized and all(in_default_scope)
    assert isinstance(reporter((str(image), str(image)))[0]["generated_text"], str)


def test_cli_precision_and_compile_flags_reach_the_model(checkpoint, image, tmp_path, monkeypatch):
    reporters = []
    real_load_reporter = cli_cdan.load_reporter

    def recording_load_reporter(*args, **kwargs):
        reporters.append(real_load_reporter(*args, **kwargs))
        return reporters[-1]

    monkeypatch.setattr(cli_cdan, "load_reporter", recording_load_reporter)
    monkeypatch.setattr(inference_cdan, "compile_visual_extractor", lambda model: model)  # wiring only
    output = tmp_path / "reports.jsonl"
    status = cli_cdan.main(
        ["--model", str(checkpoint), "--inputs", str(image), "--output", str(output), "--precision", "int8",
         "--compile", "true"]
    )  # fmt: skip
    assert status == cli_cdan.EXIT_OK
    assert reporters[0].model.inference_options == InferenceOptions(precision="int8", compile=True)


def test_cli_refuses_bf16_on_a_cpu_without_it(checkpoint, image, tmp_path, cpu_without_bf16, capsys):
    output = tmp_path / "reports.jsonl"
    status = cli_cdan.main(["--model", str(checkpoint), "--inputs", str(image), "--output", str(output),
                            "--precision", "bf16"])  # fmt: skip
    assert status == cli_cdan.EXIT_USAGE_ERROR
    assert "AVX512-BF16 or AMX" in capsys.readouterr().err
    assert not output.exists() or output.read_text() == ""


# --------------------------------------------------------------------------------------------------------------------
# benchmark rows
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def benchmark_generation(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module("benchmark_generation")


def benchmark_row(variant: str, reports_per_second: float) -> dict:
    return {
        "stack": "cdan",
        "variant": variant,
        "batch_size": 8,
        "num_beams": 3,
        "use_cache": True,
        "reports_per_second": reports_per_second,
        "tokens_per_second": 59 * reports_per_second,
        "extractor_share": 0.5,
        "peak_rss_mb": 1400.0,
        "contended": False,
    }


def test_benchmark_int8_all_variant_quantises_with_the_all_scope(benchmark_generation, model):
    benchmark_generation.VARIANTS["int8-all"](model)  # prepares the model in place
    assert linear_layer_names(model, quantized_dynamic.Linear) == {
        name for name in float_linear_names(tiny_model()) if not kept_float(name)
    }


def test_benchmark_offers_every_named_option_as_a_variant(benchmark_generation):
    assert set(benchmark_generation.VARIANTS) == {
        *inference_cdan.NAMED_OPTIONS,
        "onnxruntime",
        "onnxruntime-int8",
        "onnxruntime-int8-static",
    }


def test_benchmark_table_puts_each_variant_beside_fp32_with_its_speedup(benchmark_generation):
    table = benchmark_generation.results_table([benchmark_row("fp32", 2.0), benchmark_row("int8", 3.0)])
    lines = table.splitlines()
    assert lines[0].startswith("| stack | variant | batch |") and lines[0].endswith("| vs fp32 |")
    assert lines[3].startswith("| CDAN | int8 | 8 | 3 | on | 3.00 |") and lines[3].endswith("| 1.50x |")


def test_benchmark_table_of_fp32_rows_keeps_its_columns(benchmark_generation):
    header = benchmark_generation.results_table([benchmark_row("fp32", 2.0)]).splitlines()[0]
    assert header == "| stack | batch | beams | cache | reports/s | tokens/s | extractor share | peak RSS MB |"


# --------------------------------------------------------------------------------------------------------------------
# agreement script
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def check_inference_agreement(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module("check_inference_agreement")


def test_agreement_int8_scopes_add_one_int8_row_per_scope(check_inference_agreement):
    options = check_inference_agreement.options_to_run(["int8"], ["all", "decoder"])
    assert options == {
        "fp32": InferenceOptions(),
        "int8": InferenceOptions(precision="int8"),
        "int8 (all)": InferenceOptions(precision="int8", int8_scope="all"),
        "int8 (decoder)": InferenceOptions(precision="int8", int8_scope="decoder"),
    }


def test_agreement_run_option_prepares_the_model_with_the_scope(check_inference_agreement, model, monkeypatch):
    prepared = []

    def recording_generate(model, processor, dataset, batch_size, **kwargs):
        prepared.append(model)
        return ["report"] * len(dataset), None

    monkeypatch.setattr(check_inference_agreement, "generate_reports_and_disease_logits", recording_generate)
    dataset = Dataset.from_dict({"id": ["a", "b"]})
    options = InferenceOptions(precision="int8", int8_scope="decoder-feed-forward")
    result = check_inference_agreement.run_option(model, None, dataset, options, batch_size=2)
    assert result["reports"] == ["report", "report"] and result["cpu_seconds"] >= 0
    assert prepared[-1].inference_options == options
    assert linear_layer_names(prepared[-1], quantized_dynamic.Linear) == {
        name for name in float_linear_names(model) if ".feed_forward." in name and name.startswith("model.decoder.")
    }


@pytest.mark.parametrize("int8_scope", [None, "all"])
def test_agreement_onnx_rows_quantise_the_export_with_their_scope(check_inference_agreement, monkeypatch, int8_scope):
    import onnx_cdan
    import onnx_quantization_cdan

    calls = []
    monkeypatch.setattr(onnx_cdan, "export_onnx", lambda model, folder, processor: calls.append(("export", None)))
    monkeypatch.setattr(
        onnx_quantization_cdan, "quantize_onnx_int8", lambda folder, scope: calls.append(("quantize", scope))
    )
    monkeypatch.setattr(onnx_cdan, "OnnxReportGenerator", lambda folder, num_threads: "generator")

    def recording_generate(generator, model, processor, dataset, batch_size, **kwargs):
        calls.append(("generate", generator))
        return ["report"] * len(dataset)

    monkeypatch.setattr(check_inference_agreement, "generate_onnx_reports", recording_generate)
    dataset = Dataset.from_dict({"id": ["a", "b", "c"]})
    result = check_inference_agreement.run_onnx_option(None, None, dataset, int8_scope, batch_size=2)
    quantized = [("quantize", int8_scope)] if int8_scope else []
    assert calls == [("export", None), *quantized, ("generate", "generator"), ("generate", "generator")]
    assert result["reports"] == ["report"] * 3


__all__ = []
