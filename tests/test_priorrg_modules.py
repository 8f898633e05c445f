"""The PriorRG building blocks of `priorrg_modules` on tiny random sizes (CPU, offline)."""

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from priorrg_modules import (
    ContextEncoder,
    ContrastiveHead,
    LayerwiseFusion,
    PerceiverResampler,
    TemporalFusion,
    ViewTemporalEmbeddings,
    format_clinical_context,
    multi_positive_info_nce,
    pooled_image_embedding,
    study_targets,
)
from trainer_cdan import offline_text_encoder_path

WIDTH = 16


def tiny_resampler(**overrides) -> PerceiverResampler:
    torch.manual_seed(0)
    sizes = {"hidden_size": WIDTH, "num_latents": 5, "depth": 2, "num_heads": 2, "head_dim": 4, "ff_mult": 2}
    return PerceiverResampler(**{**sizes, **overrides}).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config, add_pooling_layer=False).eval()


# Perceiver resampler


def test_perceiver_shapes_and_chained_passes():
    resampler = tiny_resampler()
    context, image = torch.randn(2, 7, WIDTH), torch.randn(2, 9, WIDTH)
    with torch.no_grad():
        ctx = resampler(context, torch.ones(2, 7, dtype=torch.bool))
        st = resampler(image, latents=ctx)
        joint = resampler(image, latents=st[:, :3])
    assert ctx.shape == st.shape == (2, 5, WIDTH)
    assert joint.shape == (2, 3, WIDTH)


def test_perceiver_ignores_masked_inputs():
    resampler = tiny_resampler()
    inputs = torch.randn(2, 6, WIDTH)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    changed_masked, changed_unmasked = inputs.clone(), inputs.clone()
    changed_masked[~mask] = 1e3 * torch.randn(int((~mask).sum()), WIDTH)
    changed_unmasked[0, 1] = torch.randn(WIDTH)  # not a constant shift, which the input LayerNorm removes
    with torch.no_grad():
        reference = resampler(inputs, mask)
        assert torch.allclose(resampler(changed_masked, mask), reference, rtol=0, atol=1e-6)
        assert not torch.allclose(resampler(changed_unmasked, mask)[0], reference[0], atol=1e-4)


def test_perceiver_all_masked_study_is_finite_and_input_free():
    resampler = tiny_resampler()
    inputs = torch.randn(2, 4, WIDTH)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    other_inputs = inputs.clone()
    other_inputs[0] = torch.randn(4, WIDTH)
    with torch.no_grad():
        output = resampler(inputs, mask)
        assert torch.isfinite(output).all()
        assert torch.equal(resampler(other_inputs, mask)[0], output[0])  # nothing of a masked study is read
        assert torch.allclose(resampler(inputs[1:], mask[1:]), output[1:], atol=1e-6)  # neighbour unaffected
    inputs.requires_grad_(True)
    resampler(inputs, mask).sum().backward()
    assert torch.isfinite(inputs.grad).all() and torch.equal(inputs.grad[0], torch.zeros(4, WIDTH))


def test_perceiver_given_latents_replace_learned_ones():
    resampler = tiny_resampler()
    inputs = torch.randn(2, 4, WIDTH)
    given = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        learned = resampler.latents.unsqueeze(0).expand(2, -1, -1)
        assert torch.allclose(resampler(inputs, latents=learned), resampler(inputs), atol=1e-6)
        from_given = resampler(inputs, latents=given)
        resampler.latents.add_(1.0)  # the learned latents no longer matter
        assert torch.equal(resampler(inputs, latents=given), from_given)
        assert not torch.allclose(from_given, resampler(inputs), atol=1e-3)


def test_perceiver_flamingo_keys_variant_masks_too():
    resampler = tiny_resampler(concat_latents_to_keys=True)
    inputs = torch.randn(1, 4, WIDTH)
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    changed = inputs.clone()
    changed[0, 2:] = torch.randn(2, WIDTH)
    with torch.no_grad():
        assert torch.allclose(resampler(changed, mask), resampler(inputs, mask), rtol=0, atol=1e-6)
        assert torch.isfinite(resampler(inputs, torch.zeros(1, 4, dtype=torch.bool))).all()


# Temporal fusion


def test_temporal_fusion_skips_studies_without_prior_in_a_mixed_batch():
    torch.manual_seed(0)
    fusion = TemporalFusion(WIDTH, num_layers=2, num_heads=2).eval()
    current, prior = torch.randn(3, 5, WIDTH), torch.randn(3, 4, WIDTH)
    prior[1] = float("nan")  # never read for a study without a prior
    has_prior = torch.tensor([True, False, True])
    with torch.no_grad():
        output = fusion(current, prior, has_prior)
        alone = fusion(current[:1], prior[:1], has_prior[:1])
    assert output.shape == current.shape
    assert torch.equal(output[1], current[1])
    assert not torch.allclose(output[0], current[0], atol=1e-3)
    assert not torch.allclose(output[2], current[2], atol=1e-3)
    assert torch.allclose(output[0], alone[0], atol=1e-6)
    assert fusion(current, prior, torch.zeros(3, dtype=torch.bool)) is current


def test_temporal_fusion_ignores_masked_prior_tokens():
    torch.manual_seed(0)
    fusion = TemporalFusion(WIDTH, num_layers=1, num_heads=2).eval()
    current, prior = torch.randn(1, 3, WIDTH), torch.randn(1, 4, WIDTH)
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    changed = prior.clone()
    changed[0, 2:] = torch.randn(2, WIDTH)
    has_prior = torch.tensor([True])
    with torch.no_grad():
        assert torch.allclose(
            fusion(current, changed, has_prior, mask), fusion(current, prior, has_prior, mask), atol=1e-6
        )


