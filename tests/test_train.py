"""train.py: presets, CDAN's three-term loss, gradient accumulation, resume after SIGKILL, DDP on CPU (offline)."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import EvalPrediction, TrainerCallback

import evaluation_cdan
from labeler_cdan import label_report
from modeling_cdan import CdanForConditionalGeneration
from processing_cdan import CdanProcessor
import train
from test_modeling import tiny_config
from train import CdanTrainingArguments, parse_arguments
from trainer_cdan import (
    CdanDataCollator,
    CdanTrainer,
    ReportEmbedder,
    plot_training_curves,
    warm_up_visual_extractor,
)


REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
TINY_MODEL_FLAGS = [
    "--visual_extractor", "test_resnet", "--visual_extractor_pretrained", "False", "--image_size", "64",
    "--config_overrides", "d_model=32,encoder_ffn_dim=64,decoder_ffn_dim=64,encoder_layers=1,decoder_layers=1,"
    "encoder_attention_heads=4,decoder_attention_heads=4,reverse_attention_heads=4,dropout=0.0,attention_dropout=0.0",
    "--dataloader_num_workers", "0", "--report_to", "none", "--augment", "False",
]  # fmt: skip


@pytest.fixture(scope="module")
def r2gen_fixture(tmp_path_factory) -> Path:
    """An IU X-Ray folder in R2Gen layout: real reports (24/8/8 studies) with small real chest X-ray PNGs."""
    root = tmp_path_factory.mktemp("iu_xray_fixture")
    annotation = json.loads((SHARED_DATA / "iu_xray" / "annotation.json").read_text())
    sources = sorted((SHARED_DATA / "cxr_images" / "covid19_mhh_hannover" / "png").glob("*.png"))[:10]
    small_images = []
    for index, source in enumerate(sources):
        target = root / "sources" / f"{index}.png"
        target.parent.mkdir(exist_ok=True)
        Image.open(source).convert("L").resize((64, 64)).save(target)
        small_images.append(target)
    subset = {}
    for split, size in (("train", 24), ("val", 8), ("test", 8)):
        subset[split] = annotation[split][:size]
        for position, entry in enumerate(subset[split]):
            for view in (0, 1):
                image = root / "images" / entry["id"] / f"{view}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                image.write_bytes(small_images[(position + view) % len(small_images)].read_bytes())
    (root / "annotation.json").write_text(json.dumps(subset))
    return root


def training_command(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPOSITORY / "train.py"), "--preset", "iu_xray", "--data_dir", str(data_dir),
        "--dataset_cache_dir", str(data_dir / "prepared"), "--output_dir", str(output_dir),
        "--text_encoder", "offline-minilm", "--per_device_train_batch_size", "4", *TINY_MODEL_FLAGS, *extra,
    ]  # fmt: skip


def run_training(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Presets and arguments
# ---------------------------------------------------------------------------------------------------------------------


def test_iu_xray_preset_sets_the_published_recipe():
    _, data_args, training_args = parse_arguments(["--preset", "iu_xray", "--output_dir", "unused"])
    assert training_args.per_device_train_batch_size == 16
    assert (data_args.max_length, data_args.vocabulary_threshold, data_args.num_views) == (60, 3, 2)
    assert (training_args.num_train_epochs, training_args.seed) == (100, 9223)
    assert (training_args.learning_rate, training_args.visual_extractor_learning_rate) == (1e-4, 5e-5)
    assert training_args.metric_for_best_model == "BLEU-4"
    assert training_args.generation_num_beams == 3


def test_mimic_cxr_preset_sets_its_recipe():
    _, data_args, training_args = parse_arguments(["--preset", "mimic_cxr"])
    assert training_args.per_device_train_batch_size == 32
    assert (data_args.max_length, data_args.vocabulary_threshold, data_args.num_views) == (100, 10, 1)


def test_command_line_overrides_a_preset_value():
    model_args, data_args, training_args = parse_arguments(
        ["--preset", "iu_xray", "--per_device_train_batch_size", "4", "--max_length", "80", "--image_size", "128"]
    )
    assert training_args.per_device_train_batch_size == 4
    assert data_args.max_length == 80
    assert model_args.image_size == 128


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="Unknown --preset"):
        parse_arguments(["--preset", "chexpert"])


def test_help_lists_the_model_and_training_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    for argument in ("--preset", "--ablation", "--model_size", "--learning_rate", "--lambda_mlc", "--text_encoder"):
        assert argument in printed


def test_paper_sized_model_doubles_the_feed_forward_widths():
    model_args, data_args, _ = parse_arguments(["--preset", "iu_xray", "--model_size", "paper-82m"])
    config = train.build_config(model_args, data_args, vocab_size=764)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (4096, 4096)


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def test_collator_maps_uncertain_labels_by_the_configured_policy(tiny_training_parts):
    dataset, processor = tiny_training_parts
    row = {**dataset[0], "chexpert_labels": [1, 0, -1, -2] + [-2] * 10}
    u_ones = CdanDataCollator(processor, uncertain_label_as=1)([row])["disease_labels"][0, :4].tolist()
    u_zeros = CdanDataCollator(processor, uncertain_label_as=0)([row])["disease_labels"][0, :4].tolist()
    assert (u_ones, u_zeros) == ([1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def tiny_training_parts(r2gen_fixture):
    annotation = json.loads((r2gen_fixture / "annotation.json").read_text())
    rows = annotation["train"][:8]
    dataset = datasets.Dataset.from_dict(
        {
            "id": [row["id"] for row in rows],
            "images": [[str(r2gen_fixture / "images" / row["id"] / f"{view}.png") for view in (0, 1)] for row in rows],
            "findings": [row["report"] for row in rows],
            "chexpert_labels": [label_report(row["report"]) for row in rows],
            "reference_embedding": torch.randn(len(rows), 24, generator=torch.Generator().manual_seed(0)).tolist(),
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
                "findings": datasets.Value("string"),
                "chexpert_labels": datasets.List(datasets.Value("int8")),
                "reference_embedding": datasets.List(datasets.Value("float32")),
            }
        ),
    )
    processor = CdanProcessor.from_reports(dataset["findings"], threshold=1, image_size=64, num_views=2)
    return dataset, processor


def tiny_trainer(dataset, processor, output_dir, **argument_overrides) -> CdanTrainer:
    # ConvNeXt normalises per sample (LayerNorm); BatchNorm statistics would differ between one batch of 8 and two of
    # 4, which no loss scaling can make equal.
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(
        tiny_config(
            visual_extractor="test_convnext", vocab_size=len(processor.tokenizer), dropout=0.0, attention_dropout=0.0
        )
    )
    arguments = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
        r2gen_adam=False, optim="sgd", report_to="none", remove_unused_columns=False, save_strategy="no",
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, data_seed=0, logging_steps=1,
    )  # fmt: skip
    arguments.update(argument_overrides)
    return CdanTrainer(
        model=model,
        args=CdanTrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=CdanDataCollator(processor),
        processing_class=processor,
    )


def test_collator_takes_the_labels_of_the_models_observations_in_their_order(tiny_training_parts):
    dataset, processor = tiny_training_parts
    states = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # No Finding, Cardiomegaly, Pleural Effusion positive
    row = {**dataset[0], "chexpert_labels": states}
    observations = ["Pleural Effusion", "No Finding", "Edema"]
    batch = CdanDataCollator(processor, observation_names=observations)([row])
    assert batch["disease_labels"].tolist() == [[1.0, 1.0, 0.0]]


def test_collator_rejects_observations_the_data_does_not_label(tiny_training_parts):
    _, processor = tiny_training_parts
    with pytest.raises(ValueError, match="Nodule"):
        CdanDataCollator(processor, observation_names=["Nodule"])


def test_compute_loss_is_text_plus_mlc_plus_mse(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    trainer = tiny_trainer(dataset, processor, tmp_path, lambda_mlc=0.5, lambda_sc=2.0)
    batch = CdanDataCollator(processor)([dataset[index] for index in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    expected = (
        outputs.loss
        + 0.5 * nn.functional.binary_cross_entropy_with_logits(outputs.disease_logits, batch["disease_labels"])
        + 2.0 * nn.functional.mse_loss(outputs.visual_semantics, batch["reference_embeddings"])
    )
    torch.testing.assert_close(loss, expected)


def test_gradient_accumulation_gives_the_weights_of_one_large_batch(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    one_batch = tiny_trainer(dataset, processor, tmp_path / "a", per_device_train_batch_size=8)
    accumulated = tiny_trainer(
        dataset, processor, tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    assert one_batch.train().training_loss == pytest.approx(accumulated.train().training_loss, rel=1e-5)
    for (name, expected), actual in zip(one_batch.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(actual, expected, msg=name, rtol=1e-5, atol=1e-6)


def test_loss_terms_are_logged_separately(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    trainer = tiny_trainer(dataset, processor, tmp_path, max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"loss_text", "loss_mlc", "loss_sc"} <= set(entry) for entry in logged)
    first = logged[0]
    assert first["loss"] == pytest.approx(first["loss_text"] + first["loss_mlc"] + first["loss_sc"], rel=1e-3)


def test_training_curves_are_plotted(tmp_path):
    history = [{"step": 1, "loss": 3.0, "loss_text": 2.5}, {"step": 2, "epoch": 1.0, "eval_BLEU-4": 0.1}]
    path = plot_training_curves(history, tmp_path / "curves.png")
    assert path.exists() and Image.open(path).size[0] > 500


# ---------------------------------------------------------------------------------------------------------------------
# Semantic-consistency text encoder
# ---------------------------------------------------------------------------------------------------------------------


def test_offline_minilm_embeds_each_distinct_report_once(monkeypatch):
    embedder = ReportEmbedder("offline-minilm")
    assert embedder.embedding_dim == 384
    calls = []
    original = embedder.__call__
    monkeypatch.setattr(ReportEmbedder, "__call__", lambda self, reports: calls.append(len(reports)) or original(reports))
    dataset = datasets.Dataset.from_dict({"findings": ["the lungs are clear .", "no effusion .", "the lungs are clear ."]})
    embedded = embedder.add_embeddings(dataset)
    assert calls == [2]
    assert embedded["reference_embedding"][0] == embedded["reference_embedding"][2]
    assert len(embedded["reference_embedding"][1]) == 384


def test_unreachable_text_encoder_says_how_to_pass_a_local_one(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time otherwise
    with pytest.raises(OSError, match="--text_encoder"):
        ReportEmbedder("emilyalsentzer/Bio_ClinicalBERT")


# ---------------------------------------------------------------------------------------------------------------------
# End to end (subprocesses)
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_reaches_the_weights_of_an_uninterrupted_run(r2gen_fixture, tmp_path):
    # 24 training studies at batch 4 make 6 steps per epoch; a checkpoint every 4 steps lands mid-epoch 1.
    schedule = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "no",
                "--load_best_model_at_end", "False", "--do_predict", "False", "--save_total_limit", "5"]  # fmt: skip
    run_training(*training_command(r2gen_fixture, tmp_path / "uninterrupted", *schedule))

    interrupted = tmp_path / "interrupted"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        training_command(r2gen_fixture, interrupted, *schedule),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment,
    )  # fmt: skip
    checkpoint = interrupted / "checkpoint-4"
    deadline = time.monotonic() + 240
    while not (checkpoint / "trainer_state.json").exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model.safetensors").exists(), "the run finished before it was killed"

    run_training(*training_command(r2gen_fixture, interrupted, *schedule, "--resume_from_checkpoint", str(checkpoint)))
    expected, resumed = final_weights(tmp_path / "uninterrupted"), final_weights(interrupted)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], msg=name)


def test_two_process_ddp_on_cpu_keeps_ranks_in_sync(r2gen_fixture, tmp_path):
    output_dir = tmp_path / "ddp"
    command = training_command(
        r2gen_fixture, output_dir, "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "False", "--do_predict", "False",
    )  # fmt: skip
    # `--multi_gpu` selects accelerate's torchrun launcher; without GPUs train.py runs the ranks on CPU over gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    run_training(*launcher, *command[1:], timeout=400)
    checksums = [json.loads((output_dir / "weight_checksums" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert checksums[0] == checksums[1]
    assert checksums[0]["world_size"] == 2
    # 24 studies at 4 per process and 2 processes: 3 steps are half an epoch (a single process would be at 0.5 * 2)
    assert json.loads((output_dir / "train_results.json").read_text())["epoch"] == pytest.approx(1.0)


def test_trained_checkpoint_is_evaluated_and_loads_in_the_pipeline(r2gen_fixture, tmp_path):
    output_dir = tmp_path / "run"
    result = run_training(*training_command(r2gen_fixture, output_dir, "--num_train_epochs", "2"))
    for name in ("model.safetensors", "pipeline_cdan.py", "tokenizer.json", "README.md", "training_curves.png",
                 "training_log.csv", "test/predictions.jsonl", "test/metrics.json", "test/metrics.md"):  # fmt: skip
        assert (output_dir / name).exists(), name
    assert "| best constant report |" in result.stdout
    metrics = json.loads((output_dir / "test" / "metrics.json").read_text())
    assert set(metrics) == {"CDAN (this run)", "most frequent training report", "best constant report",
                            "CDAN, images shuffled"}  # fmt: skip
    from transformers import pipeline

    reporter = pipeline("image-to-text", model=str(output_dir), trust_remote_code=True)
    first_test_id = json.loads((r2gen_fixture / "annotation.json").read_text())["test"][0]["id"]
    images = tuple(str(r2gen_fixture / "images" / first_test_id / f"{view}.png") for view in (0, 1))
    generated = reporter(images)[0]["generated_text"]
    predictions = [json.loads(line) for line in (output_dir / "test" / "predictions.jsonl").read_text().splitlines()]
    assert generated == predictions[0]["generated"]


def test_cached_features_train_without_touching_the_frozen_extractor(tiny_training_parts, tmp_path):
    from trainer_cdan import cache_visual_features

    dataset, processor = tiny_training_parts
    trainer = tiny_trainer(dataset, processor, tmp_path, max_steps=2)
    extractor = trainer.model.model.encoder.visual_extractor
    extractor.requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in extractor.state_dict().items()}
    cached = cache_visual_features(trainer.model, processor, dataset, batch_size=4)
    assert len(cached[0]["visual_features"]) == 2 * 2 * 2  # two views of a 2x2 feature map
    trainer.train_dataset = cached
    trainer.train()
    for name, tensor in extractor.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    trained = trainer.model.model.encoder.visual_projection.weight
    assert not torch.equal(trained, tiny_trainer(dataset, processor, tmp_path).model.model.encoder.visual_projection.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Visual warm-up
# ---------------------------------------------------------------------------------------------------------------------


def warmup_arguments(output_dir: Path, *extra: str):
    return parse_arguments(
        ["--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
         "--visual_warmup_learning_rate", "0.01", "--disable_tqdm", "True", *TINY_MODEL_FLAGS, *extra]
    )  # fmt: skip


def test_visual_warmup_lowers_the_extractors_multilabel_loss(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    model_args, data_args, training_args = warmup_arguments(tmp_path, "--visual_warmup_epochs", "6")
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(tiny_config(vocab_size=len(processor.tokenizer)))
    warm_up_visual_extractor(model, processor, dataset, dataset, model_args, data_args, training_args)
    with (tmp_path / "visual_warmup" / "training_log.csv").open() as handle:
        validation_losses = [float(row["value"]) for row in csv.DictReader(handle) if row["key"] == "eval_loss"]
    assert len(validation_losses) == 6
    assert validation_losses[-1] < 0.8 * validation_losses[0]


def test_resumed_run_reads_the_warmed_up_extractor_instead_of_training_again(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    model_args, data_args, training_args = warmup_arguments(
        tmp_path, "--visual_warmup_epochs", "1", "--resume_from_checkpoint", "true"
    )
    saved = CdanForConditionalGeneration(tiny_config(vocab_size=len(processor.tokenizer))).model.encoder.visual_extractor
    (tmp_path / "visual_warmup").mkdir()
    save_file(saved.state_dict(), tmp_path / "visual_warmup" / "visual_extractor.safetensors")
    model = CdanForConditionalGeneration(tiny_config(vocab_size=len(processor.tokenizer)))
    metrics = warm_up_visual_extractor(model, processor, dataset, dataset, model_args, data_args, training_args)
    assert metrics == {}
    for name, tensor in model.model.encoder.visual_extractor.state_dict().items():
        assert torch.equal(tensor, saved.state_dict()[name]), name


SHORT_RUN = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False",
             "--do_predict", "False"]  # fmt: skip


def test_warmed_up_extractor_is_frozen_and_cached_for_report_training(r2gen_fixture, tmp_path):
    output_dir = tmp_path / "warm"
    run_training(*training_command(
        r2gen_fixture, output_dir, *SHORT_RUN, "--visual_warmup_epochs", "1", "--cache_visual_features", "True"
    ))  # fmt: skip
    warmed_up = load_file(output_dir / "visual_warmup" / "visual_extractor.safetensors")
    trained = final_weights(output_dir)
    for name, tensor in warmed_up.items():
        torch.testing.assert_close(trained[f"model.encoder.visual_extractor.{name}"], tensor, msg=name)


def test_bf16_autocast_trains_on_a_machine_without_gpus(r2gen_fixture, tmp_path):
    output_dir = tmp_path / "bf16"
    run_training(*training_command(r2gen_fixture, output_dir, *SHORT_RUN, "--bf16", "True"))
    with (output_dir / "training_log.csv").open() as handle:
        losses = [float(row["value"]) for row in csv.DictReader(handle) if row["key"] == "loss_text"]
    assert losses and all(math.isfinite(loss) for loss in losses)



# ---------------------------------------------------------------------------------------------------------------------
# Semantic consistency is decided by the model that is built
# ---------------------------------------------------------------------------------------------------------------------


def run_main_for_one_step(r2gen_fixture: Path, output_dir: Path, overrides: str, *extra: str) -> None:
    flags = list(TINY_MODEL_FLAGS)
    flags[flags.index("--config_overrides") + 1] += "," + overrides
    train.main([
        "--preset", "iu_xray", "--data_dir", str(r2gen_fixture), "--dataset_cache_dir", str(r2gen_fixture / "prepared"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--max_steps", "1",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False", "--do_predict", "False",
        "--logging_steps", "1", "--disable_tqdm", "True", *flags, *extra,
    ])  # fmt: skip


class FixedWidthEmbedder:
    """Stands in for the text encoder: 24-d embeddings of each report, and a record that it was used."""

    embedding_dim = 24
    instances = []

    def __init__(self, name_or_path: str):
        FixedWidthEmbedder.instances.append(self)

    def add_embeddings(self, dataset, text_column: str = "findings"):
        return dataset.add_column("reference_embedding", [[1.0] * 24] * len(dataset))


def logged_values(output_dir: Path, key: str) -> list[float]:
    with (output_dir / "training_log.csv").open() as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["key"] == key]


def test_semantic_consistency_switched_off_by_an_override_loads_no_text_encoder(r2gen_fixture, tmp_path, monkeypatch):
    FixedWidthEmbedder.instances = []
    monkeypatch.setattr(train, "ReportEmbedder", FixedWidthEmbedder)
    run_main_for_one_step(r2gen_fixture, tmp_path / "run", "use_semantic_consistency=False", "--ablation", "+RA+SC")
    assert FixedWidthEmbedder.instances == []
    assert logged_values(tmp_path / "run", "loss_sc") == [0.0]


def test_semantic_consistency_switched_on_by_an_override_trains_the_mse_term(r2gen_fixture, tmp_path, monkeypatch):
    FixedWidthEmbedder.instances = []
    monkeypatch.setattr(train, "ReportEmbedder", FixedWidthEmbedder)
    run_main_for_one_step(r2gen_fixture, tmp_path / "run", "use_semantic_consistency=True", "--ablation", "+RA")
    assert len(FixedWidthEmbedder.instances) == 1
    assert CdanForConditionalGeneration.from_pretrained(tmp_path / "run").config.semantic_dim == 24
    assert logged_values(tmp_path / "run", "loss_sc")[0] > 0


def test_text_encoder_of_another_width_than_the_checkpoint_is_rejected(r2gen_fixture, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    CdanForConditionalGeneration(tiny_config(semantic_dim=48)).save_pretrained(checkpoint)
    CdanProcessor.from_reports(["the lungs are clear ."], threshold=1, image_size=64).save_pretrained(checkpoint)
    monkeypatch.setattr(train, "ReportEmbedder", FixedWidthEmbedder)
    with pytest.raises(ValueError, match="width 48.*24 dimensions"):
        run_main_for_one_step(r2gen_fixture, tmp_path / "run", "dropout=0.0", "--model_name_or_path", str(checkpoint))


# ---------------------------------------------------------------------------------------------------------------------
# Validation metric, evaluation order and the optimiser recipe
# ---------------------------------------------------------------------------------------------------------------------


def test_validation_metrics_equal_the_final_evaluation_of_the_same_reports(tmp_path, monkeypatch):
    training_reports = ["The heart is normal in size. The lungs are clear."] * 3 + ["No pleural effusion."] * 3
    validation_reports = [
        "The heart is normal in size. There is a large right pleural effusion.",  # truncated by max_length=8
        "Mild cardiomegaly. The lungs are clear.",  # "mild" and "cardiomegaly" are not in the vocabulary
        "The lungs are clear. No pleural effusion.",
    ]
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"id": [f"t{i}" for i in range(6)], "findings": training_reports}),
            "validation": datasets.Dataset.from_dict({"id": ["v0", "v1", "v2"], "findings": validation_reports}),
        }
    )
    processor = CdanProcessor.from_reports(training_reports, threshold=2, max_length=8)
    generated = ["there is a pleural effusion .", "the heart is normal in size .", "the lungs are clear ."]
    token_ids = processor.tokenize_reports(generated, max_length=20)
    width = max(len(ids) for ids in token_ids) + 2  # padded as the Trainer pads generated ids across batches
    predictions = np.full((len(token_ids), width), -100, dtype=np.int64)
    for row, ids in enumerate(token_ids):
        predictions[row, : len(ids)] = ids
    labels = processor(text=validation_reports, return_tensors="np")["labels"]

    validation = train.build_compute_metrics(processor, dataset_dict["validation"])(
        EvalPrediction(predictions=predictions, label_ids=labels)
    )
    generated_texts = processor.batch_decode(predictions)
    monkeypatch.setattr(  # a model without the classifier: reports, no disease logits
        evaluation_cdan, "generate_reports_and_disease_logits", lambda *args, **kwargs: (generated_texts, None)
    )
    final = evaluation_cdan.evaluate_split(
        None, processor, dataset_dict, tmp_path / "evaluation", split="validation", with_meteor=False
    )["CDAN (this run)"]
    assert validation == final


def test_validation_metrics_refuse_predictions_for_another_number_of_studies():
    reports = ["The lungs are clear.", "No pleural effusion.", "The heart is normal."]
    processor = CdanProcessor.from_reports(reports, threshold=1)
    compute_metrics = train.build_compute_metrics(processor, datasets.Dataset.from_dict({"findings": reports}))
    predictions = np.array(processor.tokenize_reports(reports[:2], max_length=3))
    with pytest.raises(ValueError, match="2 generated reports for an evaluation set of 3 studies"):
        compute_metrics(EvalPrediction(predictions=predictions, label_ids=predictions))


def test_evaluation_reads_studies_in_dataset_order_when_training_groups_by_length(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    dataset = dataset.add_column("length", list(range(len(dataset))))
    trainer = tiny_trainer(
        dataset, processor, tmp_path, train_sampling_strategy="group_by_length", per_device_eval_batch_size=2
    )
    batches = trainer.get_eval_dataloader(dataset)
    read = [report for batch in batches for report in processor.batch_decode(batch["labels"])]
    assert read == processor.batch_decode(processor(text=dataset["findings"])["labels"])


class RecordingTrainer(CdanTrainer):
    """`CdanTrainer` that keeps a reference to each instance, to look at what `main()` built."""

    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.instances.append(self)


def test_main_gives_uncertain_label_as_to_the_training_collator(r2gen_fixture, tmp_path, monkeypatch):
    RecordingTrainer.instances = []
    monkeypatch.setattr(train, "CdanTrainer", RecordingTrainer)
    run_main_for_one_step(
        r2gen_fixture, tmp_path / "run", "use_semantic_consistency=False", "--uncertain_label_as", "0"
    )
    [trainer] = RecordingTrainer.instances
    row = {**trainer.train_dataset[0], "chexpert_labels": [-1] * 14}  # every observation UNCERTAIN
    targets = trainer.data_collator([row])["disease_labels"]
    assert targets.tolist() == [[0.0] * targets.shape[1]]


def main_and_extractor_learning_rates(optimizer, model) -> tuple[float, float]:
    """The learning rates of the parameter group of the visual extractor and of the group of the other parameters."""
    extractor_ids = {id(parameter) for parameter in model.model.encoder.visual_extractor.parameters()}
    rates = {}
    for group in optimizer.param_groups:
        kinds = {id(parameter) in extractor_ids for parameter in group["params"]}
        assert len(kinds) == 1, "a parameter group mixes the visual extractor with other parameters"
        rates[kinds.pop()] = group["lr"]
    return rates[False], rates[True]


def test_visual_extractor_trains_with_its_own_learning_rate(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts
    trainer = tiny_trainer(
        dataset, processor, tmp_path, r2gen_adam=True, learning_rate=1e-3, visual_extractor_learning_rate=2e-5
    )
    optimizer = trainer.create_optimizer()
    assert main_and_extractor_learning_rates(optimizer, trainer.model) == (1e-3, 2e-5)


class LearningRateRecorder(TrainerCallback):
    """Records (main, visual extractor) learning rates at the start of each optimizer step."""

    def __init__(self):
        self.rates = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.rates.append(main_and_extractor_learning_rates(optimizer, model))


def test_step_decay_multiplies_both_learning_rates_once_per_epoch(tiny_training_parts, tmp_path):
    dataset, processor = tiny_training_parts  # 8 studies in batches of 4: 2 optimizer steps per epoch
    trainer = tiny_trainer(
        dataset, processor, tmp_path, r2gen_adam=True, max_steps=-1, num_train_epochs=3, learning_rate=1e-3,
        visual_extractor_learning_rate=1e-4, lr_decay_epochs=1, lr_decay_gamma=0.5,
    )  # fmt: skip
    recorder = LearningRateRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    expected = [rate * 0.5**epoch for epoch in (0, 0, 1, 1, 2, 2) for rate in (1e-3, 1e-4)]
    assert [rate for step_rates in recorder.rates for rate in step_rates] == pytest.approx(expected, rel=1e-9)


def test_main_saves_the_decoding_options_in_generation_config(r2gen_fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "ReportEmbedder", FixedWidthEmbedder)
    run_main_for_one_step(
        r2gen_fixture, tmp_path / "run", "dropout=0.0", "--no_repeat_ngram_size", "3", "--length_penalty", "0.5"
    )
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert (saved["no_repeat_ngram_size"], saved["length_penalty"]) == (3, 0.5)


def test_diagnosis_prompt_and_mlc_loss_flags_build_the_config_and_feed_the_collator(
    r2gen_fixture, tmp_path, monkeypatch
):
    RecordingTrainer.instances = []
    monkeypatch.setattr(train, "CdanTrainer", RecordingTrainer)
    run_main_for_one_step(
        r2gen_fixture, tmp_path / "run", "use_semantic_consistency=False", "--diagnosis_prompt", "True",
        "--mlc_loss", "asymmetric",
    )  # fmt: skip
    [trainer] = RecordingTrainer.instances
    config = trainer.model.config
    assert (config.use_diagnosis_prompt, config.mlc_loss) == (True, "asymmetric")
    row = {**trainer.train_dataset[0], "chexpert_labels": [1] + [-1] * 13}  # POSITIVE, then UNCERTAIN
    states = trainer.data_collator([row])["diagnosis_states"]
    assert states.tolist() == [[1] + [2] * 13]
    assert "diagnosis_states" not in trainer.eval_data_collator([row])


def test_diagnosis_prompt_flag_is_refused_for_a_checkpoint_trained_without_it(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    model_args, data_args, _ = parse_arguments(["--model_name_or_path", str(tmp_path), "--diagnosis_prompt", "True"])
    with pytest.raises(ValueError, match="without the diagnosis prompt"):
        train.build_config(model_args, data_args, vocab_size=40)


@pytest.mark.parametrize("preset, options_on", [("demo", True), ("iu_xray", False), ("mimic_cxr", False)])
def test_only_the_demo_preset_switches_on_the_options_outside_the_paper(preset, options_on):
    model_args, _, _ = parse_arguments(["--preset", preset])
    assert (model_args.diagnosis_prompt, model_args.observation_sentences) == (options_on, options_on)
    assert model_args.mlc_loss is None


def test_observation_sentences_flag_saves_sentences_from_the_training_reports(r2gen_fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "ReportEmbedder", FixedWidthEmbedder)
    run_main_for_one_step(r2gen_fixture, tmp_path / "run", "dropout=0.0", "--observation_sentences", "True")
    sentences = json.loads((tmp_path / "run" / "config.json").read_text())["observation_sentences"]
    training_text = " ".join(
        train.CdanProcessor.from_pretrained(tmp_path / "run").clean_report(entry["report"])
        for entry in json.loads((r2gen_fixture / "annotation.json").read_text())["train"]
    )
    assert sentences and all(sentence in training_text for sentence in sentences.values())
