"""Attention heatmaps: the reverse-attention maps, the per-sentence cross-attention maps and the pipeline option."""

import numpy as np
import pytest
import torch
from PIL import Image

from heatmaps_cdan import overlay_heatmap, reverse_attention_maps, sentence_cross_attention_maps
from pipeline_cdan import CdanReportPipeline
from test_modeling import study_batch, tiny_model
from test_pipeline import FRONTAL, SECOND_FRONTAL, tiny_processor, tiny_report_model


GRID = (2, 2)  # test_resnet's feature map of a 64 px view


@pytest.fixture(scope="module")
def report_model():
    processor = tiny_processor()
    return tiny_report_model(processor), processor


def test_positive_and_negative_maps_are_the_encoders_own_weights_reduced_over_heads_and_queries():
    model, pixel_values = tiny_model().eval(), study_batch()
    maps = reverse_attention_maps(model, pixel_values)
    with torch.no_grad():
        outputs = model.get_encoder()(pixel_values=pixel_values, output_attentions=True)
    for name, weights in (("positive", outputs.positive_attentions), ("negative", outputs.negative_attentions)):
        expected = weights.mean(dim=(1, 2)).reshape(2, 2, *GRID)  # (B, H, N, N) -> (B, N) -> (B, V, h, w)
        assert maps[name].shape == (2, 2, *GRID)
        torch.testing.assert_close(torch.from_numpy(maps[name]), expected)
        np.testing.assert_allclose(maps[name].sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)  # received attention sums to 1


def test_patch_tokens_are_views_then_rows_of_the_feature_map():
    extractor = tiny_model().eval().get_encoder().visual_extractor
    pixel_values = study_batch()
    with torch.no_grad():
        tokens = extractor(pixel_values)  # (B, V*h*w, C)
        feature_maps = extractor.forward_features(pixel_values.flatten(0, 1)).unflatten(0, (2, 2))  # (B, V, C, h, w)
    height, width = GRID
    for view, row, col in [(0, 0, 1), (1, 1, 0), (1, 1, 1)]:
        torch.testing.assert_close(
            tokens[:, view * height * width + row * width + col], feature_maps[:, view, :, row, col]
        )


@pytest.mark.parametrize("view,row,col", [(0, 1, 0), (1, 0, 1)])
def test_a_patch_receiving_all_attention_is_the_maps_argmax_at_its_view_row_and_col(view, row, col):
    model, pixel_values = tiny_model().eval(), study_batch()
    target = view * GRID[0] * GRID[1] + row * GRID[1] + col

    def all_on_target(module, args, output):
        attn_output, weights = output
        focused = torch.zeros_like(weights)
        focused[..., target] = 1.0  # every head and query attends to the target patch only
        return attn_output, focused

    handle = model.get_encoder().reverse_attention.positive_attention.register_forward_hook(all_on_target)
    try:
        positive = reverse_attention_maps(model, pixel_values)["positive"]  # (B, V, h, w)
    finally:
        handle.remove()
    for study in range(2):
        assert np.unravel_index(positive[study].argmax(), positive[study].shape) == (view, row, col)
        assert positive[study][view, row, col] == pytest.approx(1.0)


def independent_cross_attention(model, encoder_outputs, decoder_input_ids) -> torch.Tensor:
    """Softmax(QK^T / sqrt(d)) of every decoder cross-attention, recomputed from its inputs on the default path."""
    captured = []

    def capture(module, args, kwargs):
        captured.append((module, args[0], kwargs["key_value_states"]))

    handles = [
        layer.encoder_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.decoder.layers
    ]
    try:
        with torch.no_grad():
            model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layer_weights = []
    for module, queries, memory in captured:
        query = module.q_proj(queries).unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2)
        key = module.k_proj(memory).unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2)
        layer_weights.append((query @ key.transpose(2, 3) * module.scaling).softmax(dim=-1))  # (B, H, T, S)
    return torch.stack(layer_weights).mean(dim=(0, 2))  # (B, T, S)


