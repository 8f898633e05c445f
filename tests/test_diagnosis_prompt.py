"""Diagnosis-guided decoding (`CdanConfig.use_diagnosis_prompt`): the classifier's decisions as decoder prompt vectors."""

import hashlib

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from configuration_cdan import DIAGNOSIS_STATES, CdanConfig
from labeler_cdan import NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN
from modeling_cdan import CdanForConditionalGeneration, diagnosis_states_from_logits
from test_modeling import report_labels, study_batch, tiny_config, tiny_model
from trainer_cdan import CdanTrainer, reference_diagnosis_states


NEG, POS, UNC = (DIAGNOSIS_STATES.index(state) for state in ("negative", "positive", "uncertain"))


def prompt_model(seed: int = 0, **overrides) -> CdanForConditionalGeneration:
    return tiny_model(seed, use_diagnosis_prompt=True, **overrides).eval()


def all_states(state: int, batch_size: int = 2) -> torch.LongTensor:
    return torch.full((batch_size, 14), state, dtype=torch.long)


def state_dict_digest(model: torch.nn.Module) -> str:
    state = model.state_dict()
    return hashlib.sha256(b"".join(state[name].numpy().tobytes() for name in sorted(state))).hexdigest()


# The outputs of `tiny_model()` (prompt off) before the diagnosis prompt existed (commit 480ad49), computed on CPU.
PAPER_MODEL_WEIGHTS_SHA256 = "1bea2310a90dcc25b227a437a7abab93eed41d4d92acb753335de7d2aff8b1b6"
PAPER_MODEL_GREEDY = [1, 7, 37, 7, 38, 7, 38, 7, 38, 37, 7, 38]
PAPER_MODEL_BEAM_3 = [1, 7, 37, 7, 37, 7, 38, 7, 38, 37, 7, 38]
PAPER_MODEL_LOSS = 8.250004768371582


def test_option_off_builds_the_same_weights_as_before_the_option_existed():
    torch.set_num_threads(1)
    assert state_dict_digest(tiny_model()) == PAPER_MODEL_WEIGHTS_SHA256


def test_option_off_generates_and_scores_as_before_the_option_existed():
    model = tiny_model().eval()
    with torch.no_grad():
        greedy = model.generate(pixel_values=study_batch(), num_beams=1, max_length=12)
        beam = model.generate(pixel_values=study_batch(), num_beams=3, max_length=12)
        loss = model(pixel_values=study_batch(), labels=report_labels()).loss
    assert greedy.tolist() == [PAPER_MODEL_GREEDY] * 2
    assert beam.tolist() == [PAPER_MODEL_BEAM_3] * 2
    assert loss.item() == pytest.approx(PAPER_MODEL_LOSS, rel=1e-5)


def test_option_off_has_no_prompt_and_refuses_diagnosis_states():
    model = tiny_model().eval()
    assert model.model.decoder.diagnosis_prompt is None
    with pytest.raises(ValueError, match="no diagnosis prompt"):
        model(pixel_values=study_batch(), labels=report_labels(), diagnosis_states=all_states(POS))


def test_prompt_needs_the_reverse_attention_classifier():
    with pytest.raises(StrictDataclassClassValidationError, match="use_reverse_attention"):
        tiny_config(use_diagnosis_prompt=True, use_reverse_attention=False)


@pytest.mark.parametrize(
    "field, value",
    [("diagnosis_prompt_prediction_rate", 1.5), ("diagnosis_prompt_memory_dropout", -0.1),
     ("diagnosis_uncertainty_margin", -1)],
)  # fmt: skip
def test_prompt_fields_out_of_range_are_rejected(field, value):
    with pytest.raises(StrictDataclassClassValidationError, match=field):
        tiny_config(use_diagnosis_prompt=True, **{field: value})


