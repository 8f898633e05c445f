"""The web demo (`app.py`) end to end: a local gradio server on a tiny checkpoint, called with `gradio_client`.

The server runs in this process (`launch(prevent_thread_lock=True)`) on a free port; the client uploads PNG and
DICOM files written here. What the page returns is compared with what the pipeline returns for the same files.
"""

import json
import os
import socket
from pathlib import Path

import gradio_client
import numpy as np
import pytest
import torch
from PIL import Image

from app import HEATMAP_SIDE, build_demo, main, report_study
from cli_cdan import load_reporter
from heatmaps_cdan import overlay_heatmap
from image_processing_cdan import load_image
from pipeline_cdan import save_checkpoint
from test_anonymisation_token import processor_with_anonymisation_words
from test_cli import write_png
from test_dicom import build_dataset, ramp, save
from test_pipeline import tiny_report_model


os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

DICOM_SIDE = 72


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """
    A tiny random two-view checkpoint with the reverse-attention classifier and a different decision threshold per
    observation; its vocabulary has `xxxx`.
    """
    processor = processor_with_anonymisation_words()
    model = tiny_report_model(processor)
    model.config.observation_thresholds = [0.2 * index - 1.0 for index in range(len(model.config.observation_names))]
    directory = tmp_path_factory.mktemp("app-checkpoint")
    save_checkpoint(model, processor, directory)
    return directory


@pytest.fixture(scope="module")
def reporter(checkpoint):
    return load_reporter(checkpoint)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A PNG, a 16-bit MONOCHROME2 DICOM named without suffix (read by its header), and a text file."""
    folder = tmp_path_factory.mktemp("app-inputs")
    dicom = build_dataset(ramp(0, 4000, side=DICOM_SIDE), bits_stored=16)
    text = folder / "notes.txt"
    text.write_text("not an image\n")
    return {"png": write_png(folder / "frontal.png"), "dicom": save(dicom, folder / "lateral"), "text": text}


@pytest.fixture(scope="module")
def client(reporter, tmp_path_factory):
    """A `gradio_client.Client` on the app, served in this process on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_demo(reporter)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield gradio_client.Client(
            f"http://127.0.0.1:{port}/",
            verbose=False,
            analytics_enabled=False,
            download_files=tmp_path_factory.mktemp("app-downloads"),
        )
    finally:
        demo.close()


def generate(client, *files: Path, **options):
    """Click Generate through the API: `(report, labels table, gallery, JSON file)`."""
    uploads = [gradio_client.handle_file(str(file)) for file in files]
    return client.predict(uploads, **options, api_name="/generate")


@pytest.fixture(scope="module")
def two_view_outputs(client, inputs):
    return generate(client, inputs["png"], inputs["dicom"])


def test_png_report_is_the_pipelines(client, reporter, inputs):
    report, _, _, _ = generate(client, inputs["png"])
    assert report == reporter(str(inputs["png"]))[0]["generated_text"]


def test_dicom_is_read_by_its_header_and_reported_like_the_pipeline(client, reporter, inputs):
    report, _, gallery, _ = generate(client, inputs["dicom"])
    assert report == reporter(str(inputs["dicom"]))[0]["generated_text"]
    assert Image.open(gallery[0]["image"]).size == (DICOM_SIDE, DICOM_SIDE)


def test_two_view_report_is_the_pipelines(two_view_outputs, reporter, inputs):
    report, _, _, _ = two_view_outputs
    assert report == reporter((str(inputs["png"]), str(inputs["dicom"])))[0]["generated_text"]


def test_labels_table_has_the_pipelines_decisions_and_probabilities(two_view_outputs, reporter, inputs):
    _, labels, _, _ = two_view_outputs
    (expected,) = reporter((str(inputs["png"]), str(inputs["dicom"])), return_labels=True)
    assert labels["headers"] == ["observation", "decision", "probability", "threshold"]
    assert [tuple(row[:2]) for row in labels["data"]] == list(expected["labels"].items())
    probabilities = [row[2] for row in labels["data"]]
    np.testing.assert_allclose(probabilities, list(expected["probabilities"].values()), atol=5e-4)


