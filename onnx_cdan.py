"""ONNX export of CDAN and report generation with ONNX Runtime, greedy or beam search over a key/value cache.

`export_onnx` writes a self-contained folder:

* `encoder.onnx`: `pixel_values` `(B, V, 3, H, W)` (dynamic `B`, fixed `V`, `H`, `W`) -> the encoder memory `u_s`
  (`memory`, `(B, S, C)`), the CheXpert `disease_logits` `(B, O)` (with reverse attention) and, for each decoder layer
  `i`, the cross-attention keys and values `cross_key.i` / `cross_value.i` `(B, heads, S, head_dim)`. The memory never
  changes while a report is written, so its keys and values are projected here, once per study, and not by a third
  graph or by the first decoding step.
* `decoder_step.onnx`: `input_ids` `(N, T)`, the self-attention cache `past_key.i` / `past_value.i`
  `(N, heads, P, head_dim)` and `cross_key.i` / `cross_value.i` of the `N / beams` studies -> `logits` `(N, T, vocab)`
  and `present_key.i` / `present_value.i` `(N, heads, P + T, head_dim)`. `N`, `T` and `P` are dynamic and `P` may be
  0, so one graph runs the first step (empty cache), every later step (`T = 1`) and a whole report without a cache
  (`P = 0`, `T` tokens). As in [`CdanForConditionalGeneration`], the beams of a study share one row of cross-attention
  keys and values (`N` must be a multiple of the number of studies).
* `diagnosis_prompt.onnx`, only with `use_diagnosis_prompt`: `diagnosis_states` `(B, O)` and `memory` -> the keys
  and values `prompt_key.i` / `prompt_value.i` `(B, heads, O, head_dim)` that the `O` diagnosis prompt vectors leave in
  each layer's self-attention cache. Repeated over the beams, they are the decoder step's initial cache (`P = O`), and
  the report positions start after them, as in `CdanDecoder.forward`. The prompt is the classifier's decision on
  `disease_logits` unless `diagnosis_states` are given, as with `generate()`.
* `config.json`, `generation_config.json`, the processor files (when a processor is given) and `onnx_cdan.json`
  (shapes, tensor names, exporter), so the folder needs no PyTorch checkpoint.

The graphs come from `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript) run on thin wrappers that
call the model's own modules: the decoder step rebuilds an `EncoderDecoderCache` from its inputs and runs
`CdanDecoder.forward`, so no layer is written twice. The export uses the eager attention kernel (transformers' SDPA
wrapper turns `is_causal` into a symbolic boolean under dynamic shapes, which torch.export rejects) and example sizes
other than 0 and 1 (which torch.export would fix as constants).

[`OnnxReportGenerator`] loads such a folder and writes reports with ONNX Runtime. Its search follows transformers'
`GenerationMixin._sample` (greedy) and `_beam_search` (5.x): the same beam scores, `beams_to_keep` candidates,
`length_penalty` on finished hypotheses, `early_stopping` (`True`, `False`, `"never"`) heuristics and output padding,
with the logits processors that CDAN checkpoints set (`min_length`, `min_new_tokens`, `no_repeat_ngram_size`,
`suppress_tokens`). Other generation options raise a `ValueError`.

Data-dependent input checks (NaN views, diagnosis state range) cannot be exported; `OnnxReportGenerator` makes them.

int8 quantisation of an exported folder (dynamic int8 linear layers, a static int8 extractor) is in
`onnx_quantization_cdan.py`.

References:
1) PyTorch, `torch.onnx.export(dynamo=True)` and `torch.export` dynamic shapes (`Dim.DYNAMIC`).
2) Hugging Face transformers: `generation/utils.py` (`_sample`, `_beam_search` and its helpers) and
   `generation/logits_process.py` (`MinLengthLogitsProcessor`, `NoRepeatNGramLogitsProcessor`,
   `SuppressTokensLogitsProcessor`), whose semantics `OnnxReportGenerator` reproduces.
3) ONNX Runtime `InferenceSession` and `SessionOptions` (thread counts).
"""

import copy
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

try:
    from .configuration_cdan import DIAGNOSIS_STATES, CdanConfig
    from .modeling_cdan import diagnosis_states_from_logits
except ImportError:
    from configuration_cdan import DIAGNOSIS_STATES, CdanConfig
    from modeling_cdan import diagnosis_states_from_logits


ENCODER_FILE = "encoder.onnx"
DECODER_STEP_FILE = "decoder_step.onnx"
DIAGNOSIS_PROMPT_FILE = "diagnosis_prompt.onnx"
METADATA_FILE = "onnx_cdan.json"
METADATA_FORMAT_VERSION = 1
DEFAULT_OPSET_VERSION = 18

SUPPORTED_GENERATION_OPTIONS = (
    "num_beams",
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "suppress_tokens",
    "num_return_sequences",
)
"""The `generate()` options [`OnnxReportGenerator`] implements, besides the special token ids."""

UNSUPPORTED_GENERATION_OPTIONS = (
    "do_sample",
    "num_beam_groups",
    "diversity_penalty",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "guidance_scale",
    "max_time",
    "stop_strings",
    "low_memory",
    "return_dict_in_generate",
)
"""Generation options that change the output and are not implemented: a value other than the default is an error."""

