"""Draw where each sentence of a generated report is grounded: the study's lesion boxes on its views, every sentence's
best box highlighted and numbered.

Writes `view{i}.png` for each given view `i` (at the image's own size): every box the model read outlined in grey, and
each sentence's top box (the highest grounding score, see the pipeline's `return_grounding`) outlined in that
sentence's colour and labelled with its number (1 = the first sentence); boxes that several sentences pick carry all
their numbers. `legend.txt` lists the numbers with their colours, sentences, views and scores; it is also printed.

Usage:
    python scripts/draw_grounding.py --model outputs/d2r_demo --images frontal.png lateral.png \\
        --boxes boxes.json --output_dir grounding/

`boxes.json` holds one list per image, each box `[x_min, y_min, x_max, y_max]` in pixels of that image or a
`BOX_FEATURES` dict, e.g. `[[[10, 20, 80, 90], [100, 40, 150, 120]], [[30, 30, 90, 110]]]`.

References: PIL's `ImageDraw`; the pipeline's grounding (`pipeline_cdan.CdanReportPipeline`, `return_grounding`).
"""

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from cli_cdan import load_reporter
from image_processing_cdan import load_image

BOX_COLOUR = (160, 160, 160)
"""Outline of the boxes no sentence picks first."""

SENTENCE_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)
"""Outline of the top box of sentence `j` (0-based): `SENTENCE_COLOURS[j % 8]` (distinct colours, none grey)."""


def sentence_colour(number: int) -> tuple[int, int, int]:
    """The colour of sentence `number` (1-based)."""
    return SENTENCE_COLOURS[(number - 1) % len(SENTENCE_COLOURS)]


def top_boxes(grounding: list[dict[str, Any]]) -> dict[tuple[int, int], list[int]]:
    """`(view, index)` of each sentence's best box -> the numbers (1-based) of the sentences that pick it first."""
    picked: dict[tuple[int, int], list[int]] = {}
    for number, item in enumerate(grounding, start=1):
        if item["boxes"]:
            best = item["boxes"][0]
            picked.setdefault((best["view"], best["index"]), []).append(number)
    return picked


def draw_view(image: Image.Image, view: int, grounding: list[dict[str, Any]], line_width: int = 2) -> Image.Image:
    """
    One view with its boxes drawn (see the module docstring).

    Args:
        image (`PIL.Image.Image`): the view as given (any mode; drawn in RGB).
        view (`int`): its index in the study.
        grounding (`list[dict]`): the pipeline's `grounding` of the report.
        line_width (`int`, *optional*, defaults to 2): outline width in pixels.

    Returns:
        `PIL.Image.Image`: an RGB copy of the view with the boxes.
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    view_boxes = {
        (entry["view"], entry["index"]): entry["box"] for item in grounding for entry in item["boxes"]
        if entry["view"] == view
    }  # fmt: skip
    picked = top_boxes(grounding)
    for key, box in view_boxes.items():  # grey first, so that a highlighted outline is drawn over it
        if key not in picked:
            draw.rectangle(box, outline=BOX_COLOUR, width=line_width)
    for key, numbers in picked.items():
        if key[0] != view:
            continue
        box = view_boxes[key]
        colour = sentence_colour(numbers[0])
        draw.rectangle(box, outline=colour, width=line_width)
        draw.text((box[0] + line_width + 1, box[1] + line_width), ",".join(map(str, numbers)), fill=colour)
    return canvas


def legend(grounding: list[dict[str, Any]]) -> str:
    """One line per sentence: its number, colour, top box (view and score) and text."""
    lines = []
    for number, item in enumerate(grounding, start=1):
        if item["boxes"]:
            best = item["boxes"][0]
            where = f"view {best['view']} box {best['index']} (score {best['score']:.3f})"
        else:
            where = "no box"
        lines.append(f"{number}: rgb{sentence_colour(number)} {where}: {item['sentence']}")
    return "\n".join(lines)


def draw_grounding(model_path: str, images: list[str], boxes: list, output_dir: str) -> dict[str, Any]:
    """
    Generate the report of one study with its grounding and write the drawings.

    Args:
        model_path (`str`): a D2R-Net checkpoint folder (or CDAN with `use_lesion_alignment`).
        images (`list[str]`): the study's views.
        boxes (`list`): one list of boxes per view, in pixels of that view.
        output_dir (`str`): where `view{i}.png` and `legend.txt` go (created).

    Returns:
        `dict`: the pipeline's result for the study (`generated_text`, `grounding`).
    """
    reporter = load_reporter(model_path)
    (result,) = reporter({"images": list(images), "boxes": boxes}, return_grounding=True)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for view, path in enumerate(images):
        draw_view(load_image(path), view, result["grounding"]).save(output / f"view{view}.png")
    (output / "legend.txt").write_text(legend(result["grounding"]) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="D2R-Net checkpoint folder (or CDAN with lesion alignment)")
    parser.add_argument("--images", nargs="+", required=True, help="the views of one study")
    parser.add_argument("--boxes", required=True, help="JSON file: one list of boxes per image, in its pixels")
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs and legend.txt")
    args = parser.parse_args(argv)
    try:
        boxes = json.loads(Path(args.boxes).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read the boxes file {args.boxes}: {error}")
    if not isinstance(boxes, list) or len(boxes) != len(args.images):
        parser.error(f"{args.boxes} must hold a JSON list with one list of boxes per image ({len(args.images)}).")
    result = draw_grounding(args.model, args.images, boxes, args.output_dir)
    print(result["generated_text"])
    print(legend(result["grounding"]))
    return result


if __name__ == "__main__":
    main()


__all__ = [
    "BOX_COLOUR",
    "SENTENCE_COLOURS",
    "draw_grounding",
    "draw_view",
    "legend",
    "main",
    "sentence_colour",
    "top_boxes",
]
