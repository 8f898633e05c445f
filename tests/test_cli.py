"""The `cdan-report` command line (`cli_cdan.py`): inputs, JSON-lines output, resuming, error rows (CPU, offline)."""

import json
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from cli_cdan import EXIT_OK, EXIT_SOME_STUDIES_FAILED, EXIT_USAGE_ERROR, main
from configuration_cdan import CHEXPERT_OBSERVATIONS
from modeling_cdan import CdanForConditionalGeneration
from pipeline_cdan import CdanReportPipeline, save_checkpoint
from test_anonymisation_token import processor_with_anonymisation_words
from test_pipeline import REPOSITORY, tiny_report_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint (with the reverse-attention classifier) whose vocabulary has `xxxx`."""
    processor = processor_with_anonymisation_words()
    directory = tmp_path_factory.mktemp("cli-checkpoint")
    save_checkpoint(tiny_report_model(processor), processor, directory)
    return directory


@pytest.fixture
def generate_calls(monkeypatch) -> list[dict]:
    """Record every `generate` call: the number of studies it decodes and its keyword arguments."""
    calls = []
    original_generate = CdanForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        encoded = kwargs.get("pixel_values", kwargs.get("encoder_outputs"))
        batch_size = len(encoded) if "pixel_values" in kwargs else len(encoded.last_hidden_state)
        calls.append({"studies": batch_size, "kwargs": kwargs})
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(CdanForConditionalGeneration, "generate", recording_generate)
    return calls


def write_png(path: Path, seed: int = 0) -> Path:
    """A small greyscale gradient PNG (not degenerate, so no warning); `seed` rotates it to vary the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.linear_gradient("L").rotate(seed * 37).resize((48, 48)).save(path)
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(checkpoint: Path, output: Path, *inputs, options: tuple[str, ...] = ()) -> int:
    return main(["--model", str(checkpoint), "--inputs", *map(str, inputs), "--output", str(output), *options])


def test_pyproject_installs_the_command():
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["cdan-report"] == "cli_cdan:main"
    assert "cli_cdan" in pyproject["tool"]["setuptools"]["py-modules"]


def test_flat_folder_gives_one_single_view_study_per_image(checkpoint, tmp_path):
    for index, name in enumerate(("b.png", "a.jpg")):
        write_png(tmp_path / "scans" / name, seed=index)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans") == EXIT_OK
    rows = read_rows(output)
    assert [row["id"] for row in rows] == ["a.jpg", "b.png"]
    for row in rows:
        assert set(row) == {"id", "report", "labels", "probabilities", "seconds"}
        assert isinstance(row["report"], str) and row["seconds"] > 0
        assert list(row["labels"]) == list(CHEXPERT_OBSERVATIONS)
        assert set(row["labels"].values()) <= {"positive", "negative"}
        assert all(0.0 <= probability <= 1.0 for probability in row["probabilities"].values())


def test_folder_with_subfolders_gives_one_study_per_subfolder(checkpoint, tmp_path):
    frontal = write_png(tmp_path / "scans" / "p1" / "1_frontal.png", seed=1)
    lateral = write_png(tmp_path / "scans" / "p1" / "2_lateral.png", seed=2)
    write_png(tmp_path / "scans" / "p2" / "only.png", seed=3)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans") == EXIT_OK
    rows = read_rows(output)
    assert [row["id"] for row in rows] == ["p1", "p2"]
    reporter = CdanReportPipeline(
        model=CdanForConditionalGeneration.from_pretrained(checkpoint).eval(),
        processor=processor_with_anonymisation_words(),
    )
    assert rows[0]["report"] == reporter((str(frontal), str(lateral)))[0]["generated_text"]


def test_group_by_file_splits_subfolders_into_single_views(checkpoint, tmp_path):
    write_png(tmp_path / "scans" / "p1" / "frontal.png", seed=1)
    write_png(tmp_path / "scans" / "p1" / "lateral.png", seed=2)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans", options=("--group_by", "file")) == EXIT_OK
    assert [row["id"] for row in read_rows(output)] == ["p1/frontal.png", "p1/lateral.png"]


def test_image_files_are_single_view_studies_named_by_their_path(checkpoint, tmp_path):
    image = write_png(tmp_path / "frontal.png")
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, image) == EXIT_OK
    assert [row["id"] for row in read_rows(output)] == [str(image)]


def test_csv_manifest_splits_paths_on_semicolons_and_bars_and_keeps_the_indication(
    checkpoint, tmp_path, generate_calls
):
    for index in range(4):
        write_png(tmp_path / "images" / f"{index}.png", seed=index)
    manifest = tmp_path / "studies.csv"
    manifest.write_text(
        "id,images,indication\ns1,images/0.png;images/1.png,Chest pain\ns2,images/2.png | images/3.png,\n"
    )
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, manifest) == EXIT_OK
    rows = read_rows(output)
    assert [(row["id"], row.get("indication")) for row in rows] == [("s1", "Chest pain"), ("s2", None)]
    assert [call["studies"] for call in generate_calls] == [2]


