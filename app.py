"""Web demo of a CDAN checkpoint: upload a chest X-ray study, get its draft report, labels and attention heatmaps.

    python app.py --model outputs/demo                      # http://127.0.0.1:7860
    python app.py --model outputs/demo --port 8080 --share False
    CDAN_MODEL=outputs/demo python app.py

The page takes the views of one study (PNG, JPEG or DICOM files, read by the processor like every other input:
DICOM is recognised by its header and goes through `dicom_cdan.read_dicom`), and shows:

- the report (the pipeline's `generated_text`);
- the labels table: the reverse-attention classifier's decision and probability per CheXpert observation
  (the pipeline's `return_labels=True`);
- the heatmaps: per view, the reverse-attention maps behind `u_p` and `u_n`, and the decoder's cross-attention while
  writing each sentence (the pipeline's `return_attention_maps=True`), drawn with `heatmaps_cdan.overlay_heatmap`;
- the whole result as a JSON file to download (report, labels, probabilities, options and the input file names).

Options: the beam count, banning IU X-Ray's anonymisation token `xxxx`, and, when the checkpoint has observation
sentences (`config.observation_sentences`), whether the report's sentences are edited to agree with the labels.

The model is loaded once, when the app starts. [`report_study`] does the work of one click and needs no server (nor
gradio); [`build_demo`] imports gradio and wires it into a `gr.Blocks` page whose Generate button is also the API
endpoint `/generate` (see `gradio_client.Client`). Bad input (no file, more views than the model reads, a file that
is not an image) is shown as an error message; the uploaded files are only read.

References: Gradio's `Blocks`, `File`, `Gallery` and `Error` (gradio 6); the pipeline options of `pipeline_cdan`.
"""

import json
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import HfArgumentParser

from cli_cdan import load_reporter
from heatmaps_cdan import overlay_heatmap
from image_processing_cdan import load_image
from pipeline_cdan import CdanReportPipeline


MODEL_ENVIRONMENT_VARIABLE = "CDAN_MODEL"
"""Environment variable naming the checkpoint folder when `--model` is not given."""

LABEL_COLUMNS = ("observation", "decision", "probability", "threshold")
"""Columns of the labels table; `threshold` is the probability above which the observation is called positive."""

HEATMAP_SIDE = 448
"""Longer side, in pixels, of the heatmap overlays shown (views are shrunk to it; smaller ones are kept)."""

HEATMAP_ALPHA = 0.5
"""Opacity of the heatmap over its view."""

MAX_BEAMS = 8
"""Largest beam count the page offers."""

CAPTION_LENGTH = 90
"""Longest sentence quoted in a heatmap caption (longer ones are cut with an ellipsis)."""

INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)
"""What bad input raises in [`report_study`] (unreadable files, wrong view counts, missing DICOM decoders)."""

_CONFIG_LOCK = threading.Lock()
"""Serialises the calls that switch `config.observation_sentences` off for one report."""


@dataclass
class StudyReport:
    """
    What one click on Generate produces.

    Args:
        report (`str`): the draft findings.
        labels (`list[list]`): rows `[observation, decision, probability, threshold]`; empty for a model without
            classifier.
        heatmaps (`list[tuple[PIL.Image.Image, str]]`): overlays with their captions, view by view: `u_p`, `u_n`,
            then one per sentence.
        result (`dict`): the JSON-ready result: report, labels, probabilities, options and input file names.
        warnings (`list[str]`): warnings raised while reading the views (e.g. an image that cannot be a chest film).
    """

    report: str
    labels: list[list[Any]]
    heatmaps: list[tuple[PIL.Image.Image, str]]
    result: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def has_sentence_agreement(reporter: CdanReportPipeline) -> bool:
    """Whether the checkpoint edits its reports to agree with its labels (`config.observation_sentences`)."""
    return bool(reporter.model.config.observation_sentences)


@contextmanager
def sentence_agreement(reporter: CdanReportPipeline, enabled: bool) -> Iterator[None]:
    """
    Within the block, the pipeline edits reports to agree with the labels only when `enabled` (and the checkpoint
    has observation sentences). The pipeline reads `config.observation_sentences` for that, so it is switched off for
    the block, under a lock that also keeps concurrent reports apart, and always restored.
    """
    config = reporter.model.config
    with _CONFIG_LOCK:
        observation_sentences = config.observation_sentences
        if not enabled:
            config.observation_sentences = None
        try:
            yield
        finally:
            config.observation_sentences = observation_sentences


