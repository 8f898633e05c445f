"""D2R-Net as a model type: the memory-driven decoder and its cache, the lesion tokens, the alignment losses and
grounding, on tiny random models."""

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.cache_utils import DynamicCache

from configuration_d2r import D2RNetConfig
from d2r_modules import global_alignment_loss, local_alignment_loss
from modeling_d2r import (
    ConditionalLayerNorm,
    D2RNetForConditionalGeneration,
    RelationalMemory,
    RelationalMemoryCache,
)

TINY_TEXT_CONFIG = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}


def tiny_d2r_config(**overrides) -> D2RNetConfig:
    """A D2R-Net small enough for CPU tests: timm's `test_resnet`, width 32, two views, 3 boxes per view."""
    fields = dict(
        visual_extractor="test_resnet",
        vocab_size=40,
        d_model=32,
        embed_size=24,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        relational_memory_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        max_lesion_boxes=3,
        alignment_text_config=TINY_TEXT_CONFIG,
        init_std=0.2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return D2RNetConfig(**fields)


def tiny_d2r(seed: int = 0, **overrides) -> D2RNetForConditionalGeneration:
    torch.manual_seed(seed)
    return D2RNetForConditionalGeneration(tiny_d2r_config(**overrides)).eval()


def study_inputs() -> dict[str, torch.Tensor]:
    """Two clearly different two-view studies of 128 px (4 x 4 feature maps), with some real and some padded boxes."""
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.stack([
        torch.randn(2, 3, 128, 128, generator=generator) * 3 + 2,
        -2 * torch.randn(2, 3, 128, 128, generator=generator).abs(),
    ])  # fmt: skip
    boxes = torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, 120.0, 100.0], [64.0, 64.0, 128.0, 128.0]])
    lesion_boxes = boxes.expand(2, 2, 3, 4).clone()  # (B, V, K, 4)
    lesion_box_mask = torch.tensor([[[True, True, False], [True, False, False]], [[False] * 3, [True, True, True]]])
    return {"pixel_values": pixel_values, "lesion_boxes": lesion_boxes, "lesion_box_mask": lesion_box_mask}


def alignment_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    sentence_attention_mask = torch.ones(2, 3, 5, dtype=torch.long)
    sentence_attention_mask[1, 2] = 0  # the second study has two sentences
    return {
        "report_text_input_ids": torch.randint(1, 50, (2, 9), generator=generator),
        "report_text_attention_mask": torch.ones(2, 9, dtype=torch.long),
        "sentence_input_ids": torch.randint(1, 50, (2, 3, 5), generator=generator),
        "sentence_attention_mask": sentence_attention_mask,
    }


def report_labels() -> torch.Tensor:
    labels = torch.tensor([[5, 9, 11, 7, 2, -100], [6, 6, 8, 12, 13, 2]])
    return labels


def test_loss_is_the_token_cross_entropy():
    model, labels = tiny_d2r(), report_labels()
    output = model(**study_inputs(), labels=labels)
    expected = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_uncached(num_beams):
    model, inputs = tiny_d2r(), study_inputs()
    with torch.no_grad():
        cached = model.generate(**inputs, num_beams=num_beams, max_length=12)
        uncached = model.generate(**inputs, num_beams=num_beams, max_length=12, use_cache=False)
    assert not torch.equal(cached[0], cached[1])  # the two studies get different reports: the test compares content
    assert torch.equal(cached, uncached)


