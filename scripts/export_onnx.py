"""Export a CDAN checkpoint to ONNX (encoder + cached decoder step) and check ONNX Runtime against PyTorch.

    python scripts/export_onnx.py --model outputs/demo --output_dir outputs/demo-onnx
    python scripts/export_onnx.py --model outputs/demo --output_dir outputs/demo-onnx --parity_studies 0  # no check

Writes the folder described in `onnx_cdan.py` (`encoder.onnx`, `decoder_step.onnx`, config, generation config,
processor, `onnx_cdan.json`), prints the size of each file, then writes reports for `--parity_studies` studies of
random images (through the exported processor) with `OnnxReportGenerator.generate()` and the PyTorch model's
`generate()`, greedy and with `--num_beams`, and prints whether the tokens agree and how far the encoder outputs are
apart. It exits with status 1 when a parity check fails. The parity check runs on the float32 export; then
`--extractor_int8_calibration demo` quantises the visual extractor to static int8, calibrated on `--calibration_studies`
studies of that data set's training split (`onnx_quantization_cdan.quantize_onnx_extractor_int8`), and `--int8_scope
encoder-and-cross-attention` quantises those linear layers to dynamic int8 (`onnx_quantization_cdan.quantize_onnx_int8`); the
fastest CPU path of the README:

    python scripts/export_onnx.py --model outputs/demo --output_dir outputs/demo-onnx-int8 \\
        --extractor_int8_calibration demo --int8_scope encoder-and-cross-attention
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from benchmark_utils import markdown_table
from transformers import HfArgumentParser

from inference_cdan import INT8_SCOPES
from modeling_cdan import CdanForConditionalGeneration
from onnx_cdan import OnnxReportGenerator, export_onnx
from onnx_quantization_cdan import calibration_batches, quantize_onnx_extractor_int8, quantize_onnx_int8
from processing_cdan import CdanProcessor


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "A CDAN checkpoint folder (or Hub id)."})
    output_dir: str = field(metadata={"help": "Folder to write the ONNX export to."})
    image_size: int | None = field(
        default=None, metadata={"help": "Exported view size; the checkpoint processor's by default (224 without one)."}
    )
    opset_version: int = field(default=18, metadata={"help": "ONNX opset of the graphs."})
    parity_studies: int = field(default=3, metadata={"help": "Studies of random images for the parity check."})
    num_beams: int = field(default=3, metadata={"help": "Beam size of the beam-search parity check."})
    threads: int = field(default=2, metadata={"help": "Threads of PyTorch and ONNX Runtime in the parity check."})
    seed: int = field(default=0, metadata={"help": "Seed of the random images."})
    int8_scope: str | None = field(
        default=None,
        metadata={
            "help": "After the parity check, quantise the linear layers of this scope (inference_cdan.INT8_SCOPES) "
            "to dynamic int8 with ONNX Runtime.",
            "choices": list(INT8_SCOPES),
        },
    )
    extractor_int8_calibration: str | None = field(
        default=None,
        metadata={
            "help": "After the parity check, quantise the visual extractor to static int8, calibrated on studies of "
            "this data set (demo, iu_xray or mimic_cxr)."
        },
    )
    calibration_data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the calibration data set (not for the demo)."}
    )
    calibration_split: str = field(default="train", metadata={"help": "Split whose studies calibrate static int8."})
    calibration_studies: int = field(default=64, metadata={"help": "Studies that calibrate static int8."})
    calibration_method: str = field(
        default="Percentile", metadata={"help": "onnxruntime.quantization.CalibrationMethod of static int8."}
    )


def random_studies(processor: CdanProcessor | None, num_studies: int, num_views: int, image_size: int, seed: int):
    """`(num_studies, num_views, 3, H, W)` pixel values of random grey images, through the processor if given."""
    generator = np.random.default_rng(seed)
    if processor is None:
        return torch.from_numpy(generator.standard_normal((num_studies, num_views, 3, image_size, image_size))).float()
    shape = (num_studies, num_views, image_size, image_size)
    grey_views = generator.integers(0, 256, shape, dtype=np.uint8)
    studies = [[PIL.Image.fromarray(view) for view in study] for study in grey_views]
    return processor(images=studies, return_tensors="pt")["pixel_values"]


def file_size_rows(folder: Path) -> list[tuple[str, str]]:
    return [
        (path.name, f"{path.stat().st_size / 2**20:.2f} MB") for path in sorted(folder.iterdir()) if path.is_file()
    ]


def parity_rows(
    model: CdanForConditionalGeneration, generator: OnnxReportGenerator, pixel_values: torch.Tensor, num_beams: int
) -> list[tuple[str, str, bool]]:
    """Encoder differences and token agreement of greedy and beam search, one row each."""
    with torch.inference_mode():
        reference = model.get_encoder()(pixel_values=pixel_values)
    encoded = generator.encode(pixel_values)
    rows = []
    for name, expected in (("memory", reference.last_hidden_state), ("disease_logits", reference.disease_logits)):
        if expected is not None:
            difference = float(np.abs(encoded[name] - expected.numpy()).max())
            rows.append((f"encoder {name}", f"max abs difference {difference:.2e}", difference < 1e-3))
    for beams in sorted({1, num_beams}):
        with torch.inference_mode():
            expected = model.generate(pixel_values=pixel_values, num_beams=beams)
        generated = generator.generate(pixel_values, num_beams=beams)
        same = expected.shape == generated.shape and bool((expected == generated).all())
        label = "greedy" if beams == 1 else f"beam {beams}"
        rows.append((f"{label} tokens", f"{tuple(generated.shape)} ONNX vs {tuple(expected.shape)} torch", same))
    return rows


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    model = CdanForConditionalGeneration.from_pretrained(args.model).eval()
    try:
        processor = CdanProcessor.from_pretrained(args.model)
    except OSError:  # a bare model folder: export without a processor
        print(f"No processor in {args.model}; exporting the model alone.")
        processor = None
    output_dir = export_onnx(
        model, args.output_dir, processor=processor, image_size=args.image_size, opset_version=args.opset_version
    )
    print(f"\nONNX export written to {output_dir}\n")
    print(markdown_table(("file", "size"), file_size_rows(output_dir)))
    if args.parity_studies < 1:
        quantize(args, processor, output_dir)
        return 0

    generator = OnnxReportGenerator(output_dir, num_threads=args.threads)
    exported_processor = CdanProcessor.from_pretrained(output_dir) if processor is not None else None
    pixel_values = random_studies(
        exported_processor,
        args.parity_studies,
        generator.metadata["num_views"],
        generator.metadata["image_size"],
        args.seed,
    )
    rows = parity_rows(model, generator, pixel_values, args.num_beams)
    print(f"\nParity on {args.parity_studies} studies of random images\n")
    print(markdown_table(("check", "result", "pass"), rows))
    passed = all(passed for _, _, passed in rows)
    quantize(args, processor, output_dir)
    return 0 if passed else 1


def quantize(args: ExportArguments, processor: CdanProcessor | None, output_dir: Path) -> None:
    """The int8 steps asked for, in place on the checked export: the static int8 extractor, then the linear layers."""
    if args.extractor_int8_calibration is not None:
        if processor is None:
            raise ValueError("Calibrating the static int8 extractor needs the checkpoint's processor.")
        from data_cdan import load_cdan_dataset  # training-side data code, only for calibration

        split = load_cdan_dataset(args.extractor_int8_calibration, data_dir=args.calibration_data_dir)
        studies = split[args.calibration_split]
        studies = studies.select(range(min(args.calibration_studies, len(studies))))
        batches = calibration_batches(processor, studies["images"])
        quantize_onnx_extractor_int8(output_dir, batches, args.calibration_method)
        print(f"\nVisual extractor quantised to static int8, calibrated on {len(studies)} studies of "
              f"{args.extractor_int8_calibration}/{args.calibration_split} ({args.calibration_method}).")  # fmt: skip
    if args.int8_scope is not None:
        quantized = quantize_onnx_int8(output_dir, args.int8_scope)
        count = sum(len(names) for names in quantized.values())
        print(f"\n{count} linear layers of scope {args.int8_scope!r} quantised to dynamic int8.")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExportArguments", "main"]
