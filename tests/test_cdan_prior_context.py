"""CDAN with PriorRG's modules switched on through its config: clinical context latents in the memory, the prior study
through temporal fusion; the paper's CDAN is unchanged when they are off."""

import pytest
import torch
from test_modeling import report_labels, study_batch, tiny_model
from transformers import AutoModelForImageTextToText

from modeling_cdan import CdanForConditionalGeneration

CONTEXT_LATENTS = 3
TINY_TEXT_CONFIG = dict(
    model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
)


def context_model(**overrides) -> CdanForConditionalGeneration:
    fields = dict(
        use_clinical_context=True, context_text_config=TINY_TEXT_CONFIG, context_num_latents=CONTEXT_LATENTS,
        context_perceiver_depth=1,
    )  # fmt: skip
    return tiny_model(**{**fields, **overrides}).eval()


def prior_model(**overrides) -> CdanForConditionalGeneration:
    return tiny_model(use_prior_study=True, temporal_fusion_layers=1, **overrides).eval()


def context_inputs(batch_size: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch_size, 4, dtype=torch.long)
    mask[1] = 0  # the second study has no context
    return {"context_input_ids": torch.randint(5, 50, (batch_size, 4)), "context_attention_mask": mask}


def prior_inputs(batch_size: int = 2) -> dict[str, torch.Tensor]:
    return {"prior_pixel_values": study_batch(batch_size, seed=7), "has_prior": torch.tensor([True, False])}


def test_switches_off_build_no_extra_modules():
    model = tiny_model()
    encoder = model.model.encoder
    assert encoder.context_encoder is None and encoder.context_perceiver is None
    assert encoder.temporal_fusion is None and encoder.prior_embeddings is None


def test_context_latents_join_the_memory_after_u_s():
    model, plain = context_model(), tiny_model().eval()
    with torch.no_grad():
        memory = model.model.encoder(study_batch(), **context_inputs()).last_hidden_state
        plain_memory = plain.model.encoder(study_batch()).last_hidden_state
    assert memory.shape[1] == plain_memory.shape[1] + CONTEXT_LATENTS


def test_context_changes_the_memory_of_its_own_study_only():
    model, inputs = context_model(), context_inputs()
    changed = {**inputs, "context_input_ids": inputs["context_input_ids"].clone()}
    changed["context_input_ids"][0, 0] = 9
    with torch.no_grad():
        before = model.model.encoder(study_batch(), **inputs)
        after = model.model.encoder(study_batch(), **changed)
    assert not torch.allclose(before.last_hidden_state[0], after.last_hidden_state[0])
    torch.testing.assert_close(before.last_hidden_state[1], after.last_hidden_state[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        before.disease_logits, after.disease_logits, rtol=0, atol=0
    )  # the classifier reads images


def test_a_study_without_context_equals_one_given_no_context_input():
    model, inputs = context_model(), context_inputs()
    with torch.no_grad():
        batched = model.model.encoder(study_batch(), **inputs).last_hidden_state[1]
        alone = model.model.encoder(study_batch()[1:]).last_hidden_state[0]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_the_prior_changes_u_before_the_reverse_attention_of_studies_with_a_prior():
    model = prior_model()
    inputs = prior_inputs()
    with torch.no_grad():
        with_prior = model.model.encoder(study_batch(), **inputs)
        without = model.model.encoder(study_batch())
    assert not torch.allclose(with_prior.disease_logits[0], without.disease_logits[0])
    torch.testing.assert_close(with_prior.last_hidden_state[1], without.last_hidden_state[1], rtol=0, atol=0)


def test_prior_images_of_a_study_without_a_prior_are_never_read():
    model, inputs = prior_model(), prior_inputs()
    changed = {**inputs, "prior_pixel_values": inputs["prior_pixel_values"].clone()}
    changed["prior_pixel_values"][1] = float("nan")
    with torch.no_grad():
        assert torch.equal(
            model.model.encoder(study_batch(), **inputs).last_hidden_state[1],
            model.model.encoder(study_batch(), **changed).last_hidden_state[1],
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_context_and_prior_uses_the_cache_consistently(num_beams):
    model = tiny_model(
        use_prior_study=True, temporal_fusion_layers=1, use_clinical_context=True,
        context_text_config=TINY_TEXT_CONFIG, context_num_latents=CONTEXT_LATENTS, context_perceiver_depth=1,
    ).eval()  # fmt: skip
    inputs = {"pixel_values": study_batch(), **context_inputs(), **prior_inputs()}
    with torch.no_grad():
        cached = model.generate(**inputs, num_beams=num_beams, max_length=10, use_cache=True)
        uncached = model.generate(**inputs, num_beams=num_beams, max_length=10, use_cache=False)
        loss = model(**inputs, labels=report_labels()).loss
    assert torch.equal(cached, uncached)
    assert torch.isfinite(loss)


def test_inputs_for_a_switched_off_branch_get_a_clear_error():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="use_clinical_context=False"):
        model(pixel_values=study_batch(), labels=report_labels(), **context_inputs())
    with pytest.raises(ValueError, match="use_prior_study=False"):
        model(pixel_values=study_batch(), labels=report_labels(), **prior_inputs())


def test_a_context_model_round_trips_through_remote_code(tmp_path):
    model = context_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "priorrg_modules.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    inputs = {"pixel_values": study_batch(), **context_inputs()}
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_length=8), loaded.generate(**inputs, max_length=8))


def test_configuration_rejects_a_context_config_without_model_type():
    with pytest.raises(Exception, match="model_type"):
        tiny_model(use_clinical_context=True, context_text_config={"hidden_size": 16})
