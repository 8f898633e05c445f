"""int8 quantisation of a CDAN ONNX export (`onnx_cdan.export_onnx`) with ONNX Runtime, in place in its folder.

[`quantize_onnx_int8`] quantises, in an exported folder, the linear layers of an int8 scope (the scopes of
`inference_cdan.INT8_SCOPES`, found through the module names that the exporter stores on each node) with ONNX
Runtime's dynamic quantisation. On the demo checkpoint (200 test studies, beam 3,
`scripts/check_inference_agreement.py --onnxruntime_int8_scopes encoder-and-cross-attention all`), ONNX Runtime in
float32 wrote the reports of PyTorch's float32 model; quantised with the default scope it kept 98.0 % of them
identical (CE macro-F1 unchanged), with `"all"` 87.5 % (CE macro-F1 +0.0004).

[`quantize_onnx_extractor_int8`] quantises the visual extractor's convolutions (by default the third ResNet stage,
most of its multiply-adds) to static int8 with ONNX Runtime, calibrated on processed views of real studies
([`calibration_batches`]). Dynamic int8 cannot reach convolutions, which are most of a ResNet-101's time; with both,
ONNX Runtime is the fastest CPU path of the README's generation benchmark.

Both find their nodes through the module names that `torch.onnx.export(dynamo=True)` stores on each node
([`node_name_scopes`]), so the scopes are the model's own module names.

References:
1) ONNX Runtime `onnxruntime.quantization.quantize_dynamic` (dynamic int8 quantisation of `MatMul` nodes) and
   `quantize_static` (QDQ static int8, calibrated with a `CalibrationDataReader`; `CalibStridedMinMax` for
   calibration in strides).
2) PyTorch, `torch.onnx.export(dynamo=True)` node metadata (`pkg.torch.onnx.name_scopes`,
   `pkg.torch.onnx.class_hierarchy`).
"""

import ast
import contextlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    from .inference_cdan import DEFAULT_INT8_SCOPE, INT8_SCOPES, int8_scope_selects
    from .onnx_cdan import (
        DECODER_STEP_FILE,
        DIAGNOSIS_PROMPT_FILE,
        ENCODER_FILE,
        EXPORTED_MODULE_PREFIXES,
        METADATA_FILE,
        import_onnx_dependency,
    )
except ImportError:
    from inference_cdan import DEFAULT_INT8_SCOPE, INT8_SCOPES, int8_scope_selects
    from onnx_cdan import (
        DECODER_STEP_FILE,
        DIAGNOSIS_PROMPT_FILE,
        ENCODER_FILE,
        EXPORTED_MODULE_PREFIXES,
        METADATA_FILE,
        import_onnx_dependency,
    )


def node_name_scopes(node: Any) -> list[str]:
    """
    The module names an exported ONNX node was traced in, outermost first, then the operator's name, as
    `torch.onnx.export(dynamo=True)` stores them in the node's metadata (`[]` for a graph exported without them).
    """
    metadata = {prop.key: prop.value for prop in node.metadata_props}
    return ast.literal_eval(metadata.get("pkg.torch.onnx.name_scopes", "[]"))


def linear_module_name(node: Any) -> str | None:
    """
    The name in `model.named_modules()` of the linear layer whose product an exported ONNX node computes, read from
    the name scopes that `torch.onnx.export(dynamo=True)` stores in the node's metadata; `None` for a node that is no
    linear layer's product (attention products, other operators, graphs exported without that metadata).
    """
    metadata = {prop.key: prop.value for prop in node.metadata_props}
    if not metadata.get("pkg.torch.onnx.class_hierarchy", "").endswith("'aten.linear.default']"):
        return None
    scopes = node_name_scopes(node)  # [..., module name, operator name]
    if len(scopes) < 2:
        return None
    prefix, _, rest = scopes[-2].partition(".")
    if prefix not in EXPORTED_MODULE_PREFIXES:
        return None
    return EXPORTED_MODULE_PREFIXES[prefix] + (f".{rest}" if rest else "")


