"""Faster CPU inference for CDAN: bfloat16 autocast, dynamic int8 linear layers and a compiled visual extractor.

[`optimize_for_inference`] turns a trained [`CdanForConditionalGeneration`] into one that generates faster, with
three independent knobs (see [`InferenceOptions`]):

- `precision="bf16"`: the model's forward passes (the encoder's and every decoding step's) run under
  `torch.autocast(dtype=torch.bfloat16)`, the weights staying float32, the logits returned as float32 so that beam
  search ranks hypotheses in float32. On a CPU this only pays with native bfloat16 arithmetic (the AVX512-BF16 or AMX
  instructions, read from `/proc/cpuinfo`); without it bfloat16 is emulated and slower than float32, so the option is
  refused with a `ValueError` (not silently replaced by float32: a caller who asks for bfloat16 learns at once that
  this machine cannot give it). The same check ([`check_bf16_supported`]) serves any CPU bfloat16 decision.
- `precision="int8"`: dynamic int8 quantisation of some linear layers (`int8_scope`, one of [`INT8_SCOPES`]): weights
  stored as int8 (per output channel), activations quantised per call. It uses
  `torch.ao.quantization.quantize_dynamic`, which torch 2.14 marks as deprecated in favour of `torchao`'s `quantize_`
  API; `torchao` is not a dependency of this library, and the eager `torch.ao` kernels (FBGEMM / oneDNN) are what runs
  fast on a CPU without compiling, so they are used here and the deprecation warning is silenced for that one call.
  `quantize_dynamic` swaps modules by exact type, so [`CdanLinear`] layers are first replaced by plain `nn.Linear`
  layers holding the same parameters. The visual extractor (convolutions), the visual projection (run once per study;
  the encoder reads its float weight's dtype) and the language-model head (its logits rank the beams directly) stay
  float32 in every scope.

  Which layers to quantise is a trade-off between speed and agreement with float32. Beam search is sensitive to the
  decoder: on the demo checkpoint (`outputs/demo`, 200 test studies, beam 3), int8 *weights* alone (per channel,
  float activations, simulated) in every decoder layer already changed 6.5 % of the reports, and the dynamic kernels,
  which also round each activation tensor to 7 bits per call, changed 19 %. The default scope,
  `"encoder-and-cross-attention"`, quantises the encoder's transformer layers (run once per study, on every patch)
  and the decoder's cross-attention (query and output projections at each step, keys and values once per study), and
  leaves the decoder's self-attention and feed-forward layers, which move the beams most, in float32. Agreement from
  `scripts/check_inference_agreement.py --options fp32 int8 int8-all --int8_scopes encoder cross-attention
  decoder-feed-forward decoder` on the demo test split; speed as float32's CPU time over the scope's for `generate()`
  from cached extractor features (batch 8, beam 3, 60 tokens, one thread, back to back on a shared machine, +-0.05
  between runs), so without the visual extractor, about 60 % of a full-size model's time per report:

  | `int8_scope` | identical reports | CE macro-F1 delta | speed, full-size (`CdanConfig()`) | speed, demo |
  |---|---:|---:|---:|---:|
  | `encoder-and-cross-attention` (default) | 98.0 % | +0.0000 | 1.13x | 1.00x |
  | `encoder` | 95.5 % | +0.0007 | 1.10x | 1.03x |
  | `cross-attention` | 97.0 % | +0.0000 | 1.01x | 1.01x |
  | `decoder-feed-forward` | 90.5 % | +0.0000 | 1.08x | 1.00x |
  | `decoder` | 81.0 % | +0.0000 | 1.29x | 1.13x |
  | `all` (every linear layer outside the float modules) | 83.5 % | +0.0007 | 1.49x | 1.17x |

  Only the scopes that quantise the decoder's self-attention or feed-forward layers (which run at every step) gain
  much, and they miss the issue's target (>= 95 % identical reports). The default meets it and gains little: on the
  narrow demo model (width 128) nothing measurable, on the full-size one about 1.1x on the generation, a few percent
  of a whole report's time. `int8_scope="all"` (the `int8-all` option) is the fastest.

- `compile=True`: the visual extractor's CNN is compiled with `torch.compile` (Inductor, with weight freezing, which
  folds batch norms into the convolutions and prepacks their weights for oneDNN). The first call of each new input
  shape compiles (about a minute for ResNet-101 on a shared two-core machine). The decoder is not compiled (and this
  was not measured): its cache grows by one token per step, so each step has new shapes, which would recompile or
  need dynamic shapes or a static cache.

The returned model generates with the stock `generate()` and is meant for inference only (an int8 model cannot be
trained or saved as a float checkpoint).

References: PyTorch's automatic mixed precision (`torch.autocast`), eager-mode dynamic quantisation
(`torch.ao.quantization.quantize_dynamic`), `torch.compile` and Inductor's freezing pass; Accelerate's
`prepare_model`, which wraps a model's `forward` in autocast the same way.
"""