def test_labels_table_shows_each_observations_threshold_as_a_probability(two_view_outputs, reporter):
    _, labels, _, _ = two_view_outputs
    thresholds = torch.sigmoid(torch.tensor(reporter.model.config.observation_thresholds))
    np.testing.assert_allclose([row[3] for row in labels["data"]], thresholds.tolist(), atol=5e-4)


def test_gallery_draws_each_views_maps_over_that_view(two_view_outputs, reporter, inputs):
    _, _, gallery, _ = two_view_outputs
    (expected,) = reporter((str(inputs["png"]), str(inputs["dicom"])), return_attention_maps=True)
    maps = expected["attention_maps"]
    sentences = maps["sentences"]
    assert len(gallery) == 2 * (2 + len(sentences))
    for index, path in enumerate((inputs["png"], inputs["dicom"])):
        view = load_image(path)
        view.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
        expected_overlays = [maps["positive"][index], maps["negative"][index]]
        expected_overlays += [sentence["maps"][index] for sentence in sentences]
        items = gallery[index * (2 + len(sentences)) : (index + 1) * (2 + len(sentences))]
        assert items[0]["caption"] == f"view {index + 1}: u_p (positive)"
        assert items[1]["caption"] == f"view {index + 1}: u_n (negative)"
        assert items[2]["caption"] == f"view {index + 1}: sentence 1, {sentences[0]['sentence']}"
        for item, heatmap in zip(items, expected_overlays):
            drawn = np.asarray(Image.open(item["image"]).convert("RGB"))
            np.testing.assert_array_equal(drawn, np.asarray(overlay_heatmap(view, heatmap)))


def test_beams_and_anonymisation_ban_reach_the_pipeline(client, reporter, inputs):
    report, _, _, result_file = generate(client, inputs["png"], num_beams=1, ban_anonymisation_token=True)
    expected = reporter(str(inputs["png"]), num_beams=1, ban_anonymisation_token=True)[0]["generated_text"]
    assert report == expected and "xxxx" not in report.split()
    assert json.loads(Path(result_file).read_text())["options"]["num_beams"] == 1


def test_result_file_holds_the_report_and_labels(two_view_outputs, inputs):
    report, labels, _, result_file = two_view_outputs
    result = json.loads(Path(result_file).read_text())
    assert result["report"] == report
    assert list(result["labels"].items()) == [tuple(row[:2]) for row in labels["data"]]
    assert result["views"] == [inputs["png"].name, inputs["dicom"].name]


def test_non_image_file_is_a_clear_error(client, inputs):
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Cannot read 'notes\.txt' as a chest X-ray"):
        generate(client, inputs["text"])


def test_more_files_than_views_is_a_clear_error(client, inputs):
    with pytest.raises(gradio_client.exceptions.AppError, match=r"3 files were given .* at most 2 view"):
        generate(client, inputs["png"], inputs["dicom"], inputs["png"])


def test_no_file_is_a_clear_error(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="No image given"):
        client.predict([], api_name="/generate")


def test_sentence_agreement_can_be_switched_off(reporter, inputs):
    config = reporter.model.config
    (expected,) = reporter(str(inputs["png"]), return_labels=True)
    observation_sentences = {name: f"sentence for {name.lower()} ." for name, _ in expected["labels"].items()}
    config.observation_sentences = observation_sentences
    try:
        agreeing = report_study(reporter, [inputs["png"]], sentences_agree=True)
        raw = report_study(reporter, [inputs["png"]], sentences_agree=False)
        assert config.observation_sentences == observation_sentences  # restored after the call
        edited = reporter(str(inputs["png"]))[0]["generated_text"]
    finally:
        config.observation_sentences = None
    assert raw.report == expected["generated_text"]
    assert agreeing.report == edited != raw.report


def test_main_without_a_model_fails_with_a_message(monkeypatch, capsys):
    monkeypatch.delenv("CDAN_MODEL", raising=False)
    assert main([]) == 2
    assert "--model or $CDAN_MODEL" in capsys.readouterr().err


def test_the_page_refuses_a_model_type_whose_inputs_it_does_not_take():
    from types import SimpleNamespace

    from app import build_demo

    d2r_reporter = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type="d2r_net")))
    with pytest.raises(ValueError, match="serves CDAN checkpoints"):
        build_demo(d2r_reporter)