def test_states_from_logits_use_each_observations_threshold_and_the_uncertainty_margin():
    logits = torch.tensor([[2.0, 0.4, -0.2, -3.0]])
    thresholds = [1.0, 0.0, 0.0, -4.0]
    assert diagnosis_states_from_logits(logits, thresholds).tolist() == [[POS, POS, NEG, POS]]
    assert diagnosis_states_from_logits(logits, thresholds, uncertainty_margin=0.5).tolist() == [[POS, UNC, UNC, POS]]
    assert diagnosis_states_from_logits(logits).tolist() == [[POS, POS, NEG, NEG]]  # no thresholds: 0.0


def test_reference_states_map_positive_uncertain_and_the_rest():
    labels = [[POSITIVE, UNCERTAIN, NEGATIVE, NOT_MENTIONED] + [NOT_MENTIONED] * 10]
    states = reference_diagnosis_states(labels, observation_indices=[1, 0, 3, 2])
    assert states.tolist() == [[UNC, POS, NEG, NEG]]


def test_generation_reads_the_classifiers_decisions_at_the_saved_thresholds(tmp_path):
    model = prompt_model()
    with torch.no_grad():
        disease_logits = model.get_encoder()(pixel_values=study_batch()).disease_logits
        model.config.observation_thresholds = disease_logits[0].tolist()  # study 0 sits on every threshold
        expected = diagnosis_states_from_logits(disease_logits, model.config.observation_thresholds)
        outputs = model(pixel_values=study_batch(), labels=report_labels())
    assert torch.equal(outputs.diagnosis_states, expected)
    model.save_pretrained(tmp_path)
    reloaded = CdanForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.observation_thresholds == model.config.observation_thresholds
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=study_batch(), labels=report_labels()).diagnosis_states, expected)


def test_the_prompt_changes_what_the_decoder_writes():
    model = prompt_model()
    with torch.no_grad():
        all_positive = model.generate(pixel_values=study_batch(), diagnosis_states=all_states(POS), max_length=12)
        all_negative = model.generate(pixel_values=study_batch(), diagnosis_states=all_states(NEG), max_length=12)
    assert not torch.equal(all_positive, all_negative)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_prompt_generation_with_cache_equals_generation_without_cache(num_beams):
    model = prompt_model()
    cached = model.generate(pixel_values=study_batch(), num_beams=num_beams, max_length=14, use_cache=True)
    uncached = model.generate(pixel_values=study_batch(), num_beams=num_beams, max_length=14, use_cache=False)
    assert len(set(cached.flatten().tolist())) > 3, "the test model should write varied tokens"
    assert torch.equal(cached, uncached)