def study_paths(files: Sequence[str | os.PathLike] | str | os.PathLike | None, max_views: int) -> list[str]:
    """
    The paths of the uploaded views, after checking their number.

    Args:
        files (`Sequence[str]`, `str` or `None`): the uploaded files (one path, or a list of paths).
        max_views (`int`): the most views the model reads per study.

    Raises:
        `ValueError`: no file, or more than `max_views` files.
    """
    if files is None or isinstance(files, (str, os.PathLike)):
        files = [] if files is None else [files]
    paths = [os.fspath(file) for file in files]
    if not paths:
        raise ValueError("No image given: upload the study's views (PNG, JPEG or DICOM files), then click Generate.")
    if len(paths) > max_views:
        names = ", ".join(Path(path).name for path in paths)
        raise ValueError(
            f"{len(paths)} files were given ({names}), but this model reads at most {max_views} view(s) per study. "
            "Upload the views of one study only."
        )
    return paths


def load_views(paths: Sequence[str]) -> list[PIL.Image.Image]:
    """
    Read each view as the processor does (DICOM by its header, through `dicom_cdan`), for drawing the heatmaps; a
    file that is no readable image raises `ValueError` naming it.
    """
    views = []
    for path in paths:
        try:
            views.append(load_image(path))
        except INPUT_ERRORS as error:
            name = Path(path).name
            reason = str(error).replace(str(path), name)  # the upload's folder means nothing to the user
            raise ValueError(f"Cannot read '{name}' as a chest X-ray (PNG, JPEG or DICOM): {reason}") from error
    return views


def label_rows(
    result: dict[str, Any], observation_names: Sequence[str], thresholds: Sequence[float] | None = None
) -> list[list[Any]]:
    """
    The labels table, one row per observation in model order: `[observation, decision, probability, threshold]`.

    Args:
        result (`dict`): a pipeline result with `labels` and `probabilities` (`return_labels=True`).
        observation_names (`Sequence[str]`): `config.observation_names`.
        thresholds (`Sequence[float]`, *optional*): `config.observation_thresholds`, logits (0.0 for all when
            unset); shown as probabilities, so that a positive call below 0.5 reads as what it is.

    Returns:
        `list[list]`: the rows, probabilities rounded to 3 places; empty when `result` has no labels.
    """
    if "labels" not in result:
        return []
    logits = torch.zeros(len(observation_names)) if thresholds is None else torch.tensor(thresholds)
    threshold_probabilities = torch.sigmoid(logits).tolist()
    return [
        [name, result["labels"][name], round(float(result["probabilities"][name]), 3), round(threshold, 3)]
        for name, threshold in zip(observation_names, threshold_probabilities)
    ]


def shorten(text: str, length: int = CAPTION_LENGTH) -> str:
    """`text`, cut to at most `length` characters with an ellipsis."""
    return text if len(text) <= length else text[: length - 1].rstrip() + "…"


def heatmap_overlays(
    views: Sequence[PIL.Image.Image], attention_maps: dict[str, Any], alpha: float = HEATMAP_ALPHA
) -> list[tuple[PIL.Image.Image, str]]:
    """
    Draw the pipeline's attention maps over the views, with captions.

    Args:
        views (`Sequence[PIL.Image.Image]`): the views as given; a study with fewer views than the model reads had its
            last view repeated by the processor (see `CdanImageProcessor.group_into_studies`), and is drawn so.
        attention_maps (`dict`): the pipeline's `attention_maps` (`positive`, `negative`: one `(h, w)` array per view;
            `sentences`: `[{"sentence", "maps"}]`).
        alpha (`float`, *optional*): heatmap opacity.

    Returns:
        `list[tuple[PIL.Image.Image, str]]`: view by view, the `u_p` and `u_n` overlays, then one per sentence.
    """
    overlays = []
    for index in range(len(attention_maps["positive"])):
        view = views[min(index, len(views) - 1)].copy()
        view.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
        name = f"view {index + 1}"
        overlays.append((overlay_heatmap(view, attention_maps["positive"][index], alpha), f"{name}: u_p (positive)"))
        overlays.append((overlay_heatmap(view, attention_maps["negative"][index], alpha), f"{name}: u_n (negative)"))
        for number, sentence in enumerate(attention_maps["sentences"], start=1):
            caption = f"{name}: sentence {number}, {shorten(sentence['sentence'])}"
            overlays.append((overlay_heatmap(view, sentence["maps"][index], alpha), caption))
    return overlays