def test_greedy_generation_equals_step_by_step_argmax():
    model, inputs = tiny_d2r(), study_inputs()
    with torch.no_grad():
        generated = model.generate(**inputs, num_beams=1, do_sample=False, max_length=8, min_length=8)
        tokens = torch.full((2, 1), model.config.decoder_start_token_id)
        for _ in range(7):  # each step re-reads the whole prefix through the relational memory, without a cache
            logits = model(**inputs, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # min_length
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_a_study_generates_the_same_report_alone_and_in_a_batch():
    model, inputs = tiny_d2r(), study_inputs()
    alone = {name: value[1:] for name, value in inputs.items()}
    with torch.no_grad():
        batched = model.generate(**inputs, num_beams=3, max_length=12)
        single = model.generate(**alone, num_beams=3, max_length=12)
    assert torch.equal(batched[1, : single.shape[1]], single[0])


def test_padded_boxes_are_not_read():
    model, inputs = tiny_d2r(), study_inputs()
    moved = {**inputs, "lesion_boxes": inputs["lesion_boxes"].clone()}
    moved["lesion_boxes"][~inputs["lesion_box_mask"]] = torch.tensor([3.0, 5.0, 90.0, 70.0])
    with torch.no_grad():
        first = model(**inputs, labels=report_labels()).logits
        second = model(**moved, labels=report_labels()).logits
    torch.testing.assert_close(first, second)


def test_real_boxes_are_read():
    model, inputs = tiny_d2r(), study_inputs()
    moved = {**inputs, "lesion_boxes": inputs["lesion_boxes"].clone()}
    moved["lesion_boxes"][0, 0, 0] = torch.tensor([70.0, 20.0, 120.0, 60.0])  # a real box of study 0
    with torch.no_grad():
        first = model(**inputs, labels=report_labels()).logits
        second = model(**moved, labels=report_labels()).logits
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(first[1], second[1])  # the other study is untouched


def test_memory_holds_patch_tokens_then_one_token_per_box():
    model, inputs = tiny_d2r(), study_inputs()
    with torch.no_grad():
        encoded = model.get_encoder()(**inputs)
    num_patches = 2 * 4 * 4  # two views of 4 x 4 patches
    assert encoded.last_hidden_state.shape[1] == num_patches + 2 * 3
    assert torch.equal(encoded.memory_mask[:, num_patches:], inputs["lesion_box_mask"].flatten(1))
    assert encoded.memory_mask[:, :num_patches].all()
    assert torch.equal(encoded.lesion_embeddings[~encoded.lesion_mask], torch.zeros(6, 24))


def test_without_lesion_branch_the_memory_is_the_patches_and_boxes_are_refused():
    model, inputs = tiny_d2r(use_lesion_branch=False), study_inputs()
    with torch.no_grad():
        encoded = model.get_encoder()(pixel_values=inputs["pixel_values"])
    assert encoded.last_hidden_state.shape[1] == 2 * 4 * 4 and encoded.lesion_embeddings is None
    with pytest.raises(ValueError, match="no lesion branch"):
        model.get_encoder()(**inputs)


def test_a_study_without_boxes_equals_one_with_only_padded_boxes():
    model, inputs = tiny_d2r(), study_inputs()
    no_boxes = {"pixel_values": inputs["pixel_values"]}
    padded = {**inputs, "lesion_box_mask": torch.zeros_like(inputs["lesion_box_mask"])}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**no_boxes, labels=report_labels()).logits, model(**padded, labels=report_labels()).logits
        )


def test_alignment_losses_equal_the_module_functions():
    model = tiny_d2r()
    inputs, text = study_inputs(), alignment_inputs()
    output = model(**inputs, **text, labels=report_labels())
    encoded = model.get_encoder()(**inputs)
    report_states = model.alignment.text_encoder(text["report_text_input_ids"], text["report_text_attention_mask"])
    expected_global = global_alignment_loss(
        report_states, text["report_text_attention_mask"].bool(), encoded.patch_embeddings, reduction="mean"
    )
    sentence_states = model.alignment.text_encoder(
        text["sentence_input_ids"].flatten(0, 1), text["sentence_attention_mask"].flatten(0, 1)
    ).unflatten(0, (2, 3))
    expected_local = local_alignment_loss(
        sentence_states,
        text["sentence_attention_mask"].bool(),
        encoded.lesion_embeddings,
        encoded.lesion_mask,
        reduction="mean",
    )
    torch.testing.assert_close(output.global_alignment_loss, expected_global)
    torch.testing.assert_close(output.local_alignment_loss, expected_local)


def test_alignment_trains_the_branches_and_the_text_projection_not_the_frozen_bert():
    model = tiny_d2r().train()
    output = model(**study_inputs(), **alignment_inputs(), labels=report_labels())
    (output.global_alignment_loss + output.local_alignment_loss).backward()
    assert all(parameter.grad is None for parameter in model.alignment.text_encoder.text_model.parameters())
    assert any(parameter.grad is not None for parameter in model.alignment.text_encoder.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in model.encoder.lesion_encoder.parameters())  # fmt: skip
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in model.encoder.global_embedding.parameters())  # fmt: skip


def test_grounding_scores_are_a_distribution_over_the_real_boxes():
    model, inputs, text = tiny_d2r(), study_inputs(), alignment_inputs()
    with torch.no_grad():
        encoded = model.get_encoder()(**inputs)
        scores = model.alignment.ground(
            encoded.lesion_embeddings[0], encoded.lesion_mask[0], text["sentence_input_ids"][0],
            text["sentence_attention_mask"][0],
        )  # fmt: skip
    assert scores.shape == (3, 6)
    assert torch.equal(scores[:, ~encoded.lesion_mask[0]], torch.zeros(3, 3))
    torch.testing.assert_close(scores.sum(-1), torch.ones(3))


def test_relational_memory_forward_is_the_step_repeated():
    config = tiny_d2r_config()
    torch.manual_seed(0)
    memory_module, tokens = RelationalMemory(config), torch.randn(2, 4, 32)
    start = memory_module.initial_memory(2, tokens.device, tokens.dtype)
    states, last = memory_module(tokens, start)
    memory = start
    for position in range(4):
        memory = memory_module.step(tokens[:, position], memory)
        torch.testing.assert_close(states[:, position], memory.flatten(1))
    torch.testing.assert_close(last, memory)
    assert not torch.allclose(states[:, 0], states[:, 1])  # each token moves the memory