ONNX_INSTALL_HINT = 'pip install "cdan-report[onnx]"'

EXPORTED_MODULE_PREFIXES = {"encoder": "model.encoder", "decoder": "model.decoder", "lm_head": "lm_head"}
"""The model's module names (`model.named_modules()`) of the submodules that the exported wrappers hold as
`encoder`, `decoder` and `lm_head`."""


def import_onnx_dependency(module_name: str) -> Any:
    """Import `onnx`, `onnxruntime` or `onnxscript` on first use, with the install command when it is missing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"ONNX export and ONNX Runtime generation need the `{module_name}` package, which is not installed: "
            f"run `{ONNX_INSTALL_HINT}`."
        ) from error


def cross_names(layer_idx: int) -> tuple[str, str]:
    """Graph names of a decoder layer's cross-attention keys and values (encoder outputs, decoder-step inputs)."""
    return f"cross_key.{layer_idx}", f"cross_value.{layer_idx}"


def past_names(layer_idx: int) -> tuple[str, str]:
    """Graph names of a decoder layer's cached self-attention keys and values (decoder-step inputs)."""
    return f"past_key.{layer_idx}", f"past_value.{layer_idx}"


def present_names(layer_idx: int) -> tuple[str, str]:
    """Graph names of a decoder layer's extended self-attention keys and values (decoder-step outputs)."""
    return f"present_key.{layer_idx}", f"present_value.{layer_idx}"


def prompt_names(layer_idx: int) -> tuple[str, str]:
    """Graph names of the keys and values the diagnosis prompt leaves in a decoder layer (prompt-graph outputs)."""
    return f"prompt_key.{layer_idx}", f"prompt_value.{layer_idx}"


class CdanOnnxEncoder(nn.Module):
    """
    The exported encoder: the CDAN encoder on `pixel_values`, plus the cross-attention keys and values of every
    decoder layer over its memory.

    Args:
        model (`CdanForConditionalGeneration`): the model whose modules it calls.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.has_disease_logits = model.config.use_reverse_attention

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # `check_pixel_values` is data-dependent (it looks for NaN), so the runtime checks inputs and this graph
        # starts at the visual extractor
        visual_features = self.encoder.visual_extractor(pixel_values)  # (B, V*h*w, num_features)
        encoder_outputs = self.encoder(visual_features=visual_features, return_dict=True)
        memory = encoder_outputs.last_hidden_state  # (B, S, C)
        outputs = [memory]
        if self.has_disease_logits:
            outputs.append(encoder_outputs.disease_logits)  # (B, O)
        for layer in self.decoder.layers:
            attention = layer.encoder_attn
            for projection in (attention.k_proj, attention.v_proj):
                heads = projection(memory).unflatten(-1, (attention.num_heads, attention.head_dim))  # (B, S, H, D)
                outputs.append(heads.transpose(1, 2))  # (B, H, S, D)
        return tuple(outputs)


class CdanOnnxDecoderStep(nn.Module):
    """
    The exported decoding step: `CdanDecoder.forward` on an `EncoderDecoderCache` rebuilt from the cache inputs, then
    the language-model head.

    Args:
        model (`CdanForConditionalGeneration`): the model whose modules it calls.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        cross_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(N, T)`): the new report tokens of each hypothesis.
            past_key_values (`list` of `(key, value)`): per layer, `(N, H, P, D)` self-attention keys and values.
            cross_key_values (`list` of `(key, value)`): per layer, `(N / beams, H, S, D)` memory keys and values.
        """
        cache = EncoderDecoderCache(
            [(*past, *cross) for past, cross in zip(past_key_values, cross_key_values, strict=True)]
        )
        # with the cross-attention cache filled, the memory is never projected again: any tensor marks the
        # cross-attention as such, so the first layer's cached keys stand in for it
        decoder_outputs = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=cross_key_values[0][0],
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        logits = self.lm_head(decoder_outputs.last_hidden_state)  # (N, T, vocab_size)
        presents = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]  # (N, H, P + T, D)
        return logits, presents


class CdanOnnxDiagnosisPrompt(nn.Module):
    """
    The exported diagnosis prompt: the decoder reads the prompt vectors of `diagnosis_states` alone (no report token
    yet), which fills its self-attention cache with their keys and values, as at the first step of `generate()`.

    Args:
        model (`CdanForConditionalGeneration`): the model whose modules it calls.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.get_decoder()

    def forward(
        self, diagnosis_states: torch.LongTensor, memory: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(B, O)` state indices and `(B, S, C)` memory -> per layer, the prompt's `(B, H, O, D)` keys and values."""
        cache = EncoderDecoderCache(DynamicCache(config=self.decoder.config), DynamicCache(config=self.decoder.config))
        no_report_tokens = memory.new_zeros(memory.shape[0], 0, memory.shape[2])  # (B, 0, C)
        self.decoder(
            inputs_embeds=no_report_tokens,
            encoder_hidden_states=memory,
            cache=cache,
            use_cache=True,
            diagnosis_states=diagnosis_states,
        )
        return [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]