def report_study(
    reporter: CdanReportPipeline,
    files: Sequence[str | os.PathLike] | str | os.PathLike | None,
    num_beams: int | None = None,
    ban_anonymisation_token: bool = False,
    sentences_agree: bool = True,
) -> StudyReport:
    """
    Report on one study: what the page's Generate button does, without the page.

    Args:
        reporter ([`CdanReportPipeline`]): the loaded pipeline.
        files (`Sequence[str]`, `str` or `None`): the paths of the study's views (PNG, JPEG or DICOM), in order.
        num_beams (`int`, *optional*): beam count; the checkpoint's by default.
        ban_anonymisation_token (`bool`, *optional*, defaults to `False`): never write `xxxx`.
        sentences_agree (`bool`, *optional*, defaults to `True`): edit the report to agree with the labels, when the
            checkpoint has observation sentences (no effect otherwise).

    Returns:
        [`StudyReport`]: the report, the labels table, the heatmap overlays and the JSON-ready result. A model
        without reverse attention gives no labels and no heatmaps.

    Raises:
        `ValueError`: no file, more files than the model's views, a file that is no readable image, a bad beam count;
            the message says which.
    """
    config = reporter.model.config
    paths = study_paths(files, config.num_views)
    if num_beams is not None and int(num_beams) < 1:
        raise ValueError(f"The beam count must be at least 1, got {num_beams}.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        views = load_views(paths)
        has_classifier = config.use_reverse_attention
        call_kwargs: dict[str, Any] = {
            "ban_anonymisation_token": ban_anonymisation_token,
            "return_labels": has_classifier,
            "return_attention_maps": has_classifier,
        }
        if num_beams is not None:
            call_kwargs["num_beams"] = int(num_beams)
        with sentence_agreement(reporter, sentences_agree):
            (result,) = reporter(tuple(paths), **call_kwargs)
    overlays = heatmap_overlays(views, result["attention_maps"]) if has_classifier else []
    serialisable = {
        "report": result["generated_text"],
        **{name: result[name] for name in ("labels", "probabilities") if name in result},
        "options": {
            "num_beams": int(num_beams) if num_beams is not None else reporter.model.generation_config.num_beams,
            "ban_anonymisation_token": bool(ban_anonymisation_token),
            "sentences_agree": bool(sentences_agree) and has_sentence_agreement(reporter),
        },
        "views": [Path(path).name for path in paths],
    }
    messages = list(dict.fromkeys(str(warning.message) for warning in caught if warning.category is UserWarning))
    if len(paths) == 1 and config.num_views > 1:  # the processor repeats it (`repeat_single_view`), or it raised
        messages.append(
            f"One view given; the model reads {config.num_views} per study, so it was repeated to fill them."
        )
    return StudyReport(
        report=result["generated_text"],
        labels=label_rows(result, config.observation_names, config.observation_thresholds),
        heatmaps=overlays,
        result=serialisable,
        warnings=messages,
    )


def build_demo(reporter: CdanReportPipeline, title: str = "CDAN chest X-ray report generator") -> Any:
    """
    The web page around [`report_study`] (imports gradio).

    Args:
        reporter ([`CdanReportPipeline`]): the loaded pipeline, shared by every request.
        title (`str`, *optional*): the page's heading and browser title.

    Returns:
        `gradio.Blocks`: the page; its Generate button is the API endpoint `/generate` (inputs: files, beam count,
        ban the anonymisation token, sentences agree; outputs: report, labels table, heatmap gallery, JSON file).
    """
    if reporter.model.config.model_type != "cdan":
        raise ValueError(
            f"The web demo serves CDAN checkpoints; this one is a {reporter.model.config.model_type!r} model (use the "
            "pipeline or `cdan-report` for PriorRG and D2R-Net, whose inputs the page does not take)."
        )
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError("The web demo needs gradio: `pip install 'cdan-report[app]'`.") from error

    results_folder = Path(tempfile.mkdtemp(prefix="cdan-app-"))
    config = reporter.model.config
    default_beams = int(reporter.model.generation_config.num_beams or 1)

    def generate(files, num_beams, ban_anonymisation_token, sentences_agree):
        try:
            study = report_study(reporter, files, num_beams, ban_anonymisation_token, sentences_agree)
        except INPUT_ERRORS as error:
            raise gr.Error(str(error), title="Cannot report on this study", print_exception=False) from error
        for message in study.warnings:
            gr.Warning(message)
        result_file = Path(tempfile.mkdtemp(dir=results_folder)) / "report.json"
        result_file.write_text(json.dumps(study.result, indent=2, ensure_ascii=False), encoding="utf-8")
        return study.report, study.labels, study.heatmaps, str(result_file)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            f"Upload the views of one study (up to {config.num_views}: PNG, JPEG or DICOM), then click **Generate**. "
            "The report is a research model's draft, not a diagnosis. A label is positive when its probability is "
            "above its threshold. Sentences added to agree with the labels were not decoded, so they have no "
            "heatmap."
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label=f"Views (1 to {config.num_views} files, in order: frontal first)",
                    file_count="multiple",
                    type="filepath",
                    allow_reordering=True,
                    elem_id="views",
                )
                num_beams = gr.Slider(1, MAX_BEAMS, value=min(default_beams, MAX_BEAMS), step=1, label="Beams")
                ban_anonymisation_token = gr.Checkbox(value=False, label="Never write the anonymisation token 'xxxx'")
                sentences_agree = gr.Checkbox(
                    value=True,
                    label="Edit the report to agree with the labels",
                    visible=has_sentence_agreement(reporter),
                )
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                report = gr.Textbox(label="Report", lines=5, interactive=False, elem_id="report")
                labels = gr.Dataframe(
                    headers=list(LABEL_COLUMNS),
                    datatype=["str", "str", "number", "number"],
                    label="Labels (reverse-attention classifier)",
                    interactive=False,
                    max_height=800,  # the 14 CheXpert rows without a scroll bar
                    elem_id="labels",
                )
                result_file = gr.File(label="Result (JSON)", interactive=False)
        gallery = gr.Gallery(
            label="Heatmaps: u_p / u_n reverse attention and per-sentence cross-attention, per view",
            columns=4,
            format="png",
            object_fit="contain",
            height="max-content",  # every overlay in view ("auto" caps the gallery at about half the window)
            elem_id="heatmaps",
        )
        generate_button.click(
            generate,
            inputs=[files, num_beams, ban_anonymisation_token, sentences_agree],
            outputs=[report, labels, gallery, result_file],
            api_name="generate",
        )
    return demo


