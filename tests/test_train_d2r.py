"""D2R-Net through `train.py` on IU X-Ray with a detector's box file, CDAN with the lesion switches from the command
line, and the evaluation controls that feed a study another study's boxes."""

import json

import pytest
from test_train import logged_values, r2gen_fixture  # noqa: F401 (pytest fixture)

import train
from modeling_cdan import CdanForConditionalGeneration
from modeling_d2r import D2RNetForConditionalGeneration

D2R_FLAGS = [
    "--model_type", "d2r_net", "--d2r_size", "demo", "--visual_extractor", "test_resnet",
    "--visual_extractor_pretrained", "False", "--context_text_encoder", "offline-minilm", "--image_size", "64",
    "--config_overrides", "d_model=32,embed_size=24,encoder_ffn_dim=64,decoder_ffn_dim=64,encoder_layers=1,"
    "decoder_layers=1,encoder_attention_heads=4,decoder_attention_heads=4,relational_memory_heads=4",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0",
    "--report_to", "none", "--augment", "False", "--disable_tqdm", "True", "--save_total_limit", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def boxes_file(r2gen_fixture, tmp_path_factory):  # noqa: F811
    """One or two boxes on every 64 x 64 image of the fixture, as `scripts/predict_boxes.py` writes them."""
    annotation = json.loads((r2gen_fixture / "annotation.json").read_text())
    lines = []
    for split, entries in annotation.items():
        for position, entry in enumerate(entries):
            for image_index in (0, 1):
                boxes = [{"x_min": 4.0 + position, "y_min": 8.0, "x_max": 30.0, "y_max": 40.0 + image_index,
                          "label": "Nodule/Mass", "score": 0.9, "source": "pseudo"}]  # fmt: skip
                if position % 2:
                    boxes.append({"x_min": 34.0, "y_min": 20.0, "x_max": 60.0, "y_max": 50.0,
                                  "label": "Pleural effusion", "score": 0.8, "source": "pseudo"})  # fmt: skip
                record = {"study_id": entry["id"], "split": split, "image_index": image_index,
                          "image_size": [64, 64], "boxes": boxes}  # fmt: skip
                lines.append(json.dumps(record))
    path = tmp_path_factory.mktemp("boxes") / "boxes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(fixture, output_dir, *extra: str, flags=D2R_FLAGS):
    return train.main([
        "--preset", "iu_xray", "--data_dir", str(fixture), "--dataset_cache_dir", str(fixture / "prepared_boxes"),
        "--output_dir", str(output_dir), *flags, *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def d2r_run(r2gen_fixture, boxes_file, tmp_path_factory):  # noqa: F811
    output_dir = tmp_path_factory.mktemp("d2r")
    results = run(r2gen_fixture, output_dir, "--boxes_file", str(boxes_file), "--num_train_epochs", "1",
                  "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
                  "--load_best_model_at_end", "False")  # fmt: skip
    return output_dir, results


def test_d2r_trains_with_lm_gab_and_lab_and_is_evaluated_with_controls(d2r_run):
    output_dir, results = d2r_run
    assert set(results) == {"D2R-Net (this run)", "most frequent training report", "best constant report",
                            "D2R-Net, images shuffled"}  # fmt: skip
    assert all(value > 0 for value in logged_values(output_dir, "loss_gab"))
    assert all(value > 0 for value in logged_values(output_dir, "loss_lab"))
    model = D2RNetForConditionalGeneration.from_pretrained(output_dir)
    assert model.config.max_lesion_boxes == 10 and model.config.alignment_text_config["vocab_size"] > 30522


def test_d2r_without_boxes_says_where_boxes_come_from(r2gen_fixture, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="boxes_file"):
        run(r2gen_fixture, tmp_path / "run", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "False", "--do_predict", "False")  # fmt: skip


def test_cdan_with_the_lesion_switches_trains_the_alignment_terms(r2gen_fixture, boxes_file, tmp_path):  # noqa: F811
    from test_train import TINY_MODEL_FLAGS

    run(
        r2gen_fixture, tmp_path / "run", "--boxes_file", str(boxes_file), "--lesion_branch", "True",
        "--lesion_alignment", "True", "--context_text_encoder", "offline-minilm", "--text_encoder", "offline-minilm",
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "False", "--do_predict", "False", "--logging_steps", "1", "--disable_tqdm", "True",
        flags=TINY_MODEL_FLAGS,
    )  # fmt: skip
    assert logged_values(tmp_path / "run", "loss_lab")[0] > 0 and logged_values(tmp_path / "run", "loss_gab")[0] > 0
    config = CdanForConditionalGeneration.from_pretrained(tmp_path / "run").config
    assert config.use_lesion_branch and config.use_lesion_alignment and config.use_reverse_attention


def test_lesion_alignment_needs_the_lesion_branch():
    with pytest.raises(ValueError, match="add --lesion_branch"):
        train.parse_arguments(["--lesion_alignment", "True"])


def test_boxes_with_cached_visual_features_are_refused_early():
    with pytest.raises(ValueError, match="--cache_visual_features False"):
        train.parse_arguments(["--lesion_branch", "True"])  # the demo preset caches features


def test_shuffled_boxes_give_each_study_another_studys_boxes(r2gen_fixture, boxes_file):  # noqa: F811
    from data_cdan import load_cdan_dataset
    from scripts.evaluate import shuffle_boxes

    test = load_cdan_dataset("iu_xray", data_dir=r2gen_fixture, cache_dir=r2gen_fixture / "prepared_boxes",
                             max_images=2, boxes_file=str(boxes_file))["test"]  # fmt: skip
    shuffled = shuffle_boxes(test, seed=0)
    assert all(new != old for new, old in zip(shuffled["boxes"], test["boxes"]))  # no study keeps its own
    assert sorted(map(json.dumps, shuffled["boxes"])) == sorted(map(json.dumps, test["boxes"]))  # same boxes
    assert shuffled["findings"] == test["findings"]