def test_prompt_generation_equals_step_by_step_argmax_of_the_full_model():
    model = prompt_model()
    generated = model.generate(pixel_values=study_batch(), num_beams=1, max_length=10, min_length=10)
    tokens = torch.full((2, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(9):
            logits = model(pixel_values=study_batch(), decoder_input_ids=tokens, use_cache=False).logits
            assert logits.shape[1] == tokens.shape[1]  # no outputs for the prompt positions
            logits[..., model.config.eos_token_id] = -torch.inf  # as `min_length` does
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_prompt_takes_no_report_positions():
    """A report may still use all `max_position_embeddings` positions: the prompt vectors have none."""
    model = prompt_model(max_position_embeddings=12)
    generated = model.generate(pixel_values=study_batch(), num_beams=1, max_length=13, min_length=13)
    assert generated.shape == (2, 13)


def test_given_states_condition_generation_for_every_beam_of_their_study():
    model = prompt_model()
    states = torch.stack([all_states(POS, 1)[0], all_states(NEG, 1)[0]])  # study 0 all positive, study 1 negative
    with torch.no_grad():
        together = model.generate(pixel_values=study_batch(), diagnosis_states=states, num_beams=3, max_length=12)
        for study in (0, 1):
            alone = model.generate(
                pixel_values=study_batch()[study : study + 1], diagnosis_states=states[study : study + 1],
                num_beams=3, max_length=12,
            )  # fmt: skip
            assert torch.equal(together[study, : alone.shape[1]], alone[0])


@pytest.mark.parametrize("rate, source", [(0.0, "reference"), (1.0, "prediction")])
def test_training_prompt_is_the_reference_or_the_prediction_at_the_extreme_rates(rate, source):
    model = prompt_model(diagnosis_prompt_prediction_rate=rate).train()
    reference = all_states(UNC)  # the classifier never says "uncertain" with a zero margin
    outputs = model(pixel_values=study_batch(), labels=report_labels(), diagnosis_states=reference)
    predicted = diagnosis_states_from_logits(outputs.disease_logits.detach())
    assert torch.equal(outputs.diagnosis_states, reference if source == "reference" else predicted)


def test_training_prompt_mixes_reference_and_prediction_per_observation():
    model = prompt_model(diagnosis_prompt_prediction_rate=0.5).train()
    torch.manual_seed(0)
    outputs = model(pixel_values=study_batch(batch_size=8), labels=report_labels(8), diagnosis_states=all_states(UNC, 8))
    from_reference = (outputs.diagnosis_states == UNC).float().mean().item()
    assert 0.3 < from_reference < 0.7


@pytest.mark.parametrize("memory_dropout, reads_images", [(1.0, False), (0.0, True)])
def test_memory_dropout_makes_the_decoder_write_from_the_prompt_alone(memory_dropout, reads_images):
    model = prompt_model(diagnosis_prompt_memory_dropout=memory_dropout, diagnosis_prompt_prediction_rate=0.0).train()
    logits = [
        model(pixel_values=study_batch(seed=seed), labels=report_labels(), diagnosis_states=all_states(POS)).logits
        for seed in (1, 2)
    ]
    assert torch.allclose(logits[0], logits[1]) != reads_images


def test_generation_reads_the_images_whatever_the_memory_dropout():
    model = prompt_model(diagnosis_prompt_memory_dropout=1.0)
    with torch.no_grad():
        logits = [
            model(pixel_values=study_batch(seed=seed), labels=report_labels(), diagnosis_states=all_states(POS)).logits
            for seed in (1, 2)
        ]
    assert not torch.allclose(logits[0], logits[1])


def test_eval_mode_uses_given_states_as_they_are():
    model = prompt_model(diagnosis_prompt_prediction_rate=1.0)
    outputs = model(pixel_values=study_batch(), labels=report_labels(), diagnosis_states=all_states(UNC))
    assert torch.equal(outputs.diagnosis_states, all_states(UNC))


def test_the_prompt_embeddings_learn_from_the_report_loss():
    model = prompt_model().train()
    model(pixel_values=study_batch(), labels=report_labels(), diagnosis_states=all_states(POS)).loss.backward()
    gradient = model.model.decoder.diagnosis_prompt.state_embeddings.weight.grad.view(14, len(DIAGNOSIS_STATES), -1)
    assert gradient[:, POS].abs().sum() > 0  # the rows of the states it read
    assert gradient[:, UNC].abs().sum() == 0


def test_validation_generation_never_sees_the_reference_states(tmp_path):
    from train import CdanTrainingArguments

    model = prompt_model()
    model.generation_config.update(num_beams=1, max_length=12)
    arguments = CdanTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, report_to="none", use_cpu=True
    )
    trainer = CdanTrainer(model=model, args=arguments)
    with torch.no_grad():
        own = model.generate(pixel_values=study_batch())
        leaked = [model.generate(pixel_values=study_batch(), diagnosis_states=all_states(state)) for state in (POS, NEG)]
    reference = all_states(POS) if not torch.equal(leaked[0], own) else all_states(NEG)
    assert not torch.equal(model.generate(pixel_values=study_batch(), diagnosis_states=reference), own)
    inputs = {"pixel_values": study_batch(), "labels": report_labels(), "diagnosis_states": reference}
    _, generated, _ = trainer.prediction_step(model, inputs, prediction_loss_only=False)
    assert torch.equal(generated[:, : own.shape[1]], own)
