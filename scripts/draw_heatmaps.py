"""Draw the attention heatmaps of one study over its views and print its report.

Writes, for view `i` (in the order given) and generated sentence `j`, `view{i}_positive.png` and `view{i}_negative.png`
(the reverse-attention maps behind `u_p` and `u_n`) and `view{i}_sentence{j}.png` (the decoder's cross-attention
while writing sentence `j`); see `heatmaps_cdan` for how each map is reduced.

Usage:
    python scripts/draw_heatmaps.py --model CKPT --images frontal.png lateral.png --output_dir heatmaps/
"""

import argparse
from pathlib import Path

from PIL import Image

from heatmaps_cdan import overlay_heatmap
from modeling_cdan import CdanForConditionalGeneration
from pipeline_cdan import CdanReportPipeline
from processing_cdan import CdanProcessor


def draw_heatmaps(model_path: str, images: list[str], output_dir: str, alpha: float = 0.5) -> dict:
    """
    Generate the report of one study and write its heatmap overlays.

    Args:
        model_path (`str`): a CDAN checkpoint folder with reverse attention.
        images (`list[str]`): the study's views.
        output_dir (`str`): where the PNGs go (created).
        alpha (`float`, *optional*, defaults to 0.5): heatmap opacity.

    Returns:
        `dict`: the pipeline's result for the study, `attention_maps` included.
    """
    model = CdanForConditionalGeneration.from_pretrained(model_path).eval()
    processor = CdanProcessor.from_pretrained(model_path)
    reporter = CdanReportPipeline(model=model, processor=processor, device=model.device)
    result = reporter(tuple(images), return_attention_maps=True)[0]
    maps = result["attention_maps"]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # A study with fewer views than the model reads repeats its last view (see CdanImageProcessor)
    views = [Image.open(images[min(index, len(images) - 1)]) for index in range(len(maps["positive"]))]
    for index, view in enumerate(views):
        overlay_heatmap(view, maps["positive"][index], alpha).save(output / f"view{index}_positive.png")
        overlay_heatmap(view, maps["negative"][index], alpha).save(output / f"view{index}_negative.png")
        for number, sentence in enumerate(maps["sentences"]):
            overlay_heatmap(view, sentence["maps"][index], alpha).save(output / f"view{index}_sentence{number}.png")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="CDAN checkpoint folder (with reverse attention)")
    parser.add_argument("--images", nargs="+", required=True, help="the views of one study")
    parser.add_argument("--output_dir", required=True, help="folder for the PNG overlays")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    args = parser.parse_args(argv)
    result = draw_heatmaps(args.model, args.images, args.output_dir, args.alpha)
    print(result["generated_text"])
    for number, sentence in enumerate(result["attention_maps"]["sentences"]):
        print(f"  sentence{number}: {sentence['sentence']}")


if __name__ == "__main__":
    main()

__all__ = ["draw_heatmaps", "main"]