class UncheckedDiagnosisPrompt(nn.Module):
    """
    `CdanDiagnosisPrompt` without its input checks, which depend on the values of the states and so cannot be
    exported; [`OnnxReportGenerator`] checks the states before the graph reads them.

    Args:
        prompt (`CdanDiagnosisPrompt`): the module whose embeddings it reads.
    """

    def __init__(self, prompt: nn.Module):
        super().__init__()
        self.prompt = prompt

    def forward(self, diagnosis_states: torch.LongTensor) -> torch.Tensor:
        observation_offsets = torch.arange(diagnosis_states.shape[1], device=diagnosis_states.device)
        return self.prompt.state_embeddings(diagnosis_states + observation_offsets * self.prompt.num_states)


def exportable_copy(model: nn.Module) -> nn.Module:
    """
    A copy of `model` for torch.export: eval mode, the eager attention kernel, plain `F.linear` layers and an
    unchecked diagnosis prompt.
    """
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    model.set_attn_implementation("eager")
    for module in model.modules():
        if hasattr(module, "prepack_on_cpu"):  # `CdanLinear`: the oneDNN path is not exportable
            module.prepack_on_cpu = False
    decoder = model.get_decoder()
    if decoder.diagnosis_prompt is not None:
        decoder.diagnosis_prompt = UncheckedDiagnosisPrompt(decoder.diagnosis_prompt)
    return model


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple,
    opset_version: int,
) -> None:
    """One `torch.onnx.export(dynamo=True)` call, weights inside the `.onnx` file."""
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset_version,
            external_data=False,
            verbose=False,
        )
    program.save(os.fspath(path))