def test_jsonl_manifest_takes_a_list_of_paths_or_one_path(checkpoint, tmp_path):
    first, second = write_png(tmp_path / "a.png", seed=1), write_png(tmp_path / "b.png", seed=2)
    manifest = tmp_path / "studies.jsonl"
    lines = [
        {"id": 7, "images": [first.name, str(second)], "indication": "Cough"},
        {"id": "single", "images": first.name},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, manifest) == EXIT_OK
    rows = read_rows(output)
    assert [(row["id"], row.get("indication")) for row in rows] == [("7", "Cough"), ("single", None)]
    assert all("report" in row for row in rows)


def test_studies_are_batched(checkpoint, tmp_path, generate_calls):
    for index in range(5):
        write_png(tmp_path / "scans" / f"{index}.png", seed=index)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans", options=("--batch_size", "2")) == EXIT_OK
    assert [call["studies"] for call in generate_calls] == [2, 2, 1]
    assert len(read_rows(output)) == 5


def test_resume_skips_the_studies_already_reported(checkpoint, tmp_path, generate_calls):
    for index in range(3):
        write_png(tmp_path / "scans" / f"{index}.png", seed=index)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans" / "0.png", tmp_path / "scans" / "1.png") == EXIT_OK
    generate_calls.clear()
    assert run(checkpoint, output, *sorted((tmp_path / "scans").iterdir())) == EXIT_OK
    assert [call["studies"] for call in generate_calls] == [1]
    assert [Path(row["id"]).name for row in read_rows(output)] == ["0.png", "1.png", "2.png"]


def test_corrupt_image_gets_an_error_row_and_the_run_goes_on(checkpoint, tmp_path):
    write_png(tmp_path / "scans" / "a.png", seed=1)
    (tmp_path / "scans" / "b.png").write_bytes(b"not a png")
    write_png(tmp_path / "scans" / "c.png", seed=2)
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans", options=("--batch_size", "3")) == EXIT_SOME_STUDIES_FAILED
    rows = read_rows(output)
    assert [row["id"] for row in rows] == ["a.png", "b.png", "c.png"]
    assert set(rows[1]) == {"id", "error"}
    assert "Cannot read the image file" in rows[1]["error"] and "b.png" in rows[1]["error"]
    assert "report" in rows[0] and "report" in rows[2]


def test_resume_retries_the_error_rows(checkpoint, tmp_path, generate_calls):
    image = tmp_path / "scans" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"truncated")
    write_png(tmp_path / "scans" / "b.png")
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "scans") == EXIT_SOME_STUDIES_FAILED
    write_png(image)
    generate_calls.clear()
    assert run(checkpoint, output, tmp_path / "scans") == EXIT_OK
    assert [call["studies"] for call in generate_calls] == [1]
    rows = read_rows(output)
    assert [(row["id"], "error" in row) for row in rows] == [("a.png", True), ("b.png", False), ("a.png", False)]


def test_rows_are_flushed_after_each_batch(checkpoint, tmp_path, monkeypatch):
    for index in range(4):
        write_png(tmp_path / "scans" / f"{index}.png", seed=index)
    output = tmp_path / "reports.jsonl"
    original_generate = CdanForConditionalGeneration.generate
    seen_on_disk = []

    def generate_then_stop(self, *args, **kwargs):
        seen_on_disk.append(output.read_text().count("\n") if output.exists() else 0)
        if len(seen_on_disk) == 2:
            raise KeyboardInterrupt  # a kill during the second batch
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(CdanForConditionalGeneration, "generate", generate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, output, tmp_path / "scans", options=("--batch_size", "2"))
    assert seen_on_disk == [0, 2]


def test_incomplete_last_line_of_a_killed_run_is_dropped(checkpoint, tmp_path):
    write_png(tmp_path / "a.png")
    output = tmp_path / "reports.jsonl"
    output.write_text('{"id": "earlier", "report": "the heart is normal ."}\n{"id": "a.p')
    assert run(checkpoint, output, tmp_path / "a.png") == EXIT_OK
    assert [row["id"] for row in read_rows(output)] == ["earlier", str(tmp_path / "a.png")]


