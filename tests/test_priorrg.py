"""PriorRG as its own model type: the coarse-to-fine memory, context and prior wiring, generation with a cache,
stage 1's contrastive loss, saving and loading, pre-trained backbones from local folders."""

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, BertConfig, BertModel, Dinov2Config, Dinov2Model

from configuration_priorrg import PriorRGConfig
from modeling_priorrg import PriorRGForConditionalGeneration
from priorrg_modules import multi_positive_info_nce, pooled_image_embedding
from trainer_cdan import offline_text_encoder_path

NUM_LATENTS = 4


def tiny_priorrg_config(**overrides) -> PriorRGConfig:
    """A PriorRG small enough for CPU tests: a 2-layer DINOv2 on 28 px views, a 2-layer BERT, a 2-layer GPT-2."""
    fields = dict(
        vision_config=dict(
            model_type="dinov2", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            image_size=28, patch_size=14,
        ),
        text_config=dict(
            model_type="bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            vocab_size=60,
        ),
        decoder_config=dict(model_type="gpt2", n_embd=24, n_layer=2, n_head=2),
        hidden_size=16, num_latents=NUM_LATENTS, perceiver_depth=2, perceiver_num_heads=2, perceiver_head_dim=8,
        temporal_fusion_layers=1, temporal_fusion_heads=2, vocab_size=30, max_position_embeddings=40,
        freeze_vision_model=False, init_std=0.5, tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    return PriorRGConfig(**fields)


def tiny_priorrg(seed: int = 0, **overrides) -> PriorRGForConditionalGeneration:
    torch.manual_seed(seed)
    return PriorRGForConditionalGeneration(tiny_priorrg_config(**overrides)).eval()


def study_inputs(batch_size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two views per study, a context for every study but the second, a prior for the first and the third."""
    generator = torch.Generator().manual_seed(seed)
    context_attention_mask = torch.ones(batch_size, 5, dtype=torch.long)
    context_attention_mask[1] = 0
    context_attention_mask[0, 3:] = 0
    return {
        "pixel_values": torch.randn(batch_size, 2, 3, 28, 28, generator=generator),
        "view_position_ids": torch.tensor([[0, 2]] * batch_size),
        "context_input_ids": torch.randint(5, 60, (batch_size, 5), generator=generator),
        "context_attention_mask": context_attention_mask,
        "prior_pixel_values": torch.randn(batch_size, 2, 3, 28, 28, generator=generator),
        "has_prior": torch.tensor([i % 2 == 0 for i in range(batch_size)]),
        "prior_view_position_ids": torch.tensor([[1, 2]] * batch_size),
    }


def report_labels(batch_size: int = 3, length: int = 7, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, 30, (batch_size, length), generator=generator)
    labels[:, -1] = 2
    return labels


def only(inputs: dict, index: int) -> dict:
    return {name: value[index : index + 1] for name, value in inputs.items()}


def test_memory_is_context_spatiotemporal_and_joint_latents_in_order():
    model, inputs = tiny_priorrg(), study_inputs()
    with torch.no_grad():
        outputs = model.encoder(**inputs)
    memory = outputs.last_hidden_state
    assert memory.shape == (3, 3 * NUM_LATENTS, 16)
    torch.testing.assert_close(memory[:, :NUM_LATENTS], outputs.context_latents, rtol=0, atol=0)
    torch.testing.assert_close(
        memory[:, NUM_LATENTS : 2 * NUM_LATENTS], outputs.spatiotemporal_latents, rtol=0, atol=0
    )
    torch.testing.assert_close(memory[:, 2 * NUM_LATENTS :], outputs.joint_latents, rtol=0, atol=0)
    expected = pooled_image_embedding(outputs.context_latents, outputs.spatiotemporal_latents)
    torch.testing.assert_close(outputs.image_embeds, expected, rtol=0, atol=0)


def test_a_study_without_context_equals_one_given_no_context_at_all():
    model, inputs = tiny_priorrg(), study_inputs()
    no_context = {k: v for k, v in only(inputs, 1).items() if not k.startswith("context_")}
    with torch.no_grad():
        batched = model.encoder(**inputs).last_hidden_state[1]
        alone = model.encoder(**no_context).last_hidden_state[0]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_padded_context_tokens_are_not_read():
    model, inputs = tiny_priorrg(), study_inputs()
    changed = {**inputs, "context_input_ids": inputs["context_input_ids"].clone()}
    changed["context_input_ids"][0, 3:] = 7  # masked positions of study 0
    with torch.no_grad():
        before, after = model.encoder(**inputs).context_latents, model.encoder(**changed).context_latents
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_context_reaches_every_pass_through_the_shared_latents():
    model, inputs = tiny_priorrg(), study_inputs()
    changed = {**inputs, "context_input_ids": inputs["context_input_ids"].clone()}
    changed["context_input_ids"][0, 0] = 8
    with torch.no_grad():
        before, after = model.encoder(**inputs), model.encoder(**changed)
    for name in ("context_latents", "spatiotemporal_latents", "joint_latents"):
        assert not torch.allclose(getattr(before, name)[0], getattr(after, name)[0]), name
        torch.testing.assert_close(getattr(before, name)[1:], getattr(after, name)[1:], rtol=1e-5, atol=1e-5)


def test_a_study_without_a_prior_is_not_touched_by_the_prior_images():
    model, inputs = tiny_priorrg(), study_inputs()
    changed = {**inputs, "prior_pixel_values": inputs["prior_pixel_values"].clone()}
    changed["prior_pixel_values"][1] += 5.0  # study 1 has no prior
    no_prior = {k: v for k, v in inputs.items() if not k.startswith("prior_") and k != "has_prior"}
    with torch.no_grad():
        reference = model.encoder(**inputs).last_hidden_state[1]
        assert torch.equal(model.encoder(**changed).last_hidden_state[1], reference)
        torch.testing.assert_close(model.encoder(**no_prior).last_hidden_state[1], reference, rtol=1e-5, atol=1e-5)


def test_the_prior_reaches_the_joint_latents_through_the_spatiotemporal_ones():
    model, inputs = tiny_priorrg(), study_inputs()
    changed = {**inputs, "prior_pixel_values": inputs["prior_pixel_values"].clone()}
    changed["prior_pixel_values"][0] += 1.0  # study 0 has a prior
    with torch.no_grad():
        before, after = model.encoder(**inputs), model.encoder(**changed)
    torch.testing.assert_close(before.context_latents, after.context_latents, rtol=0, atol=0)
    assert not torch.allclose(before.spatiotemporal_latents[0], after.spatiotemporal_latents[0])
    assert not torch.allclose(before.joint_latents[0], after.joint_latents[0])


def test_view_positions_change_the_reading():
    model, inputs = tiny_priorrg(), study_inputs()
    swapped = {**inputs, "view_position_ids": inputs["view_position_ids"].flip(1)}
    with torch.no_grad():
        assert not torch.allclose(
            model.encoder(**inputs).last_hidden_state, model.encoder(**swapped).last_hidden_state
        )


def test_loss_is_the_token_cross_entropy_of_the_right_shifted_report():
    model, inputs, labels = tiny_priorrg(), study_inputs(), report_labels()
    labels[0, 4:] = -100
    with torch.no_grad():
        outputs = model(**inputs, labels=labels)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    assert torch.equal(decoder_input_ids[:, 0], torch.full((3,), model.config.decoder_start_token_id))
    assert torch.equal(decoder_input_ids[:, 1:], labels[:, :-1].clamp(min=0))
    expected = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_the_cache_equals_generation_without_it(num_beams):
    model, inputs = tiny_priorrg(), study_inputs()
    with torch.no_grad():
        cached = model.generate(**inputs, num_beams=num_beams, max_length=12, use_cache=True)
        uncached = model.generate(**inputs, num_beams=num_beams, max_length=12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len({tuple(row.tolist()) for row in cached}) > 1  # the studies get different reports


def test_generation_caches_one_layer_per_decoder_layer_whatever_the_text_encoders_depth():
    model, inputs = tiny_priorrg(decoder_config=dict(model_type="gpt2", n_embd=24, n_layer=3, n_head=2)), study_inputs()
    assert model.config.get_text_config(decoder=True) is model.config.decoder_config
    assert model.config.get_text_config(encoder=True) is model.config.text_config
    with torch.no_grad():
        cached = model.generate(**inputs, num_beams=3, max_length=10, use_cache=True)
        uncached = model.generate(**inputs, num_beams=3, max_length=10, use_cache=False)
    assert torch.equal(cached, uncached)  # a 2-layer text encoder, a 3-layer decoder


def test_greedy_generation_is_the_step_by_step_argmax():
    model, inputs = tiny_priorrg(), study_inputs()
    with torch.no_grad():
        generated = model.generate(**inputs, num_beams=1, max_length=8, min_length=8)
        tokens = torch.full((3, 1), model.config.decoder_start_token_id)
        for _ in range(7):
            logits = model(**inputs, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_generation_reads_the_prior():
    model, inputs = tiny_priorrg(), study_inputs()
    other_prior = {**inputs, "prior_pixel_values": torch.randn_like(inputs["prior_pixel_values"]) * 3}
    with torch.no_grad():
        encoded = model.encoder(**inputs).last_hidden_state
        encoded_other = model.encoder(**other_prior).last_hidden_state
    assert not torch.allclose(encoded[0], encoded_other[0])
    assert torch.equal(encoded[1], encoded_other[1])


def test_contrastive_loss_is_the_multi_positive_info_nce_of_the_study_and_report_embeddings():
    model, inputs = tiny_priorrg(), study_inputs()
    report_ids = torch.randint(5, 60, (3, 6))
    outputs = model.get_contrastive_outputs(
        report_ids, torch.ones_like(report_ids), study_ids=["a", "b", "a"], **inputs
    )
    image_embeds = model.encoder(**inputs).image_embeds
    report_embeds = model.report_embeddings(report_ids, torch.ones_like(report_ids))
    expected = multi_positive_info_nce(image_embeds, report_embeds, ["a", "b", "a"], model.contrastive_head.scale())
    torch.testing.assert_close(outputs.loss, expected)
    torch.testing.assert_close(model.contrastive_head.scale(), torch.tensor(1 / 0.07))


def test_contrastive_loss_trains_the_encoders_and_not_the_decoder():
    model, inputs = tiny_priorrg(), study_inputs()
    report_ids = torch.randint(5, 60, (3, 6))
    model.get_contrastive_outputs(report_ids, **inputs).loss.backward()
    assert model.encoder.perceiver.latents.grad is not None
    assert model.encoder.context_encoder.text_model.embeddings.word_embeddings.weight.grad is not None
    assert model.encoder.vision_model.embeddings.patch_embeddings.projection.weight.grad is not None
    assert model.contrastive_head.logit_scale.grad is not None
    assert all(parameter.grad is None for parameter in model.decoder.parameters())


def test_a_frozen_vision_encoder_gets_no_gradient_and_stays_in_eval_mode():
    model = tiny_priorrg(freeze_vision_model=True).train()
    assert not model.encoder.vision_model.training
    assert model.encoder.perceiver.training
    model(**study_inputs(), labels=report_labels()).loss.backward()
    assert all(parameter.grad is None for parameter in model.encoder.vision_model.parameters())
    assert model.encoder.perceiver.latents.grad is not None


def test_save_and_load_with_remote_code_give_the_same_reports(tmp_path):
    model, inputs = tiny_priorrg(), study_inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_priorrg.py").is_file() and (tmp_path / "priorrg_modules.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "PriorRGForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_length=10), loaded.generate(**inputs, max_length=10))


def test_pretrained_backbones_load_from_local_folders(tmp_path):
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                      image_size=28, patch_size=14))  # fmt: skip
    vision.save_pretrained(tmp_path / "vision")
    config = tiny_priorrg_config(text_config=dict(model_type="bert", num_hidden_layers=2))
    model = PriorRGForConditionalGeneration.from_backbones_pretrained(
        config, vision_model_name_or_path=str(tmp_path / "vision"), text_model_name_or_path=offline_text_encoder_path()
    )
    minilm = AutoModel.from_pretrained(offline_text_encoder_path())
    text_model = model.encoder.context_encoder.text_model
    assert isinstance(text_model, BertModel) and len(text_model.encoder.layer) == 2
    assert torch.equal(text_model.embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight)
    assert torch.equal(text_model.encoder.layer[1].output.dense.weight, minilm.encoder.layer[1].output.dense.weight)
    assert torch.equal(model.encoder.vision_model.embeddings.cls_token, vision.embeddings.cls_token)
    assert model.config.text_config.hidden_size == minilm.config.hidden_size


def test_an_unreachable_backbone_names_itself_and_the_offline_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"(?s)vision encoder.*not-a-model.*offline"):
        PriorRGForConditionalGeneration.from_backbones_pretrained(
            tiny_priorrg_config(), vision_model_name_or_path="no-such-org/not-a-model"
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pixel_values": torch.randn(3, 28, 28)}, "pixel_values"),
        ({"has_prior": torch.tensor([True, False])}, "has_prior"),
        ({"view_position_ids": torch.tensor([[0, 1, 2]] * 3)}, "view_position_ids"),
    ],
)
def test_malformed_inputs_get_a_clear_error(change, message):
    model, inputs = tiny_priorrg(), study_inputs()
    with pytest.raises(ValueError, match=message):
        model.encoder(**{**inputs, **change})


def test_configuration_rejects_sizes_that_cannot_be_built():
    with pytest.raises(Exception, match="dropout"):
        tiny_priorrg_config(dropout=1.5)
    with pytest.raises(Exception, match="view_positions"):
        tiny_priorrg_config(view_positions=["PA", "pa"])


def test_default_configuration_is_the_published_architecture():
    config = PriorRGConfig()
    assert (config.vision_config.model_type, config.vision_config.hidden_size) == ("dinov2", 768)
    assert (config.vision_config.patch_size, config.vision_config.image_size) == (14, 518)
    assert (config.text_config.model_type, config.text_config.num_hidden_layers) == ("bert", 6)
    assert (config.decoder_config.model_type, config.decoder_config.n_layer, config.decoder_config.n_embd) == (
        "gpt2", 6, 768,
    )  # fmt: skip
    assert config.decoder_config.add_cross_attention and config.decoder_config.vocab_size == config.vocab_size
    assert (config.num_latents, config.perceiver_depth, config.perceiver_num_heads) == (128, 3, 8)
    assert config.temporal_fusion_layers == 3 and config.contrastive_temperature == 0.07
    assert isinstance(BertConfig(**config.text_config.to_dict()), BertConfig)