def export_onnx(
    model: nn.Module,
    output_dir: str | os.PathLike,
    processor: Any | None = None,
    image_size: int | None = None,
    opset_version: int = DEFAULT_OPSET_VERSION,
) -> Path:
    """
    Export a CDAN model to ONNX: the encoder graph, the decoder-step graph and, with `use_diagnosis_prompt`, the
    diagnosis-prompt graph, with everything [`OnnxReportGenerator`] needs next to them (see the module docstring).

    Args:
        model (`CdanForConditionalGeneration`):
            The model to export; it is not modified (a copy is exported).
        output_dir (`str` or `os.PathLike`):
            The folder to write; created if missing. Existing ONNX files in it are replaced.
        processor (`CdanProcessor`, *optional*):
            Saved into the folder; its `image_processor.image_size` is the exported image size.
        image_size (`int`, *optional*):
            Height and width of the exported views; the processor's, or 224 without a processor.
        opset_version (`int`, *optional*, defaults to 18):
            ONNX opset of the graphs.

    Returns:
        `Path`: the output folder.

    Raises:
        ValueError: the model reads a prior study or clinical context, or `image_size` disagrees with the processor.
        ImportError: `onnx` or `onnxscript` is not installed.
    """
    import_onnx_dependency("onnx")
    import_onnx_dependency("onnxscript")
    config = model.config
    unsupported = [name for name in ("use_prior_study", "use_clinical_context") if getattr(config, name, False)]
    if unsupported:
        raise ValueError(
            f"ONNX export supports models that read the current study's views only; this one sets {unsupported} "
            "(PriorRG's prior study / clinical context inputs). Use the PyTorch model for it."
        )
    processor_size = getattr(getattr(processor, "image_processor", None), "image_size", None)
    if image_size is not None and processor_size is not None and image_size != processor_size:
        raise ValueError(f"`image_size`={image_size} disagrees with the processor's image size {processor_size}.")
    image_size = image_size or processor_size or 224
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    exportable = exportable_copy(model)
    cross_attention = exportable.get_decoder().layers[0].encoder_attn
    num_layers, num_heads, head_dim = config.decoder_layers, cross_attention.num_heads, cross_attention.head_dim

    encoder = CdanOnnxEncoder(exportable).eval()
    pixel_values = torch.randn(2, config.num_views, 3, image_size, image_size)  # (B, V, 3, H, W)
    with torch.no_grad():
        encoder_example = encoder(pixel_values)
    encoder_outputs = ["memory"] + (["disease_logits"] if encoder.has_disease_logits else [])
    cross_tensor_names = [name for i in range(num_layers) for name in cross_names(i)]
    export_graph(
        encoder,
        (pixel_values,),
        output_dir / ENCODER_FILE,
        input_names=["pixel_values"],
        output_names=encoder_outputs + cross_tensor_names,
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        opset_version=opset_version,
    )

    # example sizes, all dynamic in the graph; none is 0 or 1, which torch.export would specialise to constants,
    # and the cache holds more than a diagnosis prompt (a report is being written)
    prompt_length = config.num_observations if config.use_diagnosis_prompt else 0
    num_beams, num_tokens, past_length = 3, 2, prompt_length + 2
    num_hypotheses = pixel_values.shape[0] * num_beams
    input_ids = torch.full((num_hypotheses, num_tokens), config.decoder_start_token_id, dtype=torch.long)  # (N, T)
    past_key_values = [
        tuple(torch.randn(num_hypotheses, num_heads, past_length, head_dim) for _ in range(2))
        for _ in range(num_layers)
    ]  # (N, H, P, D)
    cross_tensors = encoder_example[len(encoder_outputs) :]
    cross_key_values = [(cross_tensors[2 * i], cross_tensors[2 * i + 1]) for i in range(num_layers)]
    hypotheses, tokens, past = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    studies = torch.export.Dim.DYNAMIC
    export_graph(
        CdanOnnxDecoderStep(exportable).eval(),
        (input_ids, past_key_values, cross_key_values),
        output_dir / DECODER_STEP_FILE,
        input_names=["input_ids"] + [name for i in range(num_layers) for name in past_names(i)] + cross_tensor_names,
        output_names=["logits"] + [name for i in range(num_layers) for name in present_names(i)],
        dynamic_shapes=(
            {0: hypotheses, 1: tokens},
            [({0: hypotheses, 2: past}, {0: hypotheses, 2: past}) for _ in range(num_layers)],
            [({0: studies}, {0: studies}) for _ in range(num_layers)],
        ),
        opset_version=opset_version,
    )

    if prompt_length:
        diagnosis_states = exportable.diagnosis_decisions(encoder_example[1])  # (B, O)
        export_graph(
            CdanOnnxDiagnosisPrompt(exportable).eval(),
            (diagnosis_states, encoder_example[0]),
            output_dir / DIAGNOSIS_PROMPT_FILE,
            input_names=["diagnosis_states", "memory"],
            output_names=[name for i in range(num_layers) for name in prompt_names(i)],
            dynamic_shapes=({0: studies}, {0: studies}),
            opset_version=opset_version,
        )
    elif (output_dir / DIAGNOSIS_PROMPT_FILE).exists():  # left by an earlier export into this folder
        (output_dir / DIAGNOSIS_PROMPT_FILE).unlink()

    config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    metadata = {
        "format_version": METADATA_FORMAT_VERSION,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset_version": opset_version,
        "num_views": config.num_views,
        "image_size": image_size,
        "memory_length": encoder_example[0].shape[1],
        "num_decoder_layers": num_layers,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "encoder_outputs": encoder_outputs + cross_tensor_names,
        "has_disease_logits": encoder.has_disease_logits,
        "diagnosis_prompt_length": prompt_length,
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return output_dir


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in the input's dtype."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k_descending(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest scores of each row, best first (ties: the lower index first), `(B, k)`."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def banned_ngram_tokens(sequences: np.ndarray, ngram_size: int) -> list[list[int]]:
    """
    For each sequence `(N, L)`, the tokens that would repeat one of its `ngram_size`-grams, as
    `NoRepeatNGramLogitsProcessor` bans them (none before the sequence has `ngram_size - 1` tokens).
    """
    length = sequences.shape[1]
    if length + 1 < ngram_size:
        return [[] for _ in range(sequences.shape[0])]
    banned = []
    for sequence in sequences.tolist():
        prefix = tuple(sequence[length + 1 - ngram_size :])
        banned.append(
            [
                sequence[start + ngram_size - 1]
                for start in range(length - ngram_size + 1)
                if tuple(sequence[start : start + ngram_size - 1]) == prefix
            ]
        )
    return banned


class OnnxReportGenerator:
    """
    Writes CDAN reports with ONNX Runtime from a folder written by [`export_onnx`].

    Example:

    ```python
    >>> from onnx_cdan import OnnxReportGenerator
    >>> from processing_cdan import CdanProcessor
    >>> generator = OnnxReportGenerator("outputs/demo-onnx", num_threads=2)
    >>> processor = CdanProcessor.from_pretrained("outputs/demo-onnx")
    >>> inputs = processor(images=[["frontal.png", "lateral.png"]])
    >>> reports = processor.batch_decode(generator.generate(inputs["pixel_values"], num_beams=3))
    ```

    Args:
        folder (`str` or `os.PathLike`):
            The exported folder.
        num_threads (`int`, *optional*):
            Intra-op threads of each ONNX Runtime session; ONNX Runtime's default (all cores) when `None`.
        providers (`tuple[str, ...]`, *optional*, defaults to `("CPUExecutionProvider",)`):
            ONNX Runtime execution providers, in order of preference.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ImportError: `onnxruntime` is not installed.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        num_threads: int | None = None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"ONNX folder not found: {self.folder}. Write one with `export_onnx(model, folder)` or "
                "`python scripts/export_onnx.py --model <checkpoint> --output_dir <folder>`."
            )
        required = (METADATA_FILE, ENCODER_FILE, DECODER_STEP_FILE, "config.json", "generation_config.json")
        missing = [name for name in required if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.folder} is not a complete CDAN ONNX export: {', '.join(missing)} missing. Export it again "
                "with `export_onnx` or scripts/export_onnx.py."
            )
        self.metadata = json.loads((self.folder / METADATA_FILE).read_text())
        if self.metadata.get("format_version") != METADATA_FORMAT_VERSION:
            raise ValueError(
                f"{self.folder / METADATA_FILE} has format version {self.metadata.get('format_version')!r}; this "
                f"code reads version {METADATA_FORMAT_VERSION}. Export the model again."
            )
        self.config = CdanConfig.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder)
        onnxruntime = import_onnx_dependency("onnxruntime")
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.encoder_session = onnxruntime.InferenceSession(
            os.fspath(self.folder / ENCODER_FILE), sess_options=options, providers=list(providers)
        )
        self.decoder_session = onnxruntime.InferenceSession(
            os.fspath(self.folder / DECODER_STEP_FILE), sess_options=options, providers=list(providers)
        )
        self.num_layers = self.metadata["num_decoder_layers"]
        self.prompt_session = None
        if self.metadata["diagnosis_prompt_length"]:
            if not (self.folder / DIAGNOSIS_PROMPT_FILE).is_file():
                raise FileNotFoundError(
                    f"{self.folder} exports a model with a diagnosis prompt but {DIAGNOSIS_PROMPT_FILE} is missing. "
                    "Export it again with `export_onnx` or scripts/export_onnx.py."
                )
            self.prompt_session = onnxruntime.InferenceSession(
                os.fspath(self.folder / DIAGNOSIS_PROMPT_FILE), sess_options=options, providers=list(providers)
            )

    def check_pixel_values(self, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
        """The views as a float32 `(B, V, 3, H, W)` array, or a `ValueError` naming what is wrong with them."""
        pixel_values = np.asarray(pixel_values.detach().cpu() if torch.is_tensor(pixel_values) else pixel_values)
        num_views, image_size = self.metadata["num_views"], self.metadata["image_size"]
        if pixel_values.ndim == 4 and num_views == 1:
            pixel_values = pixel_values[:, None]
        expected = f"(batch, {num_views}, 3, {image_size}, {image_size})"
        if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            raise ValueError(
                f"`pixel_values` must have shape {expected}; got {pixel_values.shape}. Use CdanImageProcessor."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("`pixel_values` is an empty batch.")
        if pixel_values.shape[1] != num_views:
            raise ValueError(
                f"This model reads {num_views} view(s) per study but `pixel_values` has {pixel_values.shape[1]} "
                f"(shape {pixel_values.shape})."
            )
        if pixel_values.shape[3:] != (image_size, image_size):
            raise ValueError(
                f"The ONNX encoder was exported for {image_size} x {image_size} views; got "
                f"{pixel_values.shape[3]} x {pixel_values.shape[4]}. Process the images with the exported processor."
            )
        if not np.isfinite(pixel_values).all():
            raise ValueError("`pixel_values` hold NaN or infinite values; check how these inputs were made.")
        return pixel_values.astype(np.float32, copy=False)

    def encode(self, pixel_values: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """
        Run the encoder graph: `memory` `(B, S, C)`, `disease_logits` `(B, O)` (with reverse attention) and the
        cross-attention keys and values `cross_key.i` / `cross_value.i` `(B, H, S, D)`.
        """
        pixel_values = self.check_pixel_values(pixel_values)
        outputs = self.encoder_session.run(None, {"pixel_values": pixel_values})
        return dict(zip(self.metadata["encoder_outputs"], outputs, strict=True))

    def decoder_step(
        self, input_ids: np.ndarray, past: list[np.ndarray], cross: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """
        One decoder-step call: `input_ids` `(N, T)`, the flat `[key.0, value.0, key.1, ...]` self-attention cache
        `(N, H, P, D)` and the cross-attention keys and values by name. Returns `(logits (N, T, V), new cache)`.
        """
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False), **cross}
        for layer_idx in range(self.num_layers):
            key_name, value_name = past_names(layer_idx)
            feeds[key_name], feeds[value_name] = past[2 * layer_idx], past[2 * layer_idx + 1]
        logits, *presents = self.decoder_session.run(None, feeds)
        return logits, presents

    def empty_past(self, num_hypotheses: int) -> list[np.ndarray]:
        """A zero-length self-attention cache, `(N, H, 0, D)` per key and value of each layer."""
        shape = (num_hypotheses, self.metadata["num_heads"], 0, self.metadata["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.num_layers)]

    def check_diagnosis_states(self, diagnosis_states: Any, num_studies: int) -> np.ndarray:
        """Given diagnosis states as an int64 `(num_studies, O)` array of indices into `DIAGNOSIS_STATES`."""
        diagnosis_states = np.asarray(
            diagnosis_states.detach().cpu() if torch.is_tensor(diagnosis_states) else diagnosis_states
        )
        expected = (num_studies, self.config.num_observations)
        if diagnosis_states.shape != expected or not np.issubdtype(diagnosis_states.dtype, np.integer):
            raise ValueError(
                f"`diagnosis_states` must be integers of shape {expected} (one row per study); got "
                f"{diagnosis_states.dtype} of shape {diagnosis_states.shape}."
            )
        if diagnosis_states.min() < 0 or diagnosis_states.max() >= len(DIAGNOSIS_STATES):
            raise ValueError(
                f"`diagnosis_states` must hold indices 0 to {len(DIAGNOSIS_STATES) - 1} of {DIAGNOSIS_STATES}."
            )
        return diagnosis_states.astype(np.int64)

    def initial_past(
        self, encoded: dict[str, np.ndarray], hypotheses_per_study: int, diagnosis_states: Any | None = None
    ) -> list[np.ndarray]:
        """
        The self-attention cache of the first step: empty, or with a diagnosis prompt the keys and values of the
        prompt, `(N, H, O, D)`, from `diagnosis_states` or else from the classifier's decisions, as `generate()` does.
        """
        num_studies = encoded["memory"].shape[0]
        if self.prompt_session is None:
            if diagnosis_states is not None:
                raise ValueError(
                    "This model has no diagnosis prompt (`use_diagnosis_prompt=False`); drop diagnosis_states."
                )
            return self.empty_past(num_studies * hypotheses_per_study)
        if diagnosis_states is None:
            disease_logits = torch.from_numpy(encoded["disease_logits"])
            diagnosis_states = diagnosis_states_from_logits(
                disease_logits, self.config.observation_thresholds, self.config.diagnosis_uncertainty_margin
            ).numpy()
        diagnosis_states = self.check_diagnosis_states(diagnosis_states, num_studies)
        prompt = self.prompt_session.run(None, {"diagnosis_states": diagnosis_states, "memory": encoded["memory"]})
        return [np.repeat(cache, hypotheses_per_study, axis=0) for cache in prompt]  # (N, H, O, D)

    def generation_settings(self, **kwargs) -> GenerationConfig:
        """The folder's generation config updated with `kwargs`; a `ValueError` for what is not implemented."""
        # the priorities of `GenerationMixin._prepare_generation_config`: kwargs, then the folder's file, then the
        # global defaults
        generation_config = GenerationConfig()
        defaults = generation_config._get_default_generation_params()
        generation_config.update(**self.generation_config.to_dict(), defaults_only=True)
        generation_config.update(**defaults, defaults_only=True)
        unknown = generation_config.update(**kwargs)
        if unknown:
            raise ValueError(f"Unknown generation options: {sorted(unknown)}.")
        unsupported = [
            name
            for name in UNSUPPORTED_GENERATION_OPTIONS
            if getattr(generation_config, name, None) not in (None, defaults.get(name))
        ]
        if unsupported:
            raise ValueError(
                f"OnnxReportGenerator does not implement {unsupported}; it supports greedy and beam search with "
                f"{', '.join(SUPPORTED_GENERATION_OPTIONS)}. Use the PyTorch model's `generate()` for the others."
            )
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(generation_config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if generation_config.num_return_sequences > generation_config.num_beams:
            raise ValueError(
                f"`num_return_sequences` ({generation_config.num_return_sequences}) must be at most `num_beams` "
                f"({generation_config.num_beams})."
            )
        if generation_config.max_new_tokens is not None:
            generation_config.max_length = generation_config.max_new_tokens + 1
        if generation_config.min_new_tokens is not None:
            generation_config.min_length = max(generation_config.min_length or 0, generation_config.min_new_tokens + 1)
        longest = self.metadata["max_position_embeddings"] + 1
        if not 1 < generation_config.max_length <= longest:
            raise ValueError(
                f"`max_length` must be between 2 and {longest} (`max_position_embeddings` + 1, the decoder start "
                f"token included); got {generation_config.max_length}."
            )
        return generation_config

    def process_scores(self, sequences: np.ndarray, scores: np.ndarray, generation_config: GenerationConfig) -> None:
        """Apply `min_length`, `no_repeat_ngram_size` and `suppress_tokens` to `scores` `(N, V)` in place."""
        eos_token_ids = self.eos_token_ids(generation_config)
        if generation_config.min_length and eos_token_ids and sequences.shape[1] < generation_config.min_length:
            scores[:, eos_token_ids] = -np.inf
        if generation_config.no_repeat_ngram_size:
            for row, banned in enumerate(banned_ngram_tokens(sequences, generation_config.no_repeat_ngram_size)):
                scores[row, banned] = -np.inf
        if generation_config.suppress_tokens:
            scores[:, list(generation_config.suppress_tokens)] = -np.inf

    @staticmethod
    def eos_token_ids(generation_config: GenerationConfig) -> list[int]:
        eos_token_id = generation_config.eos_token_id
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    def generate(
        self, pixel_values: torch.Tensor | np.ndarray, diagnosis_states: Any | None = None, **generation_kwargs
    ) -> torch.LongTensor:
        """
        Write reports: greedy search for `num_beams=1`, beam search otherwise, with the cached decoder step.

        Args:
            pixel_values (`torch.Tensor` or `np.ndarray` of shape `(batch_size, num_views, 3, height, width)`):
                Processed views of each study (see [`CdanImageProcessor`]).
            diagnosis_states (`torch.LongTensor` of shape `(batch_size, num_observations)`, *optional*):
                Only with `use_diagnosis_prompt`: the prompt to condition the reports on (indices into
                `DIAGNOSIS_STATES`), instead of the classifier's decisions.
            generation_kwargs:
                Overrides of the folder's `generation_config.json`: `num_beams`, `max_length`, `max_new_tokens`,
                `min_length`, `min_new_tokens`, `length_penalty`, `early_stopping`, `no_repeat_ngram_size`,
                `suppress_tokens`, `num_return_sequences`, and the special token ids.

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`: the decoder start token and
            the report, as `CdanForConditionalGeneration.generate()` returns them.
        """
        generation_config = self.generation_settings(**generation_kwargs)
        encoded = self.encode(pixel_values)
        cross = {name: encoded[name] for name in self.metadata["encoder_outputs"] if name.startswith("cross_")}
        batch_size = encoded["memory"].shape[0]
        past = self.initial_past(encoded, generation_config.num_beams, diagnosis_states)
        if generation_config.num_beams == 1:
            sequences = self.greedy_search(batch_size, cross, past, generation_config)
        else:
            sequences = self.beam_search(batch_size, cross, past, generation_config)
        return torch.from_numpy(sequences)

    def start_tokens(self, num_hypotheses: int, generation_config: GenerationConfig) -> np.ndarray:
        start = generation_config.decoder_start_token_id
        start = self.config.decoder_start_token_id if start is None else start
        return np.full((num_hypotheses, 1), start, dtype=np.int64)  # (N, 1)

    def greedy_search(
        self,
        batch_size: int,
        cross: dict[str, np.ndarray],
        past: list[np.ndarray],
        generation_config: GenerationConfig,
    ) -> np.ndarray:
        """`GenerationMixin._sample` without sampling: the best token of each report until `<eos>` or `max_length`."""
        eos_token_ids = self.eos_token_ids(generation_config)
        pad_token_id = generation_config.pad_token_id
        pad_token_id = eos_token_ids[0] if pad_token_id is None and eos_token_ids else pad_token_id
        sequences = self.start_tokens(batch_size, generation_config)  # (B, 1)
        unfinished = np.ones(batch_size, dtype=bool)
        while sequences.shape[1] < generation_config.max_length and unfinished.any():
            logits, past = self.decoder_step(sequences[:, -1:], past, cross)
            scores = logits[:, -1].astype(np.float32)  # (B, V)
            self.process_scores(sequences, scores, generation_config)
            next_tokens = scores.argmax(axis=-1)  # (B,)
            if eos_token_ids:
                next_tokens = np.where(unfinished, next_tokens, pad_token_id)
                unfinished &= ~np.isin(next_tokens, eos_token_ids)
            sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
        return sequences

    def beam_search(
        self,
        batch_size: int,
        cross: dict[str, np.ndarray],
        past: list[np.ndarray],
        generation_config: GenerationConfig,
    ) -> np.ndarray:
        """
        `GenerationMixin._beam_search` on the ONNX decoder step: per study, the `num_beams` best running
        hypotheses by summed log-probability, and the `num_beams` best finished ones by that sum divided by
        `generated_length ** length_penalty`; the self-attention cache follows the beams it was selected from.
        """
        num_beams, max_length = generation_config.num_beams, generation_config.max_length
        length_penalty, early_stopping = generation_config.length_penalty, generation_config.early_stopping
        eos_token_ids = self.eos_token_ids(generation_config)
        pad_token_id = generation_config.pad_token_id
        fill_value = (pad_token_id or eos_token_ids[0]) if eos_token_ids else -1  # as transformers pads outputs
        beams_to_keep = max(2, 1 + len(eos_token_ids)) * num_beams
        prompt_length = cur_len = 1

        running_sequences = np.full((batch_size, num_beams, max_length), fill_value, dtype=np.int64)
        running_sequences[:, :, :1] = self.start_tokens(batch_size * num_beams, generation_config).reshape(
            batch_size, num_beams, 1
        )
        sequences = running_sequences.copy()  # (B, beams, max_length): the finished hypotheses
        sequence_lengths = np.full((batch_size, num_beams), prompt_length)  # tokens of each finished hypothesis
        running_beam_scores = np.zeros((batch_size, num_beams), dtype=np.float32)
        running_beam_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
        beam_scores = np.full((batch_size, num_beams), -1e9, dtype=np.float32)
        is_sent_finished = np.zeros((batch_size, num_beams), dtype=bool)
        improvement_possible = np.ones((batch_size, 1), dtype=bool)
        top_num_beam_mask = np.arange(beams_to_keep) < num_beams
        batch_offsets = np.arange(batch_size)[:, None] * num_beams  # (B, 1)

        while True:
            flat_sequences = running_sequences[:, :, :cur_len].reshape(batch_size * num_beams, cur_len)
            logits, past = self.decoder_step(flat_sequences[:, -1:], past, cross)
            log_probs = log_softmax(logits[:, -1].astype(np.float32))  # (N, V)
            self.process_scores(flat_sequences, log_probs, generation_config)
            vocab_size = log_probs.shape[-1]
            accumulated = log_probs.reshape(batch_size, num_beams, vocab_size) + running_beam_scores[:, :, None]
            accumulated = accumulated.reshape(batch_size, num_beams * vocab_size)

            # the top `beams_to_keep` continuations over all beams of a study
            topk_indices = top_k_descending(accumulated, beams_to_keep)  # (B, K)
            topk_log_probs = np.take_along_axis(accumulated, topk_indices, axis=1)
            topk_source_beams, topk_tokens = np.divmod(topk_indices, vocab_size)
            topk_sequences = np.take_along_axis(running_sequences, topk_source_beams[:, :, None], axis=1)
            topk_sequences[:, :, cur_len] = topk_tokens
            hits_stopping = np.isin(topk_tokens, eos_token_ids) | (cur_len + 1 >= max_length)  # (B, K)

            # the best unfinished continuations run on
            topk_running_log_probs = topk_log_probs + hits_stopping.astype(np.float32) * np.float32(-1e9)
            next_indices = top_k_descending(topk_running_log_probs, num_beams)  # (B, beams)
            running_sequences = np.take_along_axis(topk_sequences, next_indices[:, :, None], axis=1)
            running_beam_scores = np.take_along_axis(topk_running_log_probs, next_indices, axis=1)
            source_rows = np.take_along_axis(topk_source_beams, next_indices, axis=1) + batch_offsets  # (B, beams)

            # finished continuations among the top `num_beams` compete with the finished hypotheses
            just_finished = hits_stopping & top_num_beam_mask[None, :]
            finished_scores = topk_log_probs / np.float32((cur_len + 1 - prompt_length) ** length_penalty)
            beams_are_full = is_sent_finished.all(axis=-1, keepdims=True) & (early_stopping is True)
            finished_scores = finished_scores + beams_are_full.astype(np.float32) * np.float32(-1e9)
            finished_scores = finished_scores + (~improvement_possible).astype(np.float32) * np.float32(-1e9)
            finished_scores = finished_scores + (~just_finished).astype(np.float32) * np.float32(-1e9)
            merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)  # (B, beams + K)
            best_merged = top_k_descending(merged_scores, num_beams)
            merged_sequences = np.concatenate([sequences, topk_sequences], axis=1)
            merged_lengths = np.concatenate(
                [sequence_lengths, np.full(topk_tokens.shape, cur_len + 1)], axis=1
            )  # a finished continuation holds `cur_len + 1` tokens
            sequences = np.take_along_axis(merged_sequences, best_merged[:, :, None], axis=1)
            beam_scores = np.take_along_axis(merged_scores, best_merged, axis=1)
            sequence_lengths = np.take_along_axis(merged_lengths, best_merged, axis=1)
            is_sent_finished = np.take_along_axis(
                np.concatenate([is_sent_finished, just_finished], axis=1), best_merged, axis=1
            )

            past = [cache[source_rows.reshape(-1)] for cache in past]  # each hypothesis keeps its source's cache
            cur_len += 1
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - prompt_length
            else:
                best_length = cur_len - prompt_length
            best_running_score = running_beam_scores[:, :1] / np.float32(best_length**length_penalty)
            worst_finished_score = np.where(is_sent_finished, beam_scores.min(axis=1, keepdims=True), -1e9)
            improvement_possible = improvement_possible & (best_running_score > worst_finished_score).any(
                axis=-1, keepdims=True
            )
            all_finished = is_sent_finished.all() and early_stopping is True
            if not improvement_possible.any() or all_finished or hits_stopping.all():
                break

        num_return_sequences = generation_config.num_return_sequences
        sequences = sequences[:, :num_return_sequences].reshape(batch_size * num_return_sequences, max_length)
        output_length = sequence_lengths[:, :num_return_sequences].max()
        return sequences[:, :output_length]


def benchmark_onnx_generation(
    folder: str | os.PathLike,
    batch_size: int = 8,
    num_beams: int = 3,
    length: int = 60,
    threads: int = 2,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """
    Time ONNX Runtime report generation forced to exactly `length` tokens (start token included:
    `min_length = max_length = length`, so `<eos>` is never chosen), on random views of the exported size.

    Args:
        folder (`str` or `os.PathLike`): an [`export_onnx`] folder.
        batch_size (`int`): studies per `generate()` call.
        num_beams (`int`): beam size (1 for greedy search).
        length (`int`): report length in tokens, start token included.
        threads (`int`): ONNX Runtime intra-op threads.
        repeats (`int`): timed calls after one warm-up call; the fastest counts.
        seed (`int`): seed of the random views.

    Returns:
        `dict`: `reports_per_second` (fastest call), `seconds_per_call` (fastest), `median_seconds_per_call`,
        `warmup_seconds`, `encoder_seconds` (one encoder call, fastest) and the settings.
    """
    generator = OnnxReportGenerator(folder, num_threads=threads)
    metadata = generator.metadata
    shape = (batch_size, metadata["num_views"], 3, metadata["image_size"], metadata["image_size"])
    pixel_values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    settings = {"num_beams": num_beams, "max_length": length, "min_length": length, "num_return_sequences": 1}

    start = time.perf_counter()
    sequences = generator.generate(pixel_values, **settings)
    warmup_seconds = time.perf_counter() - start
    eos_token_ids = generator.eos_token_ids(generator.generation_config)
    if tuple(sequences.shape) != (batch_size, length) or np.isin(sequences[:, 1:].numpy(), eos_token_ids).any():
        raise RuntimeError(f"Expected {batch_size} reports of {length} tokens without <eos>, got {sequences.shape}.")
    call_seconds, encoder_seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generator.encode(pixel_values)
        encoder_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        generator.generate(pixel_values, **settings)
        call_seconds.append(time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "num_beams": num_beams,
        "length": length,
        "threads": threads,
        "reports_per_second": batch_size / min(call_seconds),
        "seconds_per_call": min(call_seconds),
        "median_seconds_per_call": float(np.median(call_seconds)),
        "warmup_seconds": warmup_seconds,
        "encoder_seconds": min(encoder_seconds),
    }


__all__ = [
    "CdanOnnxDecoderStep",
    "CdanOnnxDiagnosisPrompt",
    "CdanOnnxEncoder",
    "OnnxReportGenerator",
    "benchmark_onnx_generation",
    "export_onnx",
]