import copy
import fnmatch
import functools
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
"""The arithmetic choices of [`InferenceOptions.precision`]."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""`/proc/cpuinfo` flags of native bfloat16 arithmetic on x86 (AVX512-BF16, AMX); either makes CPU bfloat16 pay."""

CPUINFO_PATH = Path("/proc/cpuinfo")

INT8_KEPT_FLOAT_MODULES = ("model.encoder.visual_extractor", "model.encoder.visual_projection", "lm_head")
"""Modules (and their children) that `precision="int8"` leaves in float32 whatever its scope."""

INT8_SCOPES = {
    "encoder-and-cross-attention": ("model.encoder.layers.*", "model.decoder.layers.*.encoder_attn.*"),
    "encoder": ("model.encoder.*",),
    "cross-attention": ("model.decoder.layers.*.encoder_attn.*",),
    "decoder-feed-forward": ("model.decoder.layers.*.feed_forward.*",),
    "decoder": ("model.decoder.*",),
    "all": ("*",),
}
"""The linear layers that `precision="int8"` quantises, per `int8_scope`: `fnmatch` patterns of their module names
(`*` also matches dots), always outside `INT8_KEPT_FLOAT_MODULES`. The module docstring measures each scope."""

DEFAULT_INT8_SCOPE = "encoder-and-cross-attention"
"""The `int8_scope` of `precision="int8"`: of the scopes that kept >= 95 % of the demo checkpoint's reports identical,
the fastest on the full-size model (see the module docstring)."""


@dataclass(frozen=True)
class InferenceOptions:
    """
    How [`optimize_for_inference`] prepared a model; stored on the model as `model.inference_options`.

    Args:
        precision (`str`, *optional*, defaults to `"fp32"`):
            `"fp32"`, `"bf16"` (bfloat16 autocast) or `"int8"` (dynamic int8 linear layers).
        compile (`bool`, *optional*, defaults to `False`):
            Compile the visual extractor's CNN with `torch.compile`.
        int8_scope (`str`, *optional*, defaults to `DEFAULT_INT8_SCOPE`):
            Which linear layers `precision="int8"` quantises: a key of [`INT8_SCOPES`]. Only int8 takes another scope
            than the default.
    """

    precision: str = "fp32"
    compile: bool = False
    int8_scope: str = DEFAULT_INT8_SCOPE

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}.")
        if not isinstance(self.compile, bool):
            raise TypeError(f"`compile` must be True or False, got {self.compile!r}.")
        if self.int8_scope not in INT8_SCOPES:
            raise ValueError(f"Unknown int8_scope {self.int8_scope!r}; choose one of {list(INT8_SCOPES)}.")
        if self.precision != "int8" and self.int8_scope != DEFAULT_INT8_SCOPE:
            raise ValueError(
                f"int8_scope={self.int8_scope!r} applies to precision='int8' only, not {self.precision!r}."
            )

    @property
    def is_default(self) -> bool:
        """Whether these options leave the model as it is (float32, eager)."""
        return self.precision == "fp32" and not self.compile


NAMED_OPTIONS = {
    "fp32": InferenceOptions(),
    "int8": InferenceOptions(precision="int8"),
    "bf16": InferenceOptions(precision="bf16"),
    "compile": InferenceOptions(compile=True),
    "int8+compile": InferenceOptions(precision="int8", compile=True),
    "int8-all": InferenceOptions(precision="int8", int8_scope="all"),
    "bf16+compile": InferenceOptions(precision="bf16", compile=True),
}
"""Short names of the option sets, as the benchmark and agreement scripts take them (`--variants int8 compile`)."""