@dataclass
class AppArguments:
    model: str | None = field(
        default=None,
        metadata={"help": f"CDAN checkpoint folder (such as outputs/demo); ${MODEL_ENVIRONMENT_VARIABLE} by default."},
    )
    port: int | None = field(default=None, metadata={"help": "Server port; 7860 (or $GRADIO_SERVER_PORT) by default."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on; 0.0.0.0 for every interface."})
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ...; the first GPU if any."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads of torch (torch.set_num_threads)."})


def main(argv: list[str] | None = None) -> int:
    """
    `python app.py`: load the checkpoint once and serve the page until interrupted.

    Returns:
        `int`: 2 when no model is given or it cannot be loaded (the message says why).
    """
    parser = HfArgumentParser(AppArguments)
    parser.prog = "app.py"
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    model = args.model or os.environ.get(MODEL_ENVIRONMENT_VARIABLE)
    if not model:
        print(f"app.py: error: give the checkpoint with --model or ${MODEL_ENVIRONMENT_VARIABLE}.", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        reporter = load_reporter(model, device=args.device)
        demo = build_demo(reporter)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"app.py: error: {error}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "AppArguments",
    "StudyReport",
    "build_demo",
    "has_sentence_agreement",
    "heatmap_overlays",
    "label_rows",
    "load_views",
    "main",
    "report_study",
    "sentence_agreement",
    "study_paths",
]