# View and temporal embeddings


def test_view_embeddings_map_unknown_views_to_the_unknown_index():
    embeddings = ViewTemporalEmbeddings(WIDTH, view_positions=("PA", "AP", "LATERAL", "LL"))
    ids = embeddings.view_position_ids(["pa", " LATERAL ", None, "", "SWIMMERS"])
    assert ids.tolist() == [0, 2, 4, 4, 4]
    assert embeddings.unknown_view_id == 4


def test_view_and_temporal_embeddings_are_added_per_image():
    embeddings = ViewTemporalEmbeddings(WIDTH)
    tokens = torch.zeros(2, 3, WIDTH)
    with torch.no_grad():
        output = embeddings(tokens, ["AP", None], temporal_ids=ViewTemporalEmbeddings.PRIOR)
    expected = embeddings.view_embeddings.weight[[1, 4]] + embeddings.temporal_embeddings.weight[1]
    assert torch.equal(output, expected[:, None, :].expand(2, 3, WIDTH))


# Layer-wise fusion


def test_layerwise_fusion_shape_and_twelve_layer_convolutions():
    fusion = LayerwiseFusion(num_layers=12, hidden_size=8).eval()
    layers = [torch.randn(2, 5, 8) for _ in range(12)]
    with torch.no_grad():
        assert fusion(layers).shape == (2, 5, 8)
        assert fusion(torch.stack(layers, dim=1)).shape == (2, 5, 8)
    convolutions = [module for module in fusion.projection if isinstance(module, torch.nn.Conv2d)]
    assert [(conv.in_channels, conv.out_channels) for conv in convolutions] == [(12, 6), (6, 1)]


def test_layerwise_fusion_depends_on_every_layer():
    torch.manual_seed(0)
    fusion = LayerwiseFusion(num_layers=4, hidden_size=8).eval()
    hidden_states = torch.randn(1, 4, 5, 8, requires_grad=True)
    fusion(hidden_states).sum().backward()
    per_layer = hidden_states.grad.abs().sum(dim=(0, 2, 3))  # (L,)
    assert (per_layer > 0).all()


# Contrastive loss


def test_info_nce_matches_hand_computation_with_two_images_of_one_study():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    reports = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    study_ids = ["s1", "s1", "s2"]  # images 0 and 1 share a study
    scale = 2.0

    def unit(vector):
        norm = math.hypot(*vector)
        return [value / norm for value in vector]

    a, b = [unit(v) for v in images.tolist()], [unit(v) for v in reports.tolist()]
    logits = [[scale * (x[0] * y[0] + x[1] * y[1]) for y in b] for x in a]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]

    def cross_entropy(rows):
        total = 0.0
        for row, target in zip(rows, targets):
            log_norm = math.log(sum(math.exp(value) for value in row))
            total += -sum(t * (value - log_norm) for t, value in zip(target, row))
        return total / len(rows)

    expected = (cross_entropy(logits) + cross_entropy([list(column) for column in zip(*logits)])) / 2
    loss = multi_positive_info_nce(images, reports, study_ids, scale)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert study_targets(study_ids).tolist() == targets
    assert multi_positive_info_nce(reports, images, study_ids, scale).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_decreases_when_matching_pairs_get_closer():
    torch.manual_seed(0)
    images, reports = torch.randn(4, 8), torch.randn(4, 8)
    study_ids = torch.tensor([0, 1, 1, 2])
    before = multi_positive_info_nce(images, reports, study_ids, 10.0)
    after = multi_positive_info_nce(images, 0.5 * reports + 0.5 * images, study_ids, 10.0)
    assert after < before


def test_contrastive_head_temperature_learns_and_is_capped():
    head = ContrastiveHead()
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    ctx, st = torch.randn(3, 4, WIDTH), torch.randn(3, 4, WIDTH)
    loss = head(pooled_image_embedding(ctx, st), torch.randn(3, WIDTH), torch.tensor([5, 5, 9]))
    loss.backward()
    assert head.logit_scale.grad is not None and head.logit_scale.grad.abs() > 0
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.scale().item() == pytest.approx(100.0)
    head.reset_parameters()
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


# Clinical context


@pytest.mark.parametrize(
    ("indication", "history", "expected"),
    [
        ("Cough.", "COPD.", "[INDICATION] Cough. [SEP] [HISTORY] COPD."),
        ("  Fever  ", None, "[INDICATION] Fever"),
        (None, "Smoker", "[HISTORY] Smoker"),
        ("   ", "", ""),
        (None, None, ""),
    ],
)
def test_format_clinical_context(indication, history, expected):
    assert format_clinical_context(indication, history) == expected


def test_context_encoder_projects_tokens_and_masks_missing_context():
    encoder = ContextEncoder(tiny_bert(), projection_dim=WIDTH)
    input_ids = torch.tensor([[2, 5, 6, 3], [2, 3, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        states, mask = encoder(input_ids, attention_mask, has_context=torch.tensor([True, False]))
        latents = tiny_resampler()(states, mask)
    assert states.shape == (2, 4, WIDTH)
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert torch.isfinite(latents).all()


def test_context_encoder_wraps_a_real_bert_family_model():
    from transformers import AutoModel, AutoTokenizer

    path = offline_text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = ContextEncoder(AutoModel.from_pretrained(path).eval(), projection_dim=WIDTH)
    texts = [format_clinical_context("Shortness of breath.", "CHF."), format_clinical_context("Trauma.", None)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states, mask = encoder(**batch)
    assert states.shape == (2, batch["input_ids"].shape[1], WIDTH)
    assert mask.tolist() == batch["attention_mask"].bool().tolist()