def quantize_onnx_int8(folder: str | os.PathLike, scope: str = DEFAULT_INT8_SCOPE) -> dict[str, list[str]]:
    """
    Quantise, in place, the linear layers of an [`export_onnx`] folder's graphs that the int8 `scope` selects (the
    same layers as `optimize_for_inference(precision="int8", int8_scope=scope)`, see `inference_cdan.INT8_SCOPES`)
    with ONNX Runtime's dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`): `MatMulInteger` on int8
    weights (per output channel, 7 bits: `reduce_range`, which avoids the saturation of 8-bit products on CPUs without
    VNNI) and activations quantised to uint8 per call. The folder's metadata records the scope (`int8_scope`);
    [`OnnxReportGenerator`] reads the folder as before.

    Args:
        folder (`str` or `os.PathLike`):
            A folder written by [`export_onnx`], not yet quantised.
        scope (`str`, *optional*, defaults to `DEFAULT_INT8_SCOPE`):
            A key of `INT8_SCOPES`.

    Returns:
        `dict[str, list[str]]`: per graph file, the module names of the quantised linear layers.

    Raises:
        ValueError: an unknown scope, a folder already quantised, or a scope that selects no exported linear layer.
        ImportError: `onnx` or `onnxruntime` is not installed.
    """
    onnx = import_onnx_dependency("onnx")
    import_onnx_dependency("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scope not in INT8_SCOPES:
        raise ValueError(f"Unknown int8_scope {scope!r}; choose one of {list(INT8_SCOPES)}.")
    folder = Path(folder)
    metadata_path = folder / METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    if "int8_scope" in metadata:
        raise ValueError(f"{folder} is already quantised (int8_scope {metadata['int8_scope']!r}); export it again.")
    quantized = {}
    for file_name in (ENCODER_FILE, DECODER_STEP_FILE, DIAGNOSIS_PROMPT_FILE):
        path = folder / file_name
        if not path.is_file():
            continue
        nodes = {}
        for node in onnx.load(os.fspath(path)).graph.node:
            module_name = linear_module_name(node)
            if node.op_type == "MatMul" and module_name is not None and int8_scope_selects(scope, module_name):
                nodes[node.name] = module_name
        if nodes:
            quantized_path = path.with_suffix(".int8.onnx")
            quantize_dynamic(
                path,
                quantized_path,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=list(nodes),
                per_channel=True,
                reduce_range=True,
                weight_type=QuantType.QInt8,
            )
            os.replace(quantized_path, path)
            quantized[file_name] = sorted(nodes.values())
    if not quantized:
        raise ValueError(f"int8_scope {scope!r} selects no linear layer of the graphs in {folder}.")
    metadata["int8_scope"] = scope
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return quantized


EXTRACTOR_BACKBONE_SCOPE = "encoder.visual_extractor.backbone"
"""The name scope, in the exported encoder graph, of the visual extractor's timm backbone."""

EXTRACTOR_INT8_OPERATORS = ("Conv", "Relu", "Add", "MaxPool")
"""The backbone operators that static int8 quantisation keeps in int8: convolutions (batch norm folded in by the
export), their activations, the residual additions and the stem's max-pooling, so that int8 tensors flow from one
convolution to the next without a float round trip."""


DEFAULT_EXTRACTOR_INT8_MODULES = ("layer3",)
"""The backbone modules that static int8 quantises by default: the third stage of a timm ResNet, which holds most of
its convolutions (23 of ResNet-101's 33 bottleneck blocks, about 66 % of its multiply-adds at 224 px). The stem and
the other stages stay float32: quantising them as well moved more of the demo's reports away from float32's (README,
"Faster CPU inference")."""


def in_extractor_backbone(node: Any, modules: Sequence[str] | None = None) -> bool:
    """
    Whether an exported encoder node was traced inside the visual extractor's backbone (`EXTRACTOR_BACKBONE_SCOPE`),
    and, with `modules`, inside one of those child modules of it (e.g. `("layer3",)`).
    """
    prefixes = [EXTRACTOR_BACKBONE_SCOPE] if modules is None else [f"{EXTRACTOR_BACKBONE_SCOPE}.{m}" for m in modules]
    return any(
        scope == prefix or scope.startswith(f"{prefix}.") for scope in node_name_scopes(node) for prefix in prefixes
    )


class PixelValuesCalibrationReader:
    """
    ONNX Runtime's calibration data reader (`onnxruntime.quantization.CalibrationDataReader`'s protocol:
    `get_next()` returns the next graph input dict, `None` at the end; `set_range` and `len` for strided calibration)
    over batches of processed views, kept as single studies `(1, V, 3, H, W)`. `quantize_static` then calibrates one
    study at a time (`CalibStridedMinMax=1`): its calibrators otherwise keep every intermediate tensor of every call
    until the end (about 0.5 GB per full-size study), and the histogram calibrators (`"Percentile"`, `"Entropy"`)
    cannot stack the outputs of a last, smaller batch.
    """

    def __init__(self, batches: Iterable[torch.Tensor | np.ndarray]):
        self.studies = [study[None] for batch in batches for study in self.as_array(batch)]
        self.start_index, self.end_index = 0, len(self.studies)
        self.progress = None  # a tqdm bar counting the studies handed over, while quantize_static runs

    @staticmethod
    def as_array(batch: torch.Tensor | np.ndarray) -> np.ndarray:
        pixel_values = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        return pixel_values.astype(np.float32, copy=False)  # (B, V, 3, H, W)

    def __len__(self) -> int:
        return len(self.studies)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start_index, self.end_index = start_index, min(end_index, len(self.studies))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start_index >= self.end_index:
            return None
        self.start_index += 1
        if self.progress is not None:
            self.progress.update()
        return {"pixel_values": self.studies[self.start_index - 1]}


def calibration_batches(
    processor: Any, studies: Sequence[Sequence[Any]], batch_size: int = 8
) -> Iterator[torch.Tensor]:
    """
    The processed views `(B, V, 3, H, W)` of `studies` (each the list of its views, as the processor's `images`
    takes them: paths, PIL images or arrays), `batch_size` studies at a time: the calibration input of
    [`quantize_onnx_extractor_int8`].
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    for start in range(0, len(studies), batch_size):
        yield processor(images=list(studies[start : start + batch_size]), return_tensors="pt")["pixel_values"]


def quantize_onnx_extractor_int8(
    folder: str | os.PathLike,
    calibration_pixel_values: Iterable[torch.Tensor | np.ndarray],
    calibration_method: str = "Percentile",
    backbone_modules: Sequence[str] | None = DEFAULT_EXTRACTOR_INT8_MODULES,
) -> list[str]:
    """
    Quantise, in place, the visual extractor of an [`export_onnx`] folder's encoder graph to static int8 with ONNX
    Runtime (`onnxruntime.quantization.quantize_static`, QDQ format): the convolutions of the backbone's
    `backbone_modules` get int8 weights (per output channel) and, with the activations, residual additions and
    max-pooling between them, uint8 activations whose ranges are calibrated on `calibration_pixel_values`. Dynamic int8 ([`quantize_onnx_int8`], linear layers
    only) leaves the convolutions, most of a ResNet's time, in float32. The extractor's projection, the reverse
    attention, the encoder layers and the decoder stay as they are; [`quantize_onnx_int8`] may quantise their linear
    layers before or after. Weights and activations use 7-bit ranges (`reduce_range`), which avoids the saturation of
    8-bit products on CPUs without VNNI. The folder's metadata records the calibration (`extractor_int8`).

    Calibrate on processed views of the data the model will read (a few dozen studies of the training split): ranges
    taken from other images clip or waste the 7 bits, and the reports drift further from float32.

    Args:
        folder (`str` or `os.PathLike`):
            A folder written by [`export_onnx`] whose extractor is not yet quantised.
        calibration_pixel_values (iterable of `torch.Tensor` or `np.ndarray`):
            Batches of processed views, `(B, V, 3, H, W)` as the processor returns them.
        calibration_method (`str`, *optional*, defaults to `"Percentile"`):
            A name of `onnxruntime.quantization.CalibrationMethod`: `"Percentile"` (each activation's range covers
            99.999 % of its calibration values, so rare outliers do not widen the steps), `"MinMax"`, `"Entropy"`.
        backbone_modules (`Sequence[str]`, *optional*, defaults to `DEFAULT_EXTRACTOR_INT8_MODULES`):
            Names of the backbone's child modules to quantise (a timm ResNet's `"layer1"` ... `"layer4"`, `"conv1"`);
            `None` quantises the whole backbone.

    Returns:
        `list[str]`: the names of the quantised encoder nodes.

    Raises:
        ValueError: a folder whose extractor is already quantised, no calibration batch, an unknown calibration method,
            or an encoder graph without the name scopes that locate the extractor.
        ImportError: `onnx` or `onnxruntime` is not installed.
    """
    onnx = import_onnx_dependency("onnx")
    import_onnx_dependency("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration_method not in CalibrationMethod.__members__:
        raise ValueError(
            f"Unknown calibration_method {calibration_method!r}; choose one of {list(CalibrationMethod.__members__)}."
        )
    folder = Path(folder)
    metadata_path = folder / METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    if "extractor_int8" in metadata:
        raise ValueError(f"The extractor of {folder} is already quantised; export it again.")
    path = folder / ENCODER_FILE
    nodes = [
        node.name
        for node in onnx.load(os.fspath(path)).graph.node
        if node.op_type in EXTRACTOR_INT8_OPERATORS and in_extractor_backbone(node, backbone_modules)
    ]
    if not nodes:
        raise ValueError(
            f"No node of {path} lies in the backbone modules {backbone_modules} (scope {EXTRACTOR_BACKBONE_SCOPE!r}); "
            "name child modules of the extractor's backbone, or export the model again."
        )
    reader = PixelValuesCalibrationReader(calibration_pixel_values)
    if len(reader) == 0:
        raise ValueError("`calibration_pixel_values` gave no batch to calibrate on.")
    quantized_path = path.with_suffix(".int8.onnx")
    # ONNX Runtime prints a line per calibration pass; a progress bar over the studies replaces them
    reader.progress = tqdm(total=len(reader), desc="Calibrating the static int8 extractor", unit="study")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                path,
                quantized_path,
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(EXTRACTOR_INT8_OPERATORS),
                nodes_to_quantize=nodes,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[calibration_method],
                extra_options={"CalibStridedMinMax": 1},  # one study per calibration pass (see the reader)
            )
    except Exception:
        quantized_path.unlink(missing_ok=True)
        raise
    finally:
        reader.progress.close()
    os.replace(quantized_path, path)
    metadata["extractor_int8"] = {
        "calibration_studies": len(reader),
        "calibration_method": calibration_method,
        "backbone_modules": None if backbone_modules is None else list(backbone_modules),
    }
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return nodes


__all__ = [
    "DEFAULT_EXTRACTOR_INT8_MODULES",
    "EXTRACTOR_INT8_OPERATORS",
    "PixelValuesCalibrationReader",
    "calibration_batches",
    "in_extractor_backbone",
    "linear_module_name",
    "node_name_scopes",
    "quantize_onnx_extractor_int8",
    "quantize_onnx_int8",
]
