"""Export a CDAN checkpoint to ONNX (encoder + cached decoder step) and check ONNX Runtime against PyTorch.

    python scripts/export_onnx.py --model outputs/demo --output_dir outputs/demo-onnx
    python scripts/export_onnx.py --model outputs/demo --output_dir outputs/demo-onnx --parity_studies 0  # no check

Writes the folder described in `onnx_cdan.py` (`encoder.onnx`, `decoder_step.onnx`, config, generation config,
processor, `onnx_cdan.json`), prints the size of each file, then writes reports for `--parity_studies` studies of
random images (through the exported processor) with `OnnxReportGenerator.generate()` and the PyTorch model's
`generate()`, greedy and with `--num_beams`, and prints whether the tokens agree and how far the encoder outputs are
apart. It exits with status 1 when a parity check fails.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import HfArgumentParser

from benchmark_utils import markdown_table
from modeling_cdan import CdanForConditionalGeneration
from onnx_cdan import OnnxReportGenerator, export_onnx
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
    return 0 if all(passed for _, _, passed in rows) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExportArguments", "main"]
