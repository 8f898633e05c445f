"""Decoding options of train.py and scripts/evaluate.py: trigram blocking and the length penalty (issue #12)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from modeling_cdan import CdanForConditionalGeneration
from test_modeling import study_batch, tiny_model
from train import apply_decoding_options, parse_arguments
from trainer_cdan import CdanTrainer


REPOSITORY = Path(__file__).resolve().parents[1]
CYCLE = (5, 6, 7)
"""Token ids the forced model writes in a loop: 5 6 7 5 6 7 ..., a repeated trigram."""


def force_cycle(model: CdanForConditionalGeneration) -> None:
    """Bias the logits so the next token follows the last one in `CYCLE` (the start token leads to 5)."""
    bias = torch.zeros(model.config.vocab_size, model.config.vocab_size)
    bias[:, CYCLE[0]] = 50.0
    for position, token in enumerate(CYCLE):
        bias[token] = 0.0
        bias[token, CYCLE[(position + 1) % len(CYCLE)]] = 50.0

    def add_bias(module, args, kwargs, output):
        last_tokens = kwargs["decoder_input_ids"][:, -output.logits.shape[1] :]
        output.logits = output.logits + bias[last_tokens]
        return output

    model.register_forward_hook(add_bias, with_kwargs=True)


def trigrams(sequence: list[int]) -> list[tuple[int, ...]]:
    return [tuple(sequence[start : start + 3]) for start in range(len(sequence) - 2)]


def has_repeated_trigram(sequence: list[int]) -> bool:
    return len(set(trigrams(sequence))) < len(trigrams(sequence))


def generate_beams(model: CdanForConditionalGeneration, **generation_kwargs) -> list[list[int]]:
    with torch.no_grad():
        generated = model.generate(
            pixel_values=study_batch(), num_beams=3, num_return_sequences=3, max_length=14, **generation_kwargs
        )
    return generated[:, 1:].tolist()  # without the decoder start token


def test_trigram_blocking_removes_the_repeated_trigrams_of_beam_search():
    model = tiny_model().eval()
    force_cycle(model)
    unblocked = generate_beams(model)
    assert unblocked[0][:7] == [5, 6, 7, 5, 6, 7, 5]
    assert all(has_repeated_trigram(beam) for beam in unblocked)
    model.generation_config.update(no_repeat_ngram_size=3)
    blocked = generate_beams(model)
    assert blocked[0][:5] == [5, 6, 7, 5, 6]  # the forced loop until it would repeat "5 6 7"
    assert not any(has_repeated_trigram(beam) for beam in blocked)


def test_validation_during_training_uses_the_options(tmp_path):
    _, _, training_args = parse_arguments(["--output_dir", str(tmp_path), "--no_repeat_ngram_size", "3", "--use_cpu",
                                           "True", "--report_to", "none"])  # fmt: skip
    model = tiny_model().eval()
    force_cycle(model)
    apply_decoding_options(model, training_args)
    trainer = CdanTrainer(model=model, args=training_args, eval_dataset=[])  # prediction_step only: no data needed
    _, generated, _ = trainer.prediction_step(model, {"pixel_values": study_batch()}, prediction_loss_only=False)
    reports = [[token for token in report if token not in (0, 1, 2)] for report in generated.tolist()]  # no pad/bos/eos
    assert all(report[:5] == [5, 6, 7, 5, 6] and not has_repeated_trigram(report) for report in reports)


def test_options_set_the_generation_config_and_are_saved(tmp_path):
    _, _, training_args = parse_arguments(
        ["--output_dir", str(tmp_path), "--no_repeat_ngram_size", "3", "--length_penalty", "0.5"]
    )
    assert (training_args.no_repeat_ngram_size, training_args.length_penalty) == (3, 0.5)
    model = tiny_model()
    apply_decoding_options(model, training_args)
    assert (model.generation_config.no_repeat_ngram_size, model.generation_config.length_penalty) == (3, 0.5)
    model.save_pretrained(tmp_path / "checkpoint")
    saved = json.loads((tmp_path / "checkpoint" / "generation_config.json").read_text())
    assert (saved["no_repeat_ngram_size"], saved["length_penalty"]) == (3, 0.5)
    assert (saved["num_beams"], saved["max_length"]) == (3, 60)
    reloaded = CdanForConditionalGeneration.from_pretrained(tmp_path / "checkpoint")
    assert (reloaded.generation_config.no_repeat_ngram_size, reloaded.generation_config.length_penalty) == (3, 0.5)


def test_negative_ngram_size_is_rejected():
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        parse_arguments(["--no_repeat_ngram_size", "-1"])


def test_without_the_options_generation_is_unchanged(tmp_path):
    for preset in ("demo", "iu_xray", "mimic_cxr"):
        _, _, training_args = parse_arguments(["--preset", preset, "--output_dir", str(tmp_path)])
        assert (training_args.no_repeat_ngram_size, training_args.length_penalty) == (None, None)
    model = tiny_model().eval()
    before_config = model.generation_config.to_dict()
    with torch.no_grad():
        before = model.generate(pixel_values=study_batch(), num_beams=3, max_length=14)
    apply_decoding_options(model, training_args)
    assert model.generation_config.to_dict() == before_config
    with torch.no_grad():
        after = model.generate(pixel_values=study_batch(), num_beams=3, max_length=14)
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path / "checkpoint")
    saved = json.loads((tmp_path / "checkpoint" / "generation_config.json").read_text())
    assert "no_repeat_ngram_size" not in saved and "length_penalty" not in saved


def load_evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPOSITORY / "scripts" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    return evaluate_script


def evaluate_generation_kwargs(monkeypatch, tmp_path, *flags: str) -> dict:
    """The generation keywords scripts/evaluate.py gives `evaluate_split` (model, data and scoring stubbed)."""
    evaluate_script = load_evaluate_script()
    received = {}

    def record(model, processor, dataset_dict, output_dir, **kwargs):
        received.update(kwargs)
        return {}

    monkeypatch.setattr(evaluate_script, "load_report_model", lambda path: tiny_model())
    monkeypatch.setattr(evaluate_script.CdanProcessor, "from_pretrained", lambda path: None)
    monkeypatch.setattr(evaluate_script, "load_cdan_dataset", lambda name, data_dir: {})
    monkeypatch.setattr(evaluate_script, "evaluate_split", record)
    monkeypatch.setattr(evaluate_script, "markdown_table", lambda results, published: "")
    evaluate_script.main(["--model", str(tmp_path), *flags])
    return {name: received[name] for name in ("num_beams", "max_length", "no_repeat_ngram_size", "length_penalty")
            if name in received}  # fmt: skip


def test_evaluate_script_passes_the_options_to_generation(monkeypatch, tmp_path):
    flags = ("--no_repeat_ngram_size", "3", "--length_penalty", "0.5")
    assert evaluate_generation_kwargs(monkeypatch, tmp_path, *flags) == {
        "num_beams": 3, "no_repeat_ngram_size": 3, "length_penalty": 0.5
    }  # fmt: skip
    assert evaluate_generation_kwargs(monkeypatch, tmp_path) == {"num_beams": 3}  # the checkpoint's generation_config