def cpu_flags(cpuinfo_path: str | Path = CPUINFO_PATH) -> frozenset[str]:
    """
    The instruction-set flags of this machine's CPU, from the first `flags` line of `/proc/cpuinfo` (Linux); an empty
    set where the file cannot be read (other systems).
    """
    try:
        with open(cpuinfo_path, encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16(flags: Iterable[str] | None = None) -> bool:
    """
    Whether the CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX), so that bfloat16 autocast is faster than
    float32 on it.

    Args:
        flags (`Iterable[str]`, *optional*): CPU flags; [`cpu_flags`] of this machine by default.
    """
    flags = cpu_flags() if flags is None else set(flags)
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def check_bf16_supported(device: torch.device | str = "cpu") -> None:
    """
    Raise a `ValueError` unless bfloat16 autocast pays on `device`: a CPU with AVX512-BF16 or AMX, or a CUDA GPU with
    bfloat16 support (Ampere or newer).
    """
    device = torch.device(device)
    if device.type == "cpu":
        if not cpu_supports_bf16():
            raise ValueError(
                "bfloat16 autocast needs a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX: the "
                f"{' or '.join(BF16_CPU_FLAGS)} flags of /proc/cpuinfo), and this CPU has neither: bfloat16 would be "
                "emulated and slower than float32. Use precision='fp32' or precision='int8'."
            )
    elif device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"{device} does not support bfloat16; use precision='fp32'.")
    else:
        raise ValueError(f"bfloat16 autocast is offered on CPUs and CUDA GPUs only, not on {device.type!r}.")


def float32_outputs(outputs: Any) -> Any:
    """`outputs` (a `ModelOutput`, tuple or tensor) with its top-level bfloat16 tensors cast to float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype == torch.bfloat16 else outputs
    if isinstance(outputs, ModelOutput):
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
                outputs[key] = value.float()
        return outputs
    if isinstance(outputs, tuple):
        return type(outputs)(float32_outputs(value) for value in outputs)
    return outputs


def run_forward_under_bf16_autocast(module: nn.Module) -> None:
    """
    Make `module.forward` run under bfloat16 autocast on the module's device and return float32 outputs, by an
    instance-level `forward` (as Accelerate's `prepare_model` does for mixed precision). The wrapper is bound with
    `types.MethodType`, so a deep copy of the module wraps the copy's own `forward`.
    """
    class_forward = type(module).forward

    @functools.wraps(class_forward)  # keeps the signature, which `generate()` reads to validate its arguments
    def forward_under_bf16_autocast(self, *args, **kwargs):
        device_type = next(self.parameters()).device.type
        with torch.autocast(device_type, dtype=torch.bfloat16):
            outputs = class_forward(self, *args, **kwargs)
        return float32_outputs(outputs)

    module.forward = types.MethodType(forward_under_bf16_autocast, module)


def int8_scope_selects(scope: str, module_name: str) -> bool:
    """
    Whether the int8 `scope` (a key of [`INT8_SCOPES`]) quantises the linear layer `module_name` (its name in
    `model.named_modules()`): it matches one of the scope's patterns and lies outside `INT8_KEPT_FLOAT_MODULES`.
    """
    kept_float = any(module_name == kept or module_name.startswith(kept + ".") for kept in INT8_KEPT_FLOAT_MODULES)
    return not kept_float and any(fnmatch.fnmatchcase(module_name, pattern) for pattern in INT8_SCOPES[scope])


def quantize_linear_layers_int8(model: nn.Module, scope: str = DEFAULT_INT8_SCOPE) -> nn.Module:
    """
    Replace, in place, the `nn.Linear` layers (and subclasses such as [`CdanLinear`]) of `model` that `scope` selects
    (see [`INT8_SCOPES`]) outside `INT8_KEPT_FLOAT_MODULES` by `torch.ao.nn.quantized.dynamic.Linear` layers (int8
    weights, per output channel). Returns `model`.

    Args:
        model (`nn.Module`):
            A float32 CDAN model on the CPU.
        scope (`str`, *optional*, defaults to `DEFAULT_INT8_SCOPE`):
            A key of [`INT8_SCOPES`].

    Raises:
        `ValueError`: an unknown scope, or a scope that selects no linear layer of `model`.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if scope not in INT8_SCOPES:
        raise ValueError(f"Unknown int8_scope {scope!r}; choose one of {list(INT8_SCOPES)}.")
    linear_names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            # `nn.Linear` subclasses: `CdanLinear`, also when a checkpoint's remote code defines its own copy of it
            linear = isinstance(child, nn.Linear) and not isinstance(child, NonDynamicallyQuantizableLinear)
            if not linear or not int8_scope_selects(scope, name):
                continue
            if type(child) is not nn.Linear:  # quantize_dynamic swaps exact types only: give it a plain nn.Linear
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, child_name, plain)
            linear_names.append(name)
    if not linear_names:
        raise ValueError(
            f"int8_scope {scope!r} selects no linear layer of this model (patterns {INT8_SCOPES[scope]}, outside "
            f"{INT8_KEPT_FLOAT_MODULES})."
        )
    with warnings.catch_warnings():  # the deprecations of torch.ao.quantization: see the module docstring
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        quantize_dynamic(
            model, {name: per_channel_dynamic_qconfig for name in linear_names}, dtype=torch.qint8, inplace=True
        )
    return model


