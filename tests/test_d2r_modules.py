"""D2R-Net's building blocks (`d2r_modules`): CPCA, LERA, the global and lesion branches, the text encoder, SCAN
similarity, the hardest-negative triplet loss, the global and local alignment losses and the grounding scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from transformers import BertConfig, BertModel

from d2r_modules import (
    ChannelPriorConvolutionalAttention,
    GlobalImageEmbedding,
    LesionAreaEnhancement,
    LesionEncoder,
    TextAlignmentEncoder,
    global_alignment_loss,
    hardest_negative_triplet_loss,
    local_alignment_loss,
    sentence_box_scores,
    stacked_cross_attention_similarity,
)

CHANNELS = 8
EMBED = 16


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    return BertModel(config, add_pooling_layer=False)


def lesion_encoder(**overrides) -> LesionEncoder:
    torch.manual_seed(0)
    return LesionEncoder(**{"in_channels": CHANNELS, "embed_size": EMBED, **overrides}).eval()


def random_mask(*shape: int, seed: int) -> torch.Tensor:
    """A random bool mask whose first entry along the last axis is always True."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) > 0.4
    mask[..., 0] = True
    return mask


# CPCA and the global branch


def test_cpca_keeps_the_shape_and_changes_the_map():
    torch.manual_seed(0)
    attention = ChannelPriorConvolutionalAttention(CHANNELS)
    feature_map = torch.randn(2, CHANNELS, 5, 6)
    output = attention(feature_map)
    assert output.shape == feature_map.shape
    assert not torch.allclose(output, feature_map, atol=1e-3)


def test_cpca_gradients_reach_every_parameter():
    torch.manual_seed(0)
    attention = ChannelPriorConvolutionalAttention(CHANNELS)
    attention(torch.randn(2, CHANNELS, 5, 6)).square().sum().backward()
    for name, parameter in attention.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_global_embedding_gives_row_major_patch_features():
    torch.manual_seed(0)
    embedding = GlobalImageEmbedding(CHANNELS, EMBED).eval()
    feature_map = torch.randn(2, CHANNELS, 3, 4)
    patches = embedding(feature_map)
    embedded_map = embedding.embedding(embedding.attention(feature_map))  # (B, D, h, w)
    assert patches.shape == (2, 12, EMBED)
    torch.testing.assert_close(patches[:, 1 * 4 + 2], embedded_map[:, :, 1, 2])


# LERA


def test_lera_is_the_identity_at_initialisation():
    torch.manual_seed(0)
    enhancement = LesionAreaEnhancement(CHANNELS).train()
    regions = torch.randn(3, CHANNELS, 7, 7)
    torch.testing.assert_close(enhancement(regions), regions, rtol=0, atol=0)


def test_lera_learns_an_enhancement_from_the_identity():
    torch.manual_seed(0)
    enhancement = LesionAreaEnhancement(CHANNELS).train()
    regions = torch.randn(3, CHANNELS, 7, 7)
    optimizer = torch.optim.SGD(enhancement.parameters(), lr=0.1)
    for _ in range(2):  # the first step moves the zero-initialised weight, the second the rest of the branch
        optimizer.zero_grad()
        (enhancement(regions) - 2 * regions).square().mean().backward()
        optimizer.step()
    assert not torch.allclose(enhancement.eval()(regions), regions, atol=1e-4)


def test_lera_reset_parameters_restores_the_identity_after_a_host_init():
    torch.manual_seed(0)
    enhancement = LesionAreaEnhancement(CHANNELS).eval()
    nn.init.ones_(enhancement.expand_norm.weight)  # what a host `_init_weights` does to every BatchNorm
    enhancement.reset_parameters()
    regions = torch.randn(3, CHANNELS, 7, 7)
    torch.testing.assert_close(enhancement(regions), regions, rtol=0, atol=0)


# Lesion branch: RoIAlign mode


