"""Grounded sentences: `pipeline(..., return_grounding=True)` on D2R-Net, the saved checkpoint in a fresh process, the
`--grounding` command line, `scripts/draw_grounding.py` and `scripts/evaluate_grounding.py` (tiny models, CPU)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cdan_lesion_branch import lesion_cdan
from test_d2r import TINY_TEXT_CONFIG, tiny_d2r_config
from test_pipeline import REPOSITORY, run_in_fresh_python, tiny_processor, tiny_report_model
from transformers.testing_utils import CaptureLogger

import pipeline_cdan
from cli_cdan import EXIT_USAGE_ERROR
from cli_cdan import main as cli_main
from consistency_cdan import split_sentences
from d2r_modules import alignment_text_inputs
from image_processing_cdan import CdanImageProcessor
from modeling_d2r import D2RNetForConditionalGeneration
from pipeline_cdan import CdanReportPipeline, save_checkpoint
from processing_cdan import CdanProcessor, build_context_tokenizer
from trainer_cdan import offline_text_encoder_path

sys.path.insert(0, str(REPOSITORY / "scripts"))
import draw_grounding
import evaluate_grounding

REPORTS = [
    "The heart is normal in size. The lungs are clear.",
    "Small left pleural effusion. No pneumothorax. Mild cardiomegaly.",
]
MAX_BOXES = 3


@pytest.fixture(scope="module")
def processor() -> CdanProcessor:
    return CdanProcessor.from_reports(
        REPORTS * 3,
        threshold=1,
        image_processor=CdanImageProcessor(image_size=64, num_views=2),
        context_tokenizer=build_context_tokenizer(offline_text_encoder_path()),
        max_lesion_boxes=MAX_BOXES,
    )


def grounding_model(processor: CdanProcessor, **overrides) -> D2RNetForConditionalGeneration:
    """A tiny D2R-Net whose alignment text encoder reads the processor's context tokenizer."""
    torch.manual_seed(0)
    config = tiny_d2r_config(
        vocab_size=len(processor.tokenizer),
        max_lesion_boxes=MAX_BOXES,
        alignment_text_config={**TINY_TEXT_CONFIG, "vocab_size": len(processor.context_tokenizer)},
        init_std=0.5,
        **overrides,
    )
    model = D2RNetForConditionalGeneration(config).eval()
    model.generation_config.update(max_length=14, num_beams=2)
    return model


@pytest.fixture(scope="module")
def model(processor) -> D2RNetForConditionalGeneration:
    return grounding_model(processor)


@pytest.fixture(scope="module")
def reporter(model, processor) -> CdanReportPipeline:
    return CdanReportPipeline(model=model, processor=processor)


@pytest.fixture(scope="module")
def checkpoint(model, processor, tmp_path_factory) -> Path:
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("d2r_checkpoint"))


def image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def two_view_study(seed: int = 0) -> dict:
    """Views of different sizes (80 x 100 and 90 x 60) with valid boxes only: row `k` of a view is its box `k`."""
    return {
        "images": [image(seed, 80, 100), image(seed + 1, 90, 60)],
        "boxes": [[[5, 5, 40, 30], [50, 10, 95, 70]], [[1, 2, 30, 40], [20, 45, 58, 88], [3, 60, 25, 85]]],
    }


def expected_scores(model, processor, study: dict, report: str) -> torch.Tensor:
    """`model.alignment.ground` of the report's sentences on the study's lesion rows, computed here directly."""
    inputs = processor(images=[study["images"]], boxes=[study["boxes"]], return_tensors="pt")
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(
            pixel_values=inputs["pixel_values"],
            lesion_boxes=inputs["lesion_boxes"],
            lesion_box_mask=inputs["lesion_box_mask"],
        )
    text = alignment_text_inputs(processor.context_tokenizer, [report], max_sentences=32)
    return model.alignment.ground(
        encoder_outputs.lesion_embeddings[0],
        encoder_outputs.lesion_mask[0],
        text["sentence_input_ids"][0],
        text["sentence_attention_mask"][0],
    )  # (S, V*K)


