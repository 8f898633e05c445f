"""PriorRG's two stages through `train.py` (contrastive pre-training scored by retrieval recall, then report generation
from the stage-1 weights), its trainers, and CDAN with the context and prior switches from the command line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import (  # noqa: F401 (pytest fixtures)
    TINY_MODEL_FLAGS,
    r2gen_fixture,
    run_main_for_one_step,
    tiny_training_parts,
)

import train
from trainer_priorrg import ContrastivePretrainingCollator, PriorRGPretrainer, PriorRGTrainer, retrieval_recall

PRIORRG_FLAGS = [
    "--model_type", "priorrg", "--priorrg_size", "demo", "--vision_model", "none",
    "--context_text_encoder", "offline-minilm", "--image_size", "64", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "0", "--report_to", "none", "--augment", "False",
    "--text_encoder", "offline-minilm", "--disable_tqdm", "True", "--save_total_limit", "1",
]  # fmt: skip


def run_priorrg(fixture, output_dir, *extra: str):
    return train.main([
        "--preset", "iu_xray", "--data_dir", str(fixture), "--dataset_cache_dir", str(fixture / "prepared"),
        "--output_dir", str(output_dir), *PRIORRG_FLAGS, *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def stage_one(r2gen_fixture, tmp_path_factory):  # noqa: F811
    output_dir = tmp_path_factory.mktemp("priorrg_stage1")
    results = run_priorrg(
        r2gen_fixture, output_dir, "--stage", "pretrain", "--num_train_epochs", "2", "--learning_rate", "1e-3",
    )  # fmt: skip
    return output_dir, results


def test_retrieval_recall_counts_the_own_report_among_the_k_nearest():
    image = torch.eye(3)
    report = torch.tensor([[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])  # studies 0 and 1: the other's first
    recall = retrieval_recall(image, report, ks=(1, 2))
    assert recall["recall@1"] == pytest.approx(1 / 3) and recall["recall@2"] == 1.0
    assert recall["chance@1"] == pytest.approx(1 / 3) and recall["chance@2"] == pytest.approx(2 / 3)


def test_retrieval_recall_counts_reports_of_the_same_study_as_its_own():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    report = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # crossed
    assert retrieval_recall(image, report, ks=(1,))["recall@1"] == 0.0
    assert retrieval_recall(image, report, ks=(1,), study_ids=["s", "s"])["recall@1"] == 1.0


def test_stage_one_reports_retrieval_recall_against_chance(stage_one):
    output_dir, results = stage_one
    validation = results["validation"]
    assert set(validation) == {f"validation_{kind}@{k}" for kind in ("recall", "chance") for k in (1, 5, 10)}
    assert validation["validation_chance@1"] == pytest.approx(1 / 8)
    assert all(0.0 <= value <= 1.0 for value in validation.values())
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "context_tokenizer").is_dir()
    assert json.loads((output_dir / "retrieval_metrics.json").read_text()) == results
    log = (output_dir / "training_log.csv").read_text()
    assert "loss_contrastive" in log


@pytest.fixture(scope="module")
def stage_two(stage_one, r2gen_fixture, tmp_path_factory):  # noqa: F811
    stage_one_dir, _ = stage_one
    output_dir = tmp_path_factory.mktemp("priorrg_stage2")
    results = run_priorrg(
        r2gen_fixture, output_dir, "--stage", "finetune", "--model_name_or_path", str(stage_one_dir),
        "--num_train_epochs", "1", "--learning_rate", "1e-3", "--visual_extractor_learning_rate", "0",
        "--visual_warmup_epochs", "1",  # skipped: the stage-1 image path is not warmed up again
    )  # fmt: skip
    return output_dir, results


def test_stage_two_starts_from_the_stage_one_weights(stage_one, stage_two):
    (stage_one_dir, _), (output_dir, results) = stage_one, stage_two
    assert set(results) == {"PriorRG (this run)", "most frequent training report", "best constant report",
                            "PriorRG, images shuffled"}  # fmt: skip
    before, after = load_file(stage_one_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    for name in ("encoder.perceiver.latents", "encoder.context_encoder.projection.0.weight"):
        assert torch.equal(before[name], after[name]), name  # encoder learning rate 0: the stage-1 weights
    decoder_weight = "decoder.transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(before[decoder_weight], after[decoder_weight])
    predictions = (output_dir / "test" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and all("generated" in json.loads(line) for line in predictions)


def test_stage_two_does_not_warm_up_the_image_path_of_the_stage_one_checkpoint(stage_two):
    output_dir, _ = stage_two
    assert not (output_dir / "visual_warmup").exists()


def test_the_pipeline_reads_a_study_dict_with_context_and_prior(stage_two, r2gen_fixture):  # noqa: F811
    from transformers import pipeline

    from modeling_priorrg import PriorRGForConditionalGeneration
    from processing_cdan import CdanProcessor

    output_dir, _ = stage_two
    reporter = pipeline("image-to-text", model=str(output_dir), trust_remote_code=True)
    study_id = json.loads((r2gen_fixture / "annotation.json").read_text())["test"][0]["id"]
    views = [str(r2gen_fixture / "images" / study_id / f"{view}.png") for view in (0, 1)]
    prior = [str(r2gen_fixture / "images" / study_id / "1.png")] * 2
    study = {"images": views, "view_positions": ["PA", "LATERAL"], "indication": "cough and fever", "prior": prior}
    generated = reporter(study)[0]["generated_text"]

    model = PriorRGForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = CdanProcessor.from_pretrained(output_dir)
    inputs = processor(
        images=[views], view_positions=[["PA", "LATERAL"]], indication=["cough and fever"], history=[None],
        prior_images=[prior], prior_view_positions=[None],
    )  # fmt: skip
    with torch.no_grad():
        expected = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)[0]
        memory = model.encoder(**inputs).last_hidden_state
        without_context = model.encoder(**{k: v for k, v in inputs.items() if not k.startswith("context")})
    assert generated == expected
    assert not torch.allclose(memory, without_context.last_hidden_state)  # the indication is read


def test_stage_two_trainer_gives_the_decoder_and_the_rest_their_own_learning_rates(stage_one, tmp_path):
    from modeling_priorrg import PriorRGForConditionalGeneration

    model = PriorRGForConditionalGeneration.from_pretrained(stage_one[0])
    args = train.CdanTrainingArguments(
        output_dir=str(tmp_path), learning_rate=5e-5, visual_extractor_learning_rate=5e-6, report_to="none",
        use_cpu=True,
    )  # fmt: skip
    trainer = PriorRGTrainer(model=model, args=args)
    decoder_group, rest_group = trainer.create_optimizer().param_groups
    decoder_ids = {id(parameter) for parameter in model.decoder.parameters()}
    assert (decoder_group["lr"], rest_group["lr"]) == (5e-5, 5e-6)
    assert {id(parameter) for parameter in decoder_group["params"]} == decoder_ids
    assert id(model.encoder.perceiver.latents) in {id(parameter) for parameter in rest_group["params"]}


@pytest.mark.parametrize("trainer_class", [PriorRGPretrainer, PriorRGTrainer])
@pytest.mark.parametrize("reload", ["best_model", "resume"])
def test_trainer_reloads_every_weight_of_a_checkpoint_including_the_vision_attention(trainer_class, reload, tmp_path):
    from test_priorrg import tiny_priorrg

    model = tiny_priorrg()
    model.save_pretrained(tmp_path / "checkpoint-1")  # DINOv2's attention is saved under its original names
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the weights of a later step
    args = train.CdanTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = trainer_class(model=model, args=args)
    if reload == "best_model":
        trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
        trainer._load_best_model()
    else:
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, saved[name])]
    assert changed == []


def test_contrastive_collator_embeds_findings_behind_the_report_tag(stage_one):
    from processing_cdan import CdanProcessor
    from trainer_cdan import CdanDataCollator

    processor = CdanProcessor.from_pretrained(stage_one[0])
    collator = ContrastivePretrainingCollator(CdanDataCollator(processor, include_reports=False))
    image = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    rows = [
        {"id": study, "images": [image, image], "findings": "the heart is normal", "chexpert_labels": [0] * 14}
        for study in ("a", "b", "a")
    ]
    batch = collator(rows)
    tokens = processor.context_tokenizer.convert_ids_to_tokens(batch["report_input_ids"][0].tolist())
    assert tokens[:3] == ["[CLS]", "[FINDINGS]", "the"]
    assert batch["study_ids"].tolist() == [0, 1, 0]
    assert "labels" not in batch and "disease_labels" not in batch


def test_cdan_reads_context_and_prior_when_switched_on(r2gen_fixture, tmp_path):  # noqa: F811
    run_main_for_one_step(
        r2gen_fixture, tmp_path / "run", "use_semantic_consistency=False", "--clinical_context", "True",
        "--prior_study", "True", "--context_text_encoder", "offline-minilm", "--save_strategy", "steps",
        "--save_steps", "1",
    )  # fmt: skip
    config = json.loads((tmp_path / "run" / "checkpoint-1" / "config.json").read_text())
    assert config["use_clinical_context"] and config["use_prior_study"]
    assert config["context_text_config"]["hidden_size"] == 384  # all-MiniLM-L6-v2's width


def test_shuffled_indication_control_moves_only_the_clinical_text():
    import datasets

    from test_decoding_options import load_evaluate_script

    shuffle_clinical_context = load_evaluate_script().shuffle_clinical_context
    split = datasets.Dataset.from_dict(
        {"id": [f"s{i}" for i in range(6)], "indication": [f"cough {i}" for i in range(6)], "history": [None] * 6}
    )
    shuffled = shuffle_clinical_context(split, seed=0)
    assert shuffled["id"] == split["id"]
    assert sorted(shuffled["indication"]) == sorted(split["indication"])
    assert shuffled["indication"] != split["indication"]
    assert shuffled["indication"] == shuffle_clinical_context(split, seed=0)["indication"]


def test_demo_seeds_reads_the_row_of_either_model(monkeypatch):
    import importlib.util
    import sys

    from test_decoding_options import REPOSITORY

    monkeypatch.syspath_prepend(str(REPOSITORY / "scripts"))  # demo_seeds imports benchmark_utils beside it
    spec = importlib.util.spec_from_file_location("demo_seeds", REPOSITORY / "scripts" / "demo_seeds.py")
    demo_seeds = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo_seeds", demo_seeds)
    spec.loader.exec_module(demo_seeds)
    metric_value = demo_seeds.metric_value

    metrics = {"PriorRG (this run)": {"CE macro-F1": 0.3}, "PriorRG, images shuffled": {"CE macro-F1": 0.1}}
    assert metric_value(metrics, "(this run)", "CE macro-F1") == 0.3
    assert metric_value(metrics, "images shuffled", "CE macro-F1") == 0.1
    assert metric_value(metrics, "(this run)", "classifier macro-F1") != metric_value(
        metrics, "(this run)", "classifier macro-F1"
    )  # NaN: PriorRG has no classifier


def test_cdan_report_gives_priorrg_the_manifests_context_and_prior(stage_two, r2gen_fixture, tmp_path):  # noqa: F811
    from transformers import pipeline

    from cli_cdan import main as cdan_report

    output_dir, _ = stage_two
    study_id = json.loads((r2gen_fixture / "annotation.json").read_text())["test"][0]["id"]
    views = [str(r2gen_fixture / "images" / study_id / f"{view}.png") for view in (0, 1)]
    manifest = tmp_path / "studies.jsonl"
    record = {"id": "s1", "images": views, "indication": "fever", "prior_images": views[::-1]}
    manifest.write_text(json.dumps(record) + "\n")
    output = tmp_path / "reports.jsonl"
    assert cdan_report(["--model", str(output_dir), "--inputs", str(manifest), "--output", str(output)]) == 0
    (row,) = [json.loads(line) for line in output.read_text().splitlines()]
    reporter = pipeline("image-to-text", model=str(output_dir), trust_remote_code=True)
    expected = reporter({"images": views, "indication": "fever", "prior": {"images": views[::-1]}})[0]
    assert row["report"] == expected["generated_text"] and row["indication"] == "fever"


# ---------------------------------------------------------------------------------------------------------------------
# Image warm-up (the demo's stand-in for a pre-trained vision encoder)
# ---------------------------------------------------------------------------------------------------------------------


def warm_up_tiny_priorrg(dataset, processor, output_dir, *extra: str, **config_overrides):
    from test_priorrg import tiny_priorrg
    from test_train import warmup_arguments

    from trainer_cdan import warm_up_visual_extractor
    from trainer_priorrg import PriorRGImageWarmupModel

    model = tiny_priorrg(**config_overrides).train()
    model_args, data_args, training_args = warmup_arguments(output_dir, "--visual_warmup_epochs", "2", *extra)
    encoder = model.get_encoder()
    before = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    warmup_model = PriorRGImageWarmupModel(encoder, 14)
    warm_up_visual_extractor(model, processor, dataset, dataset, model_args, data_args, training_args, warmup_model)
    return model, before


def test_image_warmup_trains_the_image_path_and_not_the_context_encoder(tiny_training_parts, tmp_path):  # noqa: F811
    dataset, processor = tiny_training_parts
    model, before = warm_up_tiny_priorrg(dataset, processor, tmp_path)
    after = model.get_encoder().state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    for trained in ("vision_model.embeddings.patch_embeddings.projection.weight", "vision_projection.0.weight",
                    "perceiver.latents", "perceiver.layers.0.cross_attn.q_proj.weight",
                    "layerwise_fusion.projection.0.weight", "joint_projection.0.weight"):  # fmt: skip
        assert trained in changed, trained
    assert not [name for name in changed if name.startswith("context_encoder.")]
    assert not [name for name in changed if name.startswith("temporal_fusion.")]  # no prior in the warm-up


def test_image_warmup_leaves_a_frozen_vision_encoder_alone(tiny_training_parts, tmp_path):  # noqa: F811
    dataset, processor = tiny_training_parts
    model, before = warm_up_tiny_priorrg(dataset, processor, tmp_path, freeze_vision_model=True)
    after = model.get_encoder().state_dict()
    assert all(torch.equal(after[name], before[name]) for name in after if name.startswith("vision_model."))
    assert not torch.equal(after["perceiver.latents"], before["perceiver.latents"])


def test_image_warmup_saves_the_image_path_and_a_resumed_run_reads_it_back(tiny_training_parts, tmp_path):  # noqa: F811
    from test_priorrg import tiny_priorrg

    dataset, processor = tiny_training_parts
    warm_up_tiny_priorrg(dataset, processor, tmp_path)
    saved = load_file(tmp_path / "visual_warmup" / "image_encoder.safetensors")
    assert "perceiver.latents" in saved and "vision_projection.0.weight" in saved
    assert not [name for name in saved if name.startswith("context_encoder.")]

    resumed, _ = warm_up_tiny_priorrg(dataset, processor, tmp_path, "--resume_from_checkpoint", "true")
    fresh = tiny_priorrg().get_encoder().state_dict()
    for name, tensor in resumed.get_encoder().state_dict().items():
        expected = fresh[name] if name.startswith("context_encoder.") else saved[name]
        assert torch.equal(tensor, expected), name


def test_image_warmup_weights_of_another_architecture_are_refused():
    from test_priorrg import tiny_priorrg

    from trainer_priorrg import PriorRGImageWarmupModel

    other = PriorRGImageWarmupModel(tiny_priorrg(perceiver_depth=1).get_encoder(), 14)
    with pytest.raises(ValueError, match="do not fit this PriorRG encoder"):
        PriorRGImageWarmupModel(tiny_priorrg().get_encoder(), 14).load_warmed_state_dict(other.warmed_state_dict())