def test_box_on_the_lesion_pools_it_and_a_box_elsewhere_does_not():
    encoder = lesion_encoder()
    feature_map = torch.zeros(1, CHANNELS, 8, 8)
    feature_map[:, :, :4, :4] = 1.0  # the lesion: pixels 0-15 of a 32 x 32 image at stride 4
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [20.0, 20.0, 32.0, 32.0]]])  # the second is a cell clear of it
    box_mask = torch.ones(1, 2, dtype=torch.bool)
    pooled = encoder.pool_regions(boxes, box_mask, (32, 32), feature_map)  # (2, C, 7, 7)
    assert pooled[0].mean() > 0.5
    assert pooled[1].abs().max() == 0
    features = encoder(boxes, box_mask, (32, 32), feature_map=feature_map)
    assert not torch.allclose(features[0, 0], features[0, 1], atol=1e-3)


def test_lesion_features_are_the_encoded_roialign_of_each_valid_box():
    encoder = lesion_encoder()
    nn.init.ones_(encoder.enhancement.expand_norm.weight)  # so that the enhancement is not the identity
    feature_map = torch.randn(2, CHANNELS, 8, 8)
    boxes = torch.tensor(
        [[[2.0, 3.0, 20.0, 17.0], [0.0, 0.0, 0.0, 0.0]], [[5.0, 1.0, 30.0, 12.0], [0.0, 8.0, 14.0, 31.0]]]
    )
    box_mask = torch.tensor([[True, False], [True, True]])
    features = encoder(boxes, box_mask, (32, 32), feature_map=feature_map)

    rois = torch.tensor([[0.0, 2.0, 3.0, 20.0, 17.0], [1.0, 5.0, 1.0, 30.0, 12.0], [1.0, 0.0, 8.0, 14.0, 31.0]])
    pooled = roi_align(feature_map, rois, output_size=7, spatial_scale=8 / 32, aligned=True)
    expected = encoder.projection(encoder.encoder(encoder.enhancement(pooled)).mean(dim=(2, 3)))
    torch.testing.assert_close(features[box_mask], expected)