def test_decoding_options_reach_generate(checkpoint, tmp_path, generate_calls):
    write_png(tmp_path / "a.png")
    options = ("--num_beams", "1", "--max_length", "5", "--no_repeat_ngram_size", "2", "--ban_anonymisation_token")
    assert run(checkpoint, tmp_path / "reports.jsonl", tmp_path / "a.png", options=options) == EXIT_OK
    (call,) = generate_calls
    banned_ids = processor_with_anonymisation_words().anonymisation_token_ids()
    assert banned_ids
    assert {name: call["kwargs"][name] for name in ("num_beams", "max_length", "no_repeat_ngram_size")} == {
        "num_beams": 1,
        "max_length": 5,
        "no_repeat_ngram_size": 2,
    }
    assert call["kwargs"]["suppress_tokens"] == banned_ids


def test_no_labels_leaves_them_out(checkpoint, tmp_path):
    write_png(tmp_path / "a.png")
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, tmp_path / "a.png", options=("--no_labels",)) == EXIT_OK
    assert set(read_rows(output)[0]) == {"id", "report", "seconds"}


def test_duplicate_ids_are_refused_before_running(checkpoint, tmp_path, capsys, generate_calls):
    write_png(tmp_path / "a.png")
    manifest = tmp_path / "studies.csv"
    manifest.write_text("id,images\ns1,a.png\ns2,a.png\ns1,a.png\n")
    output = tmp_path / "reports.jsonl"
    assert run(checkpoint, output, manifest) == EXIT_USAGE_ERROR
    assert "'s1' appears more than once (again at" in capsys.readouterr().err
    assert generate_calls == [] and not output.exists()


@pytest.mark.parametrize(
    ("name", "content", "missing"),
    [
        ("studies.csv", "id,paths\ns1,a.png\n", "'images' column"),
        ("studies.jsonl", '{"images": ["a.png"]}\n', "'id' key"),
    ],
)
def test_manifest_without_id_or_images_is_refused(checkpoint, tmp_path, capsys, name, content, missing):
    manifest = tmp_path / name
    manifest.write_text(content)
    assert run(checkpoint, tmp_path / "reports.jsonl", manifest) == EXIT_USAGE_ERROR
    assert missing in capsys.readouterr().err


def test_missing_model_folder_is_refused(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    assert run(tmp_path / "no-such-model", tmp_path / "reports.jsonl", tmp_path / "a.png") == EXIT_USAGE_ERROR
    assert "Model folder not found" in capsys.readouterr().err


def test_missing_input_is_refused(checkpoint, tmp_path, capsys):
    assert run(checkpoint, tmp_path / "reports.jsonl", tmp_path / "absent.csv") == EXIT_USAGE_ERROR
    assert "Input not found" in capsys.readouterr().err


def test_threads_option_sets_torchs_threads(checkpoint, tmp_path, monkeypatch):
    requested = []
    monkeypatch.setattr("torch.set_num_threads", requested.append)
    write_png(tmp_path / "a.png")
    assert run(checkpoint, tmp_path / "reports.jsonl", tmp_path / "a.png", options=("--threads", "1")) == EXIT_OK
    assert requested == [1]


def test_manifest_context_and_prior_become_the_pipeline_study_dict(tmp_path):
    from cli_cdan import csv_studies, jsonl_studies

    jsonl = tmp_path / "studies.jsonl"
    jsonl.write_text(
        json.dumps({"id": "s1", "images": ["a.png"], "indication": "Cough", "history": "Smoker",
                    "view_positions": ["PA"], "prior_images": ["old/a.png"]}) + "\n"  # fmt: skip
        + json.dumps({"id": "s2", "images": ["b.png", "c.png"]}) + "\n"
    )
    first, second = jsonl_studies(jsonl)
    assert first.pipeline_input() == {
        "images": [str(tmp_path / "a.png")], "indication": "Cough", "history": "Smoker", "view_positions": ["PA"],
        "prior": {"images": [str(tmp_path / "old" / "a.png")]},
    }  # fmt: skip
    assert second.pipeline_input() == (str(tmp_path / "b.png"), str(tmp_path / "c.png"))
    csv_manifest = tmp_path / "studies.csv"
    csv_manifest.write_text("id,images,prior_images,view_positions\ns3,a.png;b.png,p.png|q.png,PA;LATERAL\n")
    (third,) = csv_studies(csv_manifest)
    assert third.prior_images == [str(tmp_path / "p.png"), str(tmp_path / "q.png")]
    assert third.view_positions == ["PA", "LATERAL"]


def test_a_manifest_list_field_of_the_wrong_type_is_refused(tmp_path):
    from cli_cdan import jsonl_studies

    manifest = tmp_path / "studies.jsonl"
    manifest.write_text(json.dumps({"id": "s1", "images": ["a.png"], "prior_images": [3]}) + "\n")
    with pytest.raises(ValueError, match="prior_images"):
        list(jsonl_studies(manifest))