def scores_by_box(grounding: list[dict]) -> list[dict[tuple[int, int], float]]:
    return [{(entry["view"], entry["index"]): entry["score"] for entry in item["boxes"]} for item in grounding]


def test_grounding_scores_are_the_alignment_scores_of_each_given_box(reporter, model, processor):
    study = two_view_study()
    (result,) = reporter(study, return_grounding=True)
    expected = expected_scores(model, processor, study, result["generated_text"])
    rows = {(0, 0): 0, (0, 1): 1, (1, 0): MAX_BOXES, (1, 1): MAX_BOXES + 1, (1, 2): MAX_BOXES + 2}  # (view, index)
    sentences = split_sentences(result["generated_text"])
    assert [item["sentence"] for item in result["grounding"]] == sentences and sentences
    for number, scores in enumerate(scores_by_box(result["grounding"])):
        assert scores.keys() == rows.keys()
        for key, row in rows.items():
            assert scores[key] == pytest.approx(expected[number, row].item(), rel=1e-5, abs=1e-7)


def test_grounding_boxes_are_in_pixels_of_the_given_images(reporter):
    study = {
        "images": [image(3, 80, 100), image(4, 90, 60)],
        # view 0: a valid box, an inverted one (dropped), one crossing the right border (clipped to x = 100)
        "boxes": [[[5, 5, 40, 30], [60, 50, 20, 10], [70.5, 12.25, 130, 66]], [[1.5, 2, 30, 40.75]]],
    }
    (result,) = reporter(study, return_grounding=True)
    for item in result["grounding"]:
        boxes = {(entry["view"], entry["index"]): entry["box"] for entry in item["boxes"]}
        assert boxes == {(0, 0): [5, 5, 40, 30], (0, 2): [70.5, 12.25, 100, 66], (1, 0): [1.5, 2, 30, 40.75]}


def test_boxes_past_max_lesion_boxes_keep_the_highest_scores(reporter):
    detector_boxes = [
        {"x_min": 4.0 * index, "y_min": 5.0, "x_max": 4.0 * index + 20, "y_max": 40.0, "label": "Nodule",
         "score": score, "source": "pseudo"}
        for index, score in enumerate([0.1, 0.9, 0.5, 0.7])
    ]  # fmt: skip
    study = {"images": [image(5, 80, 100), image(6, 80, 100)], "boxes": [detector_boxes, None]}
    (result,) = reporter(study, return_grounding=True)
    for item in result["grounding"]:
        assert sorted((entry["view"], entry["index"]) for entry in item["boxes"]) == [(0, 1), (0, 2), (0, 3)]