def test_sentence_maps_are_the_decoders_cross_attention_averaged_over_each_sentences_tokens(report_model):
    model, processor = report_model
    pixel_values = processor(images=[[str(FRONTAL), str(SECOND_FRONTAL)]], return_tensors="pt")["pixel_values"]
    report_ids = processor.tokenize_reports("the heart is normal . the lungs are clear .")[0]  # ends with eos
    generated_ids = torch.tensor([[model.config.decoder_start_token_id, *report_ids]])
    sentences = sentence_cross_attention_maps(model, pixel_values, generated_ids, processor)[0]
    assert [item["sentence"] for item in sentences] == ["the heart is normal .", "the lungs are clear ."]

    with torch.no_grad():
        encoder_outputs = model.get_encoder()(pixel_values=pixel_values)
    weights = independent_cross_attention(model, encoder_outputs, generated_ids)[0]  # (T, 2N + k)
    num_patches = 2 * GRID[0] * GRID[1]
    first_rows = slice(0, 5)  # decoder positions 0..4 wrote "the heart is normal ."
    expected = weights[first_rows].mean(dim=0)  # (2N + k)
    expected_map = (expected[:num_patches] + expected[num_patches : 2 * num_patches]).reshape(2, *GRID)
    torch.testing.assert_close(torch.from_numpy(sentences[0]["maps"]), expected_map, rtol=1e-4, atol=1e-6)
    # What is not on a patch is on the disease words u_k
    disease_word_weight = expected[2 * num_patches :].sum().item()
    assert sentences[0]["maps"].sum() == pytest.approx(1.0 - disease_word_weight, rel=1e-4)


def test_pipeline_returns_an_h_by_w_array_per_view(report_model):
    model, processor = report_model
    reporter = CdanReportPipeline(model=model, processor=processor, return_attention_maps=True)
    maps = reporter((str(FRONTAL), str(SECOND_FRONTAL)))[0]["attention_maps"]
    for name in ("positive", "negative"):
        assert [view.shape for view in maps[name]] == [GRID, GRID]
    assert maps["sentences"], "the report has at least one sentence"
    for item in maps["sentences"]:
        assert isinstance(item["sentence"], str) and [view.shape for view in item["maps"]] == [GRID, GRID]


def test_pipeline_text_is_the_same_with_and_without_attention_maps(report_model):
    model, processor = report_model
    reporter = CdanReportPipeline(model=model, processor=processor)
    studies = [(str(FRONTAL), str(SECOND_FRONTAL)), (str(SECOND_FRONTAL), str(FRONTAL))]
    plain = reporter(studies, num_beams=3, max_length=20, min_length=10)
    with_maps = reporter(studies, num_beams=3, max_length=20, min_length=10, return_attention_maps=True)
    assert [result[0]["generated_text"] for result in with_maps] == [result[0]["generated_text"] for result in plain]
    assert all("attention_maps" not in result[0] for result in plain)


def test_decoder_returns_no_cross_attentions_by_default():
    model = tiny_model().eval()
    with torch.no_grad():
        outputs = model(pixel_values=study_batch(), decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]))
    assert outputs.cross_attentions is None


def test_attention_maps_need_reverse_attention():
    processor = tiny_processor()
    model = tiny_report_model(processor)
    model.config.use_reverse_attention = False  # the option is checked against the configuration
    with pytest.raises(ValueError, match="reverse attention"):
        CdanReportPipeline(model=model, processor=processor, return_attention_maps=True)


def test_overlay_has_the_size_of_the_image():
    image = Image.new("L", (96, 80), color=128)
    overlay = overlay_heatmap(image, np.array([[0.0, 1.0], [0.5, 0.25]]), alpha=0.4)
    assert overlay.size == (96, 80) and overlay.mode == "RGB"