def test_conditional_layer_norm_reads_the_memory():
    torch.manual_seed(0)
    norm, hidden = ConditionalLayerNorm(8, 12), torch.randn(2, 3, 8)
    memory = torch.randn(2, 3, 12)
    assert not torch.allclose(norm(hidden, memory), norm(hidden, memory + 1.0))
    torch.nn.init.zeros_(norm.scale_mlp[-1].weight), torch.nn.init.zeros_(norm.scale_mlp[-1].bias)
    torch.nn.init.zeros_(norm.shift_mlp[-1].weight), torch.nn.init.zeros_(norm.shift_mlp[-1].bias)
    expected = (hidden - hidden.mean(-1, keepdim=True)) / (hidden.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(hidden, memory), expected)  # no memory offset: R2Gen's plain LayerNorm


def test_cache_keeps_the_memory_through_beam_reordering():
    cache = RelationalMemoryCache(DynamicCache(), DynamicCache())
    cache.memory = torch.arange(3.0)[:, None, None].expand(3, 2, 4).clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.memory[:, 0, 0].tolist() == [2.0, 2.0, 0.0]
    with pytest.raises(NotImplementedError):
        cache.crop(1)


def test_save_and_load_with_remote_code_give_the_same_reports(tmp_path):
    model, inputs = tiny_d2r(), study_inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_d2r.py").is_file() and (tmp_path / "d2r_modules.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "D2RNetForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_length=10), loaded.generate(**inputs, max_length=10))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda inputs: inputs.update(lesion_boxes=inputs["lesion_boxes"][:, :, :2]), "max_lesion_boxes=3"),
        (lambda inputs: inputs.pop("lesion_box_mask"), "needs its `lesion_box_mask`"),
        (lambda inputs: inputs["lesion_boxes"].__setitem__((0, 0, 0, 0), float("nan")), "NaN"),
        (lambda inputs: inputs.update(lesion_boxes=inputs["lesion_boxes"][:1]), "batch=2"),
    ],
)
def test_bad_boxes_get_clear_errors(change, message):
    model, inputs = tiny_d2r(), study_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        model.get_encoder()(**inputs)


def test_crop_mode_reads_the_image_pixels_inside_the_boxes_only():
    model, inputs = tiny_d2r(lesion_feature_mode="crop"), study_inputs()
    inside, outside = ({**inputs, "pixel_values": inputs["pixel_values"].clone()} for _ in range(2))
    inside["pixel_values"][0, 0, :, 20:40, 20:40] += 5.0  # inside study 0's first box (10, 10, 60, 80)
    outside["pixel_values"][0, 0, :, 105:125, 20:40] += 5.0  # below both real boxes of that view
    with torch.no_grad():
        reference = model.get_encoder()(**inputs).lesion_embeddings
        changed_inside = model.get_encoder()(**inside).lesion_embeddings
        changed_outside = model.get_encoder()(**outside).lesion_embeddings
    assert not torch.allclose(reference[0, 0], changed_inside[0, 0])
    torch.testing.assert_close(reference, changed_outside)


def test_the_decoder_gives_padded_boxes_no_attention():
    model, inputs = tiny_d2r(), study_inputs()
    with torch.no_grad():
        output = model(**inputs, labels=report_labels(), output_attentions=True)
    padded = ~output.memory_mask  # (B, S)
    for weights in output.cross_attentions:  # (B, H, T, S)
        assert torch.equal(weights.permute(0, 3, 1, 2)[padded], torch.zeros_like(weights.permute(0, 3, 1, 2)[padded]))
        assert weights.permute(0, 3, 1, 2)[~padded].abs().sum() > 0


def test_what_sits_in_padded_lesion_rows_does_not_reach_the_real_memory(monkeypatch):
    model, inputs = tiny_d2r(), study_inputs()
    with torch.no_grad():
        reference = model.get_encoder()(**inputs)
        lesion_forward = model.encoder.lesion_encoder.forward

        def garbage_in_padding(boxes, box_mask, **kwargs):
            features = lesion_forward(boxes, box_mask, **kwargs)
            garbage = 7.0 * torch.linspace(-1.0, 1.0, features.shape[-1])  # not a constant: LayerNorm removes those
            return features + garbage * (~box_mask)[..., None]

        monkeypatch.setattr(model.encoder.lesion_encoder, "forward", garbage_in_padding)
        changed = model.get_encoder()(**inputs)
    real = reference.memory_mask
    torch.testing.assert_close(reference.last_hidden_state[real], changed.last_hidden_state[real])
    assert not torch.allclose(reference.last_hidden_state[~real], changed.last_hidden_state[~real])


def test_alignment_text_layers_keep_the_first_layers_of_the_pretrained_encoder():
    from transformers import AutoConfig, AutoModel

    from trainer_cdan import offline_text_encoder_path

    path = offline_text_encoder_path()
    model = tiny_d2r(alignment_text_config=AutoConfig.from_pretrained(path).to_dict(), alignment_text_layers=2)
    model.load_alignment_text_model(path)
    text_model, minilm = model.alignment.text_encoder.text_model, AutoModel.from_pretrained(path)
    assert len(text_model.encoder.layer) == 2 and len(minilm.encoder.layer) == 6
    for ours, theirs in zip(text_model.encoder.layer[1].parameters(), minilm.encoder.layer[1].parameters()):
        assert torch.equal(ours, theirs)
    assert all(not parameter.requires_grad for parameter in text_model.parameters())