def test_each_sentence_lists_its_boxes_best_first_with_scores_summing_to_one(reporter):
    (result,) = reporter(two_view_study(seed=7), return_grounding=True)
    for item in result["grounding"]:
        scores = [entry["score"] for entry in item["boxes"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_a_view_repeated_to_fill_the_study_sums_the_scores_of_its_two_rows(reporter, model, processor):
    study = {"images": [image(8, 70, 70)], "boxes": [[[5, 5, 40, 30], [30, 20, 60, 65]]]}
    (result,) = reporter(study, return_grounding=True)
    expected = expected_scores(model, processor, study, result["generated_text"])
    for number, scores in enumerate(scores_by_box(result["grounding"])):
        assert scores.keys() == {(0, 0), (0, 1)}
        for index in (0, 1):
            expected_sum = expected[number, index] + expected[number, MAX_BOXES + index]
            assert scores[(0, index)] == pytest.approx(expected_sum.item(), rel=1e-5)


def test_grounding_leaves_the_report_unchanged(reporter):
    study = two_view_study(seed=9)
    (plain,) = reporter(study)
    (grounded,) = reporter(study, return_grounding=True)
    assert grounded["generated_text"] == plain["generated_text"]


def test_a_batch_grounds_each_study_on_its_own_boxes(reporter):
    studies = [two_view_study(seed=10), {"images": [image(12, 64, 64)], "boxes": [[[2, 3, 30, 33]]]}]
    batch = reporter(studies, batch_size=2, return_grounding=True)
    alone = [reporter(study, return_grounding=True) for study in studies]
    for batched_result, (single_result,) in zip(batch, alone):
        (batched_result,) = batched_result
        assert batched_result["generated_text"] == single_result["generated_text"]
        for batched_scores, single_scores in zip(
            scores_by_box(batched_result["grounding"]), scores_by_box(single_result["grounding"])
        ):
            assert batched_scores.keys() == single_scores.keys()
            for key, score in single_scores.items():
                assert batched_scores[key] == pytest.approx(score, rel=1e-4, abs=1e-6)


def test_cdan_with_the_lesion_alignment_grounds_its_sentences_on_the_given_boxes(processor):
    model = lesion_cdan(
        vocab_size=len(processor.tokenizer),
        use_lesion_alignment=True,
        alignment_text_config={**TINY_TEXT_CONFIG, "vocab_size": len(processor.context_tokenizer)},
    )
    model.generation_config.update(max_length=14, num_beams=2)
    reporter = CdanReportPipeline(model=model, processor=processor)
    study = two_view_study(seed=15)
    (result,) = reporter(study, return_grounding=True)
    expected = expected_scores(model, processor, study, result["generated_text"])
    assert len(result["grounding"]) == len(split_sentences(result["generated_text"]))
    for number, scores in enumerate(scores_by_box(result["grounding"])):
        assert scores[(1, 2)] == pytest.approx(expected[number, MAX_BOXES + 2].item(), rel=1e-5, abs=1e-7)


def test_grounding_without_the_studys_boxes_says_how_to_give_them(reporter):
    with pytest.raises(ValueError, match='"boxes"'):
        reporter({"images": [image(0, 64, 64)]}, return_grounding=True)


def test_grounding_needs_a_model_with_alignment(processor):
    reporter = CdanReportPipeline(model=grounding_model(processor, use_alignment=False), processor=processor)
    with pytest.raises(ValueError, match="image-text alignment"):
        reporter(two_view_study(), return_grounding=True)


def test_a_model_without_a_lesion_branch_ignores_boxes_with_a_warning():
    processor = tiny_processor()
    reporter = CdanReportPipeline(model=tiny_report_model(processor), processor=processor)
    views = [image(0, 64, 64), image(1, 64, 64)]
    with CaptureLogger(pipeline_cdan.logger) as captured:
        (with_boxes,) = reporter({"images": views, "boxes": [[[1, 1, 20, 20]], []]})
    assert "['boxes']" in captured.out
    assert with_boxes == reporter(tuple(views))[0]


def test_saved_d2r_checkpoint_grounds_in_a_fresh_process(checkpoint, reporter, tmp_path):
    study = two_view_study(seed=11)
    np.save(tmp_path / "view0.npy", study["images"][0])
    np.save(tmp_path / "view1.npy", study["images"][1])
    code = f"""
        import json
        import sys
        sys.path.append({str(REPOSITORY)!r})  # boxes need the installed library's `data_cdan`; searched last
        import numpy as np
        from transformers import pipeline
        reporter = pipeline("image-to-text", model={str(checkpoint)!r}, trust_remote_code=True)
        views = [np.load({str(tmp_path / "view0.npy")!r}), np.load({str(tmp_path / "view1.npy")!r})]
        (result,) = reporter({{"images": views, "boxes": {study["boxes"]!r}}}, return_grounding=True)
        print(json.dumps({{"class": type(reporter).__name__, "result": result}}))
    """
    outputs = run_in_fresh_python(code, cwd=tmp_path)
    (expected,) = reporter(study, return_grounding=True)
    assert outputs["class"] == "CdanReportPipeline"
    assert outputs["result"]["generated_text"] == expected["generated_text"]
    for fresh, here in zip(scores_by_box(outputs["result"]["grounding"]), scores_by_box(expected["grounding"])):
        assert fresh.keys() == here.keys()
        assert all(fresh[key] == pytest.approx(score, rel=1e-5) for key, score in here.items())


def write_png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_cli_writes_the_grounding_of_manifest_boxes(checkpoint, reporter, tmp_path):
    study = two_view_study(seed=13)
    images = [write_png(tmp_path / f"view{index}.png", array) for index, array in enumerate(study["images"])]
    manifest = tmp_path / "studies.jsonl"
    manifest.write_text(
        json.dumps({"id": "boxed", "images": images, "boxes": study["boxes"]}) + "\n"
        + json.dumps({"id": "unboxed", "images": images}) + "\n"
    )  # fmt: skip
    output = tmp_path / "reports.jsonl"
    cli_main(["--model", str(checkpoint), "--inputs", str(manifest), "--output", str(output), "--grounding"])
    boxed, unboxed = [json.loads(line) for line in output.read_text().splitlines()]
    (expected,) = reporter({"images": images, "boxes": study["boxes"]}, return_grounding=True)
    assert boxed["report"] == expected["generated_text"]
    written, wanted = scores_by_box(boxed["grounding"]), scores_by_box(expected["grounding"])
    assert [sentence.keys() for sentence in written] == [sentence.keys() for sentence in wanted]
    for written_scores, wanted_scores in zip(written, wanted):
        assert written_scores == pytest.approx(wanted_scores)
    assert unboxed["id"] == "unboxed" and '"boxes"' in unboxed["error"]


def test_cli_refuses_manifest_boxes_that_are_not_one_list_per_image(checkpoint, tmp_path):
    image_path = write_png(tmp_path / "view.png", image(0, 64, 64))
    manifest = tmp_path / "studies.jsonl"
    manifest.write_text(json.dumps({"id": "a", "images": [image_path], "boxes": {"x_min": 1}}) + "\n")
    status = cli_main(["--model", str(checkpoint), "--inputs", str(manifest), "--output", str(tmp_path / "out.jsonl")])
    assert status == EXIT_USAGE_ERROR


def test_draw_grounding_colours_each_sentences_top_box(checkpoint, tmp_path):
    study = two_view_study(seed=14)
    images = [write_png(tmp_path / f"view{index}.png", array) for index, array in enumerate(study["images"])]
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(study["boxes"]))
    output_dir = tmp_path / "drawn"
    result = draw_grounding.main(
        ["--model", str(checkpoint), "--images", *images, "--boxes", str(boxes_file), "--output_dir", str(output_dir)]
    )
    assert (output_dir / "legend.txt").read_text().count("\n") == len(result["grounding"])
    for key, numbers in draw_grounding.top_boxes(result["grounding"]).items():
        view, index = key
        drawn = np.asarray(Image.open(output_dir / f"view{view}.png"))
        x_min, y_min, x_max, y_max = (round(value) for value in study["boxes"][view][index])
        colour = draw_grounding.sentence_colour(numbers[0])
        assert tuple(drawn[y_max, (x_min + x_max) // 2]) == colour  # the bottom edge of the outline
        assert tuple(drawn[(y_min + y_max) // 2, x_min]) == colour  # the left edge


def test_a_sentence_scores_a_hit_when_its_top_box_overlaps_a_target_of_its_view():
    targets = [(1, evaluate_grounding.LesionBox(10, 10, 50, 50, label="Pleural Effusion"))]
    candidates = [
        {"view": 1, "box": [12, 12, 48, 52], "score": 0.6},  # IoU 0.8 with the target, centre inside
        {"view": 0, "box": [10, 10, 50, 50], "score": 0.3},  # the target's coordinates on another view
        {"view": 1, "box": [60, 60, 90, 90], "score": 0.1},
    ]
    scores = evaluate_grounding.score_sentence(candidates, targets, iou_threshold=0.3)
    assert scores == {"hits": 1.0, "chance_hits": pytest.approx(1 / 3), "pointing_hits": 1.0,
                      "chance_pointing_hits": pytest.approx(1 / 3)}  # fmt: skip


def test_a_sentence_misses_when_its_top_box_is_on_another_view():
    targets = [(0, evaluate_grounding.LesionBox(10, 10, 50, 50, label="Nodule"))]
    candidates = [
        {"view": 1, "box": [10, 10, 50, 50], "score": 0.7},  # the target's coordinates on the other view
        {"view": 0, "box": [12, 10, 50, 50], "score": 0.3},
    ]
    scores = evaluate_grounding.score_sentence(candidates, targets)
    assert scores["hits"] == 0.0 and scores["pointing_hits"] == 0.0 and scores["chance_hits"] == 0.5


def test_only_sentences_positive_for_an_observation_with_a_true_box_are_counted():
    true_boxes = evaluate_grounding.true_boxes_by_observation(
        [[{"x_min": 10.0, "y_min": 10.0, "x_max": 50.0, "y_max": 50.0, "label": "Pleural Effusion", "score": 1.0,
           "source": "annotated"}], []]
    )  # fmt: skip
    grounding = [
        {"sentence": "small left pleural effusion .", "boxes": [{"view": 0, "box": [10, 10, 50, 50], "score": 1.0}]},
        {"sentence": "no pleural effusion .", "boxes": [{"view": 0, "box": [10, 10, 50, 50], "score": 1.0}]},
        {"sentence": "mild cardiomegaly .", "boxes": [{"view": 0, "box": [10, 10, 50, 50], "score": 1.0}]},
    ]
    overall, per_observation = evaluate_grounding.GroundingTally(), {}
    evaluate_grounding.tally_grounding(grounding, true_boxes, overall, per_observation, iou_threshold=0.3)
    assert overall.sentences == 1 and overall.hits == 1.0
    assert list(per_observation) == ["Pleural Effusion"]


def test_evaluate_grounding_runs_on_the_demo_test_split(checkpoint, tmp_path):
    summary = evaluate_grounding.main(
        ["--model", str(checkpoint), "--max_samples", "6", "--num_beams", "1", "--output_dir", str(tmp_path)]
    )
    written = json.loads((tmp_path / "grounding.json").read_text())
    assert written["studies_with_true_boxes"] == 6 and written["input_boxes"] == "true boxes"
    for kind in evaluate_grounding.SENTENCE_KINDS:
        rates = written[kind]
        assert rates == summary[kind]
        assert 0 <= rates["top_box_hit_rate"] <= 1 and 0 <= rates["chance_hit_rate"] <= 1
    assert written["reference"]["sentences"] > 0, "the demo's reference reports name boxed observations"
    # With the true boxes as input, a random box hits a target of the sentence's observation more often than never
    assert written["reference"]["chance_hit_rate"] > 0
    assert "| reference |" in (tmp_path / "grounding.md").read_text()


def test_input_boxes_from_a_box_file_are_rescaled_to_each_image(tmp_path):
    box = {"x_min": 10.0, "y_min": 20.0, "x_max": 50.0, "y_max": 60.0, "label": "Nodule/Mass", "score": 0.8,
           "source": "pseudo"}  # fmt: skip
    record = {"study_id": "s1", "split": "test", "image_index": 0, "image_size": [100, 100], "boxes": [box]}
    box_file = tmp_path / "boxes.jsonl"
    box_file.write_text(json.dumps(record) + "\n")
    images = [Image.new("L", (200, 50)), Image.new("L", (64, 64))]
    study_boxes = evaluate_grounding.input_boxes_from_file(evaluate_grounding.read_box_file(box_file), "s1", images)
    (first,) = study_boxes[0]
    assert [first[name] for name in ("x_min", "y_min", "x_max", "y_max")] == [20.0, 10.0, 100.0, 30.0]
    assert study_boxes[1] == []  # a view the file does not have