def compile_visual_extractor(model: nn.Module) -> nn.Module:
    """
    Compile, in place, the CNN pass of `model`'s visual extractor (`forward_features`: `(N, 3, H, W)` ->
    `(N, C, h, w)`) with `torch.compile` (Inductor with weight freezing; see the module docstring). The compiled
    function is bound to the extractor as an instance-level `forward_features` (the extractor calls its backbone's
    `forward_features`, never the backbone module itself, so `nn.Module.compile` of the backbone would not be used);
    the extractor keeps its type, hooks and state dict, and a deep copy binds the copy. Returns `model`.
    """
    visual_extractor = getattr(model.get_encoder(), "visual_extractor", None)
    if visual_extractor is None:
        raise ValueError("`compile=True` compiles the visual extractor, and this model has none.")
    compiled = torch.compile(type(visual_extractor).forward_features, options={"freezing": True})
    visual_extractor.forward_features = types.MethodType(compiled, visual_extractor)
    return model


def optimize_for_inference(
    model: nn.Module,
    precision: str = "fp32",
    compile: bool = False,
    inplace: bool = False,
    int8_scope: str = DEFAULT_INT8_SCOPE,
) -> nn.Module:
    """
    A CDAN model prepared for faster generation (see the module docstring), in eval mode, with its
    [`InferenceOptions`] as `model.inference_options`.

    Args:
        model (`CdanForConditionalGeneration`):
            A float32 model.
        precision (`str`, *optional*, defaults to `"fp32"`):
            `"fp32"`, `"bf16"` (bfloat16 autocast; refused where it does not pay, see [`check_bf16_supported`]) or
            `"int8"` (dynamic int8 linear layers; CPU only).
        compile (`bool`, *optional*, defaults to `False`):
            Compile the visual extractor's CNN.
        inplace (`bool`, *optional*, defaults to `False`):
            Change `model` itself; by default a deep copy is changed and `model` is left as it was.
        int8_scope (`str`, *optional*, defaults to `DEFAULT_INT8_SCOPE`):
            Which linear layers `precision="int8"` quantises: a key of [`INT8_SCOPES`] (the module docstring measures
            each one's agreement with float32 and speed).

    Raises:
        `ValueError`: an unknown precision or int8 scope, bfloat16 where it does not pay, int8 off the CPU, a model
            that is not float32, or a model already prepared.
    """
    options = InferenceOptions(precision=precision, compile=compile, int8_scope=int8_scope)
    previous = getattr(model, "inference_options", None)
    if previous is not None and not previous.is_default:
        raise ValueError(f"This model was already prepared for inference ({previous}); start from the float model.")
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32:
        raise ValueError(f"optimize_for_inference expects a float32 model, got {parameter.dtype}.")
    if precision == "bf16":
        check_bf16_supported(parameter.device)
    if precision == "int8" and parameter.device.type != "cpu":
        raise ValueError(f"Dynamic int8 quantisation runs on the CPU only; the model is on {parameter.device}.")

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if precision == "int8":
        quantize_linear_layers_int8(model, int8_scope)
    elif precision == "bf16":
        run_forward_under_bf16_autocast(model)  # every decoding step of generate()
        run_forward_under_bf16_autocast(model.get_encoder())  # the encoder pass, also when called on its own
    if compile:
        compile_visual_extractor(model)
    model.inference_options = options
    logger.info(f"Prepared the model for inference: {options}.")
    return model


__all__ = [
    "BF16_CPU_FLAGS",
    "DEFAULT_INT8_SCOPE",
    "INT8_KEPT_FLOAT_MODULES",
    "INT8_SCOPES",
    "NAMED_OPTIONS",
    "PRECISIONS",
    "InferenceOptions",
    "check_bf16_supported",
    "compile_visual_extractor",
    "cpu_flags",
    "cpu_supports_bf16",
    "float32_outputs",
    "int8_scope_selects",
    "optimize_for_inference",
    "quantize_linear_layers_int8",
    "run_forward_under_bf16_autocast",
]