def test_moving_a_box_by_one_stride_moves_the_pooled_window_by_one_cell():
    encoder = lesion_encoder()
    # A 32 x 64 image on an 8 x 8 map: stride 4 down the rows, 8 along the columns.
    rows, columns = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feature_map = torch.stack([columns, rows] * (CHANNELS // 2))[None]  # channel 0 = column index, 1 = row index
    box = torch.tensor([16.0, 8.0, 32.0, 16.0])
    boxes = torch.stack([box, box + torch.tensor([8.0, 0.0, 8.0, 0.0]), box + torch.tensor([0.0, 4.0, 0.0, 4.0])])
    pooled = encoder.pool_regions(boxes[None], torch.ones(1, 3, dtype=torch.bool), (32, 64), feature_map)
    torch.testing.assert_close(pooled[1, 0] - pooled[0, 0], torch.ones(7, 7))  # one column to the right
    torch.testing.assert_close(pooled[1, 1], pooled[0, 1])
    torch.testing.assert_close(pooled[2, 1] - pooled[0, 1], torch.ones(7, 7))  # one row down
    torch.testing.assert_close(pooled[2, 0], pooled[0, 0])


@pytest.mark.parametrize("mode", ["roi_align", "crop"])
def test_padded_box_slots_are_exact_zeros_and_never_read(mode):
    in_channels = CHANNELS if mode == "roi_align" else 3
    encoder = lesion_encoder(in_channels=in_channels, mode=mode, crop_size=16)
    source = torch.randn(2, in_channels, 8 if mode == "roi_align" else 32, 8 if mode == "roi_align" else 32)
    boxes = torch.tensor(
        [[[1.0, 2.0, 20.0, 25.0], [float("nan")] * 4], [[4.0, 4.0, 12.0, 30.0], [9.0, 1.0, 3.0, 0.0]]]
    )
    box_mask = torch.tensor([[True, False], [True, False]])
    source_kwargs = {"feature_map": source} if mode == "roi_align" else {"pixel_values": source}
    features = encoder(boxes, box_mask, (32, 32), **source_kwargs)
    assert features.shape == (2, 2, EMBED)
    assert torch.equal(features[:, 1], torch.zeros(2, EMBED))
    assert (features[:, 0].abs().sum(dim=-1) > 0).all()


def test_no_box_in_the_batch_gives_zero_features():
    encoder = lesion_encoder()
    features = encoder(
        torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), (32, 32), feature_map=torch.randn(2, CHANNELS, 8, 8)
    )
    assert torch.equal(features, torch.zeros(2, 3, EMBED))


# Lesion branch: crop mode


def bright_rectangle_image() -> torch.Tensor:
    pixel_values = torch.zeros(1, 3, 32, 32)
    pixel_values[:, :, 4:13, 16:31] = 1.0  # rows (y) 4-12, columns (x) 16-30
    return pixel_values


def test_crop_mode_reads_the_pixels_inside_the_box():
    encoder = lesion_encoder(in_channels=3, mode="crop", crop_size=16)
    boxes = torch.tensor([[[18.0, 5.0, 28.0, 11.0], [5.0, 18.0, 11.0, 28.0]]])  # the rectangle, then x and y swapped
    crops = encoder.pool_regions(boxes, torch.ones(1, 2, dtype=torch.bool), (32, 32), bright_rectangle_image())
    assert crops.shape == (2, 3, 16, 16)
    torch.testing.assert_close(crops[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(crops[1], torch.zeros(3, 16, 16))


def test_crop_mode_maps_boxes_from_their_image_frame_to_the_pixel_values():
    encoder = lesion_encoder(in_channels=3, mode="crop", crop_size=16)
    pixel_values = torch.rand(1, 3, 32, 32)
    box_mask = torch.ones(1, 1, dtype=torch.bool)
    resized_box = torch.tensor([[[3.0, 7.0, 19.0, 29.0]]])
    crop_in_pixel_frame = encoder.pool_regions(resized_box, box_mask, (32, 32), pixel_values)
    crop_from_original_frame = encoder.pool_regions(resized_box * 4, box_mask, (128, 128), pixel_values)
    torch.testing.assert_close(crop_from_original_frame, crop_in_pixel_frame)
    features = encoder(resized_box, box_mask, (32, 32), pixel_values=pixel_values)
    assert features.shape == (1, 1, EMBED)


@pytest.mark.parametrize(
    ("mode", "keyword", "message"),
    [("roi_align", "pixel_values", "feature_map"), ("crop", "feature_map", "pixel_values")],
)
def test_lesion_encoder_asks_for_the_tensor_its_mode_reads(mode, keyword, message):
    encoder = lesion_encoder(in_channels=3, mode=mode)
    with pytest.raises(ValueError, match=message):
        encoder(
            torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), (32, 32), **{keyword: torch.zeros(1, 3, 8, 8)}
        )


def test_lesion_encoder_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        LesionEncoder(CHANNELS, EMBED, mode="crop_and_resize")


def test_lesion_encoder_rejects_an_inverted_box():
    encoder = lesion_encoder()
    with pytest.raises(ValueError, match="x_max >= x_min"):
        encoder(
            torch.tensor([[[10.0, 0.0, 2.0, 8.0]]]),
            torch.ones(1, 1, dtype=torch.bool),
            (32, 32),
            feature_map=torch.zeros(1, CHANNELS, 8, 8),
        )


# Text encoder


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([[2, 5, 9, 11, 3], [2, 7, 3, 0, 0]])
    return input_ids, (input_ids != 0).long()


def test_text_states_are_unit_norm_with_zeros_at_padding():
    encoder = TextAlignmentEncoder(tiny_bert(), EMBED)
    input_ids, attention_mask = text_batch()
    states = encoder(input_ids, attention_mask)
    assert states.shape == (2, 5, EMBED)
    valid = attention_mask.bool()
    torch.testing.assert_close(states[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    assert torch.equal(states[~valid], torch.zeros(int((~valid).sum()), EMBED))


def test_frozen_text_model_stays_fixed_and_only_the_projection_trains():
    encoder = TextAlignmentEncoder(tiny_bert(), EMBED).train()
    assert not encoder.text_model.training  # no dropout in a frozen encoder
    assert not any(parameter.requires_grad for parameter in encoder.text_model.parameters())  # optimizers skip it
    encoder(*text_batch()).sum().backward()
    assert encoder.projection.weight.grad is not None
    assert all(parameter.grad is None for parameter in encoder.text_model.parameters())


def test_unfrozen_text_model_trains():
    encoder = TextAlignmentEncoder(tiny_bert(), EMBED, freeze_text_model=False).train()
    assert encoder.text_model.training
    encoder(*text_batch()).sum().backward()
    assert encoder.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


# SCAN similarity


def scan_reference(text, text_mask, regions, region_mask, smoothing=9.0):
    """One pair at a time, on the valid words and regions only, with the attended vectors built explicitly."""
    similarity = torch.zeros(text.shape[0], regions.shape[0])
    for t in range(text.shape[0]):
        words = F.normalize(text[t][text_mask[t]], dim=-1)  # (l, D)
        for r in range(regions.shape[0]):
            image = F.normalize(regions[r][region_mask[r]], dim=-1)  # (k, D)
            attention = (smoothing * words @ image.T).softmax(dim=-1)  # (l, k)
            attended = attention @ image  # (l, D)
            similarity[t, r] = F.cosine_similarity(words, attended, dim=-1).mean()
    return similarity


def scan_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(3, 6, EMBED, generator=generator)
    regions = torch.randn(4, 5, EMBED, generator=generator)
    return text, random_mask(3, 6, seed=seed), regions, random_mask(4, 5, seed=seed + 1)


def test_scan_similarity_matches_a_loop_reference():
    text, text_mask, regions, region_mask = scan_inputs()
    similarity = stacked_cross_attention_similarity(text, text_mask, regions, region_mask)
    torch.testing.assert_close(similarity, scan_reference(text, text_mask, regions, region_mask))


def test_scan_similarity_ignores_whatever_is_under_the_masks():
    text, text_mask, regions, region_mask = scan_inputs()
    similarity = stacked_cross_attention_similarity(text, text_mask, regions, region_mask)
    garbage_text = torch.cat([text.masked_fill(~text_mask[..., None], float("nan")), text[:, :2] + 7.0], dim=1)
    garbage_regions = torch.cat([regions.masked_fill(~region_mask[..., None], float("nan")), -regions[:, :2]], dim=1)
    padded_text_mask = torch.cat([text_mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    padded_region_mask = torch.cat([region_mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    padded = stacked_cross_attention_similarity(garbage_text, padded_text_mask, garbage_regions, padded_region_mask)
    torch.testing.assert_close(padded, similarity)


# Triplet loss


HAND_SIMILARITY = torch.tensor([[0.9, 0.8, 0.1], [0.45, 0.5, 0.6], [0.2, 0.1, 0.7]])
"""Text 1 has two violating negatives (images 0 and 2), so the hardest one differs from their sum or mean."""


def test_triplet_loss_is_zero_when_positives_beat_negatives_by_the_margin():
    similarity = torch.full((3, 3), 0.5).fill_diagonal_(0.71)
    assert hardest_negative_triplet_loss(similarity, margin=0.2) == 0


def test_triplet_loss_takes_the_hardest_negative_of_each_anchor():
    margin = 0.2
    text_anchor_hinges = [0.2 + 0.8 - 0.9, 0.2 + 0.6 - 0.5, 0.0]  # hardest image per text (text 2 has no violation)
    image_anchor_hinges = [0.0, 0.2 + 0.8 - 0.5, 0.2 + 0.6 - 0.7]  # hardest text per image
    expected = torch.tensor(sum(text_anchor_hinges) + sum(image_anchor_hinges))
    torch.testing.assert_close(hardest_negative_triplet_loss(HAND_SIMILARITY, margin), expected)


def test_triplet_loss_valid_mask_removes_rows_and_columns():
    valid = torch.tensor([True, True, False])
    masked = hardest_negative_triplet_loss(HAND_SIMILARITY, valid=valid)
    torch.testing.assert_close(masked, hardest_negative_triplet_loss(HAND_SIMILARITY[:2, :2]))
    assert masked != hardest_negative_triplet_loss(HAND_SIMILARITY)


def test_triplet_loss_mean_divides_by_the_valid_studies():
    valid = torch.tensor([True, True, False])
    total = hardest_negative_triplet_loss(HAND_SIMILARITY, valid=valid)
    torch.testing.assert_close(
        hardest_negative_triplet_loss(HAND_SIMILARITY, valid=valid, reduction="mean"), total / 2
    )


# Global and local alignment


def test_global_loss_is_the_triplet_loss_of_report_to_patch_similarity():
    text, text_mask, _, _ = scan_inputs()
    patches = torch.randn(3, 5, EMBED, generator=torch.Generator().manual_seed(3))
    all_patches = torch.ones(3, 5, dtype=torch.bool)
    expected = hardest_negative_triplet_loss(scan_reference(text, text_mask, patches, all_patches), margin=0.3)
    torch.testing.assert_close(global_alignment_loss(text, text_mask, patches, margin=0.3), expected)


def local_inputs(seed: int = 0):
    """Four studies of up to 3 sentences of 4 tokens and up to 3 boxes; study 2 has no box, study 3 no sentence."""
    generator = torch.Generator().manual_seed(seed)
    sentences = torch.randn(4, 3, 4, EMBED, generator=generator, requires_grad=True)
    sentence_mask = random_mask(4, 3, 4, seed=seed)
    sentence_mask[0, 2] = False  # a padded sentence
    sentence_mask[3] = False
    lesions = torch.randn(4, 3, EMBED, generator=generator, requires_grad=True)
    lesion_mask = random_mask(4, 3, seed=seed + 1)
    lesion_mask[2] = False
    return sentences, sentence_mask, lesions, lesion_mask


def test_local_loss_uses_the_mean_over_sentences_of_sentence_to_lesion_similarity():
    sentences, sentence_mask, lesions, lesion_mask = local_inputs()
    keep = [0, 1]
    study_similarity = torch.zeros(2, 2)
    for i in keep:
        valid_sentences = sentence_mask[i].any(dim=-1)
        per_sentence = scan_reference(
            sentences[i][valid_sentences], sentence_mask[i][valid_sentences], lesions[keep], lesion_mask[keep]
        )  # (sentences, 2)
        study_similarity[i] = per_sentence.mean(dim=0)
    expected = hardest_negative_triplet_loss(study_similarity)
    assert expected > 0
    torch.testing.assert_close(local_alignment_loss(sentences, sentence_mask, lesions, lesion_mask), expected)


def test_local_loss_leaves_out_studies_without_boxes_or_sentences():
    sentences, sentence_mask, lesions, lesion_mask = local_inputs()
    loss = local_alignment_loss(sentences, sentence_mask, lesions, lesion_mask)
    kept = local_alignment_loss(sentences[:2], sentence_mask[:2], lesions[:2], lesion_mask[:2])
    torch.testing.assert_close(loss, kept)
    with torch.no_grad():
        sentences[2:] = 100.0
        lesions[2:] = -100.0
    torch.testing.assert_close(local_alignment_loss(sentences, sentence_mask, lesions, lesion_mask), kept)


@pytest.mark.parametrize("studies", [[1, 2], [2, 3]], ids=["one-valid-study", "no-valid-study"])
def test_local_loss_with_fewer_than_two_valid_studies_is_zero_with_finite_gradients(studies):
    sentences, sentence_mask, lesions, lesion_mask = local_inputs()
    loss = local_alignment_loss(sentences[studies], sentence_mask[studies], lesions[studies], lesion_mask[studies])
    assert loss == 0
    loss.backward()
    assert torch.isfinite(sentences.grad).all() and torch.isfinite(lesions.grad).all()


# Grounding


def test_grounding_puts_the_top_score_on_the_box_each_sentence_describes():
    lesions = F.normalize(torch.randn(4, EMBED, generator=torch.Generator().manual_seed(0)), dim=-1)
    lesion_mask = torch.tensor([True, True, True, False])
    noise = 0.05 * torch.randn(3, 5, EMBED, generator=torch.Generator().manual_seed(1))
    sentences = lesions[[2, 0, 1]][:, None, :] + noise  # sentence s's words point at box (2, 0, 1)[s]
    scores = sentence_box_scores(sentences, torch.ones(3, 5, dtype=torch.bool), lesions, lesion_mask)
    assert scores.shape == (3, 4)
    assert scores.argmax(dim=1).tolist() == [2, 0, 1]
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))


def test_grounding_gives_padded_boxes_zero():
    lesions = F.normalize(torch.randn(3, EMBED, generator=torch.Generator().manual_seed(0)), dim=-1)
    sentences = lesions[2].expand(2, 4, EMBED)  # the sentences describe exactly the padded box
    sentence_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    scores = sentence_box_scores(sentences, sentence_mask, lesions, torch.tensor([True, True, False]))
    assert torch.equal(scores[:, 2], torch.zeros(2))
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2))
