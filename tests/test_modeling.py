"""Behaviour of the CDAN model on tiny random configurations (CPU, offline)."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

import modeling_cdan
from configuration_cdan import ABLATIONS, MODEL_SIZES, CdanConfig
from layers_cdan import CdanAttention, CdanLinear, CdanVisualExtractor, sinusoidal_positions
from modeling_cdan import CdanForConditionalGeneration, CdanNegativeAttention


def tiny_config(**overrides) -> CdanConfig:
    """A CDAN small enough for CPU tests: timm's 0.4 M-parameter `test_resnet`, width 32, two views (64 px inputs)."""
    fields = dict(
        visual_extractor="test_resnet",
        num_views=2,
        vocab_size=40,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        reverse_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        semantic_dim=24,
        max_position_embeddings=64,
        disease_top_k=3,
    )
    fields.update(overrides)
    return CdanConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> CdanForConditionalGeneration:
    torch.manual_seed(seed)
    # A large init_std and an untied head make a random model's next-word distribution peaked and varied (tied
    # random embeddings mostly copy the previous token), so generation tests compare real token sequences.
    fields = dict(init_std=0.5, dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    return CdanForConditionalGeneration(tiny_config(**{**fields, **overrides}))


def study_batch(batch_size: int = 2, num_views: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_views, 3, 64, 64, generator=generator)


def report_labels(batch_size: int = 2, length: int = 9, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, 40, (batch_size, length), generator=generator)
    labels[:, -1] = 2  # eos
    return labels


def test_forward_output_shapes():
    model = tiny_model()
    labels = report_labels()
    outputs = model(pixel_values=study_batch(), labels=labels, output_attentions=True)
    num_patches = 2 * 2 * 2  # two views of a 2x2 feature map
    assert outputs.loss.shape == ()
    assert outputs.logits.shape == (2, 9, 40)
    assert outputs.disease_logits.shape == (2, 14)
    assert outputs.visual_semantics.shape == (2, 24)
    assert outputs.encoder_last_hidden_state.shape == (2, 2 * num_patches + 3, 32)
    assert outputs.positive_attentions.shape == (2, 4, num_patches, num_patches)
    assert outputs.negative_attentions.shape == (2, 4, num_patches, num_patches)


def test_loss_is_finite_and_falls_when_overfitting_four_studies():
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(tiny_config(dropout=0.0, attention_dropout=0.0))
    pixel_values, labels = study_batch(batch_size=4), report_labels(batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_padded_label_positions_do_not_count_in_the_loss():
    model = tiny_model().eval()
    labels = report_labels()
    padded = torch.cat([labels, torch.full((2, 4), -100)], dim=1)
    loss = model(pixel_values=study_batch(), labels=labels).loss
    padded_loss = model(pixel_values=study_batch(), labels=padded).loss
    torch.testing.assert_close(loss, padded_loss)


def test_greedy_generation_equals_step_by_step_argmax():
    model = tiny_model().eval()
    pixel_values = study_batch()
    generated = model.generate(pixel_values=pixel_values, num_beams=1, do_sample=False, max_length=10, min_length=10)
    tokens = torch.full((2, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(9):
            logits = model(pixel_values=pixel_values, decoder_input_ids=tokens, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(set(generated[0].tolist())) > 2, "the test model should write varied tokens"
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_cache_equals_generation_without_cache(num_beams):
    model = tiny_model().eval()
    pixel_values = study_batch()
    cached = model.generate(pixel_values=pixel_values, num_beams=num_beams, max_length=14, use_cache=True)
    uncached = model.generate(pixel_values=pixel_values, num_beams=num_beams, max_length=14, use_cache=False)
    assert cached.shape[1] > 3
    assert torch.equal(cached, uncached)


def test_sampling_and_no_repeat_ngram_run_through_stock_generate():
    model = tiny_model().eval()
    torch.manual_seed(0)
    sampled = model.generate(pixel_values=study_batch(), do_sample=True, top_k=5, num_beams=1, max_length=12)
    blocked = model.generate(pixel_values=study_batch(), num_beams=3, no_repeat_ngram_size=2, max_length=20)
    assert sampled.shape[0] == 2
    for row in blocked.tolist():
        bigrams = [tuple(row[i : i + 2]) for i in range(len(row) - 1) if 0 not in row[i : i + 2]]
        assert len(bigrams) == len(set(bigrams))


def test_save_and_load_round_trip_generates_the_same_reports(tmp_path):
    model = tiny_model(tie_word_embeddings=True).eval()
    model.save_pretrained(tmp_path)
    reloaded = CdanForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixel_values = study_batch()
    assert torch.equal(model.generate(pixel_values=pixel_values), reloaded.generate(pixel_values=pixel_values))
    assert reloaded.generation_config.num_beams == 3
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()


def positive_and_negative_weights(renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights of a positive and a negative attention that share their projections, over 8 tokens."""
    config = tiny_config(renormalize_negative_attention=renormalize)
    positive, negative = CdanAttention(config, 32, 4), CdanNegativeAttention(config, 32, 4)
    negative.load_state_dict(positive.state_dict())
    features = torch.randn(2, 8, 32)
    _, positive_weights = positive(features, features, output_attentions=True)
    _, negative_weights = negative(features, features, output_attentions=True)
    return positive_weights, negative_weights


def test_negative_attention_weights_are_one_minus_positive_weights():
    positive_weights, negative_weights = positive_and_negative_weights(renormalize=False)
    torch.testing.assert_close(negative_weights, 1.0 - positive_weights)


def test_renormalised_negative_attention_rows_sum_to_one():
    positive_weights, negative_weights = positive_and_negative_weights(renormalize=True)
    torch.testing.assert_close(negative_weights, (1.0 - positive_weights) / 7)
    torch.testing.assert_close(negative_weights.sum(-1), torch.ones(2, 4, 8))


@pytest.mark.parametrize("renormalize", [True, False])
def test_negative_attention_sdpa_identity_matches_explicit_weights(renormalize):
    config = tiny_config(renormalize_negative_attention=renormalize)
    config._attn_implementation = "sdpa"
    negative = CdanNegativeAttention(config, 32, 4).eval()
    features = torch.randn(2, 8, 32)
    fused, fused_weights = negative(features, features, output_attentions=False)
    explicit, _ = negative(features, features, output_attentions=True)
    assert fused_weights is None
    torch.testing.assert_close(fused, explicit)


def test_negative_attention_dropout_is_the_same_with_both_kernels():
    outputs = {}
    for implementation in ("sdpa", "eager"):
        config = tiny_config(attention_dropout=0.5)
        config._attn_implementation = implementation
        torch.manual_seed(0)
        negative = CdanNegativeAttention(config, 32, 4, dropout=0.5).train()
        features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        outputs[implementation], _ = negative(features, features)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=0, atol=0)


@pytest.mark.parametrize("output_attentions", [False, True])  # the SDPA kernel, and eager with its weights
def test_cross_attention_groups_the_beams_of_one_study_exactly(output_attentions):
    cross_attention = tiny_model(attn_implementation="sdpa").model.decoder.layers[0].encoder_attn.eval()
    generator = torch.Generator().manual_seed(3)
    memory = torch.randn(2, 11, 32, generator=generator)  # two studies
    beam_queries = torch.randn(2 * 3, 4, 32, generator=generator)  # three beams each, study-major
    with torch.no_grad():
        grouped = cross_attention(beam_queries, memory, output_attentions=output_attentions)
        expanded = cross_attention(beam_queries, memory.repeat_interleave(3, dim=0), output_attentions=output_attentions)
    # Same arithmetic, different kernel calls: fp32 rounding (up to ~1e-5 on AVX512-BF16 CPUs, outputs of order 10);
    # a wrong grouping (a beam reading another study's memory) differs by order 1.
    torch.testing.assert_close(grouped[0], expanded[0], rtol=1e-5, atol=1e-4)
    if output_attentions:
        torch.testing.assert_close(grouped[1], expanded[1])


def test_generation_keeps_one_encoder_memory_per_study():
    model = tiny_model().eval()
    memory_batch_sizes = []
    model.model.decoder.layers[0].encoder_attn.k_proj.register_forward_hook(
        lambda module, args, output: memory_batch_sizes.append(output.shape[0])
    )
    generated = model.generate(pixel_values=study_batch(), num_beams=3, max_length=8)
    assert generated.shape[0] == 2
    assert memory_batch_sizes == [2]  # projected once, for two studies, then read from the cache


def test_top_k_disease_words_follow_the_most_probable_observations():
    model = tiny_model()
    reverse_attention = model.model.encoder.reverse_attention
    disease_logits = torch.tensor([[0.0] * 10 + [5.0, 1.0, 3.0, 2.0], [4.0, 3.5, 3.0] + [-1.0] * 11])
    disease_words, top_k_indices = reverse_attention.select_disease_words(disease_logits)
    assert top_k_indices.tolist() == [[10, 12, 13], [0, 1, 2]]
    probabilities = disease_logits.softmax(-1).gather(1, top_k_indices)
    weights = probabilities / probabilities.sum(-1, keepdim=True)
    expected = reverse_attention.disease_embeddings(top_k_indices) * weights.unsqueeze(-1)
    torch.testing.assert_close(disease_words, expected)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_switches_add_and_remove_modules(ablation):
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(CdanConfig.from_ablation(ablation, **tiny_config().to_diff_dict()))
    uses_reverse_attention = ABLATIONS[ablation]["use_reverse_attention"]
    uses_semantic_consistency = ABLATIONS[ablation]["use_semantic_consistency"]
    outputs = model(pixel_values=study_batch(), labels=report_labels())
    num_tokens = outputs.encoder_last_hidden_state.shape[1]
    assert (model.model.encoder.reverse_attention is not None) == uses_reverse_attention
    assert (outputs.disease_logits is not None) == uses_reverse_attention
    assert num_tokens == (2 * 8 + 3 if uses_reverse_attention else 8)
    assert (model.semantic_projection is not None) == uses_semantic_consistency
    assert (outputs.visual_semantics is not None) == uses_semantic_consistency
    assert any(name.startswith("semantic_projection") for name, _ in model.named_parameters()) == (
        uses_semantic_consistency
    )


def test_semantic_projection_never_runs_during_generation():
    model = tiny_model().eval()
    calls = []
    model.semantic_projection.register_forward_hook(lambda *args: calls.append(1))
    model.generate(pixel_values=study_batch(), max_length=8)
    assert calls == []
    model(pixel_values=study_batch(), labels=report_labels())
    assert calls == [1]


def test_loss_with_num_items_in_batch_sums_to_the_full_batch_loss():
    model = tiny_model().eval()
    pixel_values = study_batch(batch_size=4)
    labels = report_labels(batch_size=4)
    labels[0, 5:] = -100  # uneven lengths: mean-of-means would differ from the token mean
    full_loss = model(pixel_values=pixel_values, labels=labels).loss
    num_items_in_batch = (labels != -100).sum()
    accumulated = sum(
        model(pixel_values=pixel_values[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=num_items_in_batch).loss
        for i in (0, 2)
    )
    torch.testing.assert_close(accumulated, full_loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    pixel_values, labels = study_batch(), report_labels()
    model.train()
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    for name, gradient in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, gradient, msg=name)


def test_channels_last_extractor_gives_the_same_features_as_the_default_format():
    channels_last = tiny_model(visual_extractor_channels_last=True).eval()
    default_format = tiny_model(visual_extractor_channels_last=False).eval()
    pixel_values = study_batch()
    input_formats = []
    for model in (channels_last, default_format):
        model.model.encoder.visual_extractor.backbone.conv1.register_forward_pre_hook(
            lambda module, args: input_formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    with torch.no_grad():
        torch.testing.assert_close(
            channels_last.model.encoder.visual_extractor(pixel_values),
            default_format.model.encoder.visual_extractor(pixel_values),
        )
    assert input_formats == [True, False]


def prepacked_linear(seed: int = 0) -> CdanLinear:
    torch.manual_seed(seed)
    return CdanLinear(16, 24).eval()


def test_prepacked_linear_matches_f_linear_without_autograd():
    layer, hidden_states = prepacked_linear(), torch.randn(5, 3, 16)
    with torch.no_grad():
        assert layer.uses_packed_weight(hidden_states)
        packed_output = layer(hidden_states)
    assert layer._packed_weight is not None and layer._packed_weight.is_mkldnn
    torch.testing.assert_close(packed_output, nn.functional.linear(hidden_states, layer.weight, layer.bias))


def test_prepacked_linear_follows_in_place_weight_updates():
    layer, hidden_states = prepacked_linear(), torch.randn(4, 16)
    with torch.no_grad():
        layer(hidden_states)
        layer.weight.mul_(-2.0)  # an optimizer step or `load_state_dict` changes the weight in place
        updated_output = layer(hidden_states)
        expected = nn.functional.linear(hidden_states, layer.weight, layer.bias)
    torch.testing.assert_close(updated_output, expected)


def test_prepacked_linear_follows_a_replaced_weight():
    layer, hidden_states = prepacked_linear(), torch.randn(4, 16)
    with torch.no_grad():
        layer(hidden_states)
        layer.weight = nn.Parameter(torch.randn(24, 16))
        replaced_output = layer(hidden_states)
        expected = nn.functional.linear(hidden_states, layer.weight, layer.bias)
    torch.testing.assert_close(replaced_output, expected)


@pytest.mark.parametrize("setting", ["autograd", "autocast", "switched_off", "inference_tensor_weight", "many_rows"])
def test_prepacked_linear_falls_back_to_nn_linear(setting):
    torch.manual_seed(0)
    with torch.inference_mode(setting == "inference_tensor_weight"):
        layer = CdanLinear(16, 24, prepack_on_cpu=setting != "switched_off")
    hidden_states = torch.randn(2, CdanLinear.max_packed_rows if setting == "many_rows" else 2, 16)
    with (
        torch.set_grad_enabled(setting == "autograd"),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"),
    ):
        assert not layer.uses_packed_weight(hidden_states)
        layer(hidden_states)
    assert layer._packed_weight is None


def test_prepacked_linear_without_the_onednn_ops_falls_back_to_f_linear(monkeypatch):
    def missing_operator(*args):
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing_operator)
    layer, hidden_states = prepacked_linear(), torch.randn(4, 16)
    with torch.no_grad():
        output = layer(hidden_states)
    torch.testing.assert_close(output, nn.functional.linear(hidden_states, layer.weight, layer.bias))
    assert not layer.prepack_on_cpu


def test_prepacked_linear_saves_and_copies_like_nn_linear():
    layer, hidden_states = prepacked_linear(), torch.randn(4, 16)
    with torch.no_grad():
        expected = layer(hidden_states)
        copied = copy.deepcopy(layer)
        assert copied._packed_weight is None and set(layer.state_dict()) == {"weight", "bias"}
        torch.testing.assert_close(copied(hidden_states), expected)


def test_prepacked_linear_layers_do_not_change_the_reports():
    prepacked, plain = tiny_model(prepacked_cpu_linear=True).eval(), tiny_model(prepacked_cpu_linear=False).eval()
    pixel_values = study_batch()
    reports = [model.generate(pixel_values=pixel_values, num_beams=3, max_length=12) for model in (prepacked, plain)]
    packed_layers = [module for module in prepacked.modules() if getattr(module, "_packed_weight", None) is not None]
    assert torch.equal(reports[0], reports[1])
    assert prepacked.lm_head in packed_layers and prepacked.model.decoder.layers[0].feed_forward.fc1 in packed_layers
    assert not any(getattr(module, "_packed_weight", None) is not None for module in plain.modules())


def test_sdpa_and_eager_models_agree():
    eager = tiny_model(attn_implementation="eager").eval()
    sdpa = tiny_model(attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    labels = report_labels()
    torch.testing.assert_close(
        eager(pixel_values=study_batch(), labels=labels).logits, sdpa(pixel_values=study_batch(), labels=labels).logits
    )


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(2, 3, 3, 64, 64), "2 view"),
        (torch.randn(0, 2, 3, 64, 64), "empty batch"),
        (torch.randn(2, 3, 64, 64), "shape"),
        (None, "pixel_values"),
        (torch.randn(2, 2, 3, 64, 64).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), r"studies \[1\]"),
    ],
)
def test_bad_pixel_values_raise_a_clear_error(pixel_values, message):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=message):
        model.generate(pixel_values=pixel_values) if pixel_values is not None else model(labels=report_labels())


def test_visual_extractor_loads_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config()
    torch.manual_seed(5)
    source = CdanVisualExtractor(config)
    save_file(source.backbone.state_dict(), tmp_path / "backbone.safetensors")
    model = CdanForConditionalGeneration.from_backbone_pretrained(
        config, weights_path=tmp_path / "backbone.safetensors"
    )
    for name, tensor in source.backbone.state_dict().items():
        torch.testing.assert_close(model.model.encoder.visual_extractor.backbone.state_dict()[name], tensor)


def test_visual_extractor_weights_of_another_architecture_are_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    extractor = CdanVisualExtractor(tiny_config())
    with pytest.raises(ValueError, match="do not fit"):
        extractor.load_pretrained_weights(tmp_path / "other.safetensors")


def test_missing_visual_extractor_weights_file_names_the_path(tmp_path):
    extractor = CdanVisualExtractor(tiny_config())
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        extractor.load_pretrained_weights(tmp_path / "nowhere.safetensors")


def test_offline_download_failure_says_how_to_pass_local_weights(monkeypatch):
    import timm

    extractor = CdanVisualExtractor(tiny_config())

    def offline_create_model(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise ConnectionError("no network")
        return timm.models.create_model(*args, **kwargs)

    monkeypatch.setattr("layers_cdan.timm.create_model", offline_create_model)
    with pytest.raises(OSError, match="visual_extractor_weights"):
        extractor.load_pretrained_weights()


def test_cached_visual_features_give_the_same_outputs_as_pixels():
    model = tiny_model().eval()
    pixel_values, labels = study_batch(), report_labels()
    with torch.no_grad():
        visual_features = model.model.encoder.visual_extractor(pixel_values)
        from_pixels = model(pixel_values=pixel_values, labels=labels)
        from_features = model(visual_features=visual_features, labels=labels)
    torch.testing.assert_close(from_features.logits, from_pixels.logits)
    assert torch.equal(model.generate(visual_features=visual_features), model.generate(pixel_values=pixel_values))


def test_frozen_visual_extractor_keeps_its_batchnorm_statistics():
    model = tiny_model()
    extractor = model.model.encoder.visual_extractor
    extractor.requires_grad_(False)
    model.train()
    assert not extractor.training and model.model.decoder.training
    running_means = [module.running_mean.clone() for module in extractor.modules() if hasattr(module, "running_mean")]
    model(pixel_values=study_batch(), labels=report_labels())
    after = [module.running_mean for module in extractor.modules() if hasattr(module, "running_mean")]
    assert running_means and all(torch.equal(a, b) for a, b in zip(running_means, after))


def test_return_dict_false_gives_the_outputs_as_a_tuple():
    model = tiny_model().eval()
    labels = report_labels()
    as_tuple = model(pixel_values=study_batch(), labels=labels, return_dict=False)
    as_output = model(pixel_values=study_batch(), labels=labels)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)


@pytest.mark.parametrize("prepacked", [True, False])
def test_every_linear_layer_follows_the_prepacking_switch(prepacked):
    model = tiny_model(prepacked_cpu_linear=prepacked)
    linear_layers = [module for module in model.modules() if isinstance(module, CdanLinear)]
    assert len(linear_layers) > 20
    assert all(layer.prepack_on_cpu is prepacked for layer in linear_layers)


def test_equation_comments_use_the_papers_numbers():
    source = Path(modeling_cdan.__file__).read_text()
    definitions = {
        "u_p = self.positive_layer_norm": 10,
        "u_n = self.negative_layer_norm": 11,
        "u_pn = self.discrepancy_layer_norm": 12,
        "u_c = self.disease_classifier": 13,
        "u_k, _ = self.select_disease_words": 14,
        "u_s = torch.cat([u_p, u_n, u_k]": 16,
        "loss = self.loss_function": 3,
        "visual_features = self.visual_extractor(": 4,
    }
    for code, number in definitions.items():
        (line,) = [line for line in source.splitlines() if code in line]
        assert f"# Eq. ({number})" in line, line


def test_paper_sized_configuration_is_within_half_a_percent_of_the_papers_parameter_count():
    with torch.device("meta"):
        default = CdanForConditionalGeneration(CdanConfig())
        paper_sized = CdanForConditionalGeneration(CdanConfig(**MODEL_SIZES["paper-82m"]))
    assert sum(parameter.numel() for parameter in default.parameters()) == 69_838_670
    assert abs(sum(parameter.numel() for parameter in paper_sized.parameters()) / 82.25e6 - 1) < 0.005


# ---------------------------------------------------------------------------------------------------------------------
# Wiring of the reverse-attention module (Eq. 10-16): each stream reaches the right place
# ---------------------------------------------------------------------------------------------------------------------


def reverse_attention_streams(model: CdanForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Run the encoder once in eval mode and record u_p, u_n, u_pn, the discrepancy attention's inputs, the
    classifier's input, u_k and u_s from forward hooks."""
    reverse_attention = model.model.encoder.reverse_attention
    recorded = {}

    def keep(name):
        return lambda module, inputs, output: recorded.__setitem__(name, output)

    reverse_attention.positive_layer_norm.register_forward_hook(keep("u_p"))
    reverse_attention.negative_layer_norm.register_forward_hook(keep("u_n"))
    reverse_attention.discrepancy_layer_norm.register_forward_hook(keep("u_pn"))
    reverse_attention.discrepancy_attention.register_forward_hook(
        lambda module, inputs, output: recorded.__setitem__("discrepancy_inputs", inputs)
    )
    reverse_attention.disease_classifier.register_forward_hook(
        lambda module, inputs, output: recorded.__setitem__("classifier_input", inputs[0])
    )
    reverse_attention.register_forward_hook(lambda module, inputs, output: recorded.__setitem__("u_s", output[0]))
    model.model.encoder.layers[0].register_forward_pre_hook(
        lambda module, inputs: recorded.__setitem__("encoder_input", inputs[0])
    )
    with torch.no_grad():
        recorded["disease_logits"] = model.model.encoder(pixel_values=study_batch()).disease_logits
    return recorded


def test_discrepancy_attention_queries_u_p_against_u_n():
    streams = reverse_attention_streams(tiny_model().eval())
    queries, keys_and_values = streams["discrepancy_inputs"]
    assert not torch.allclose(streams["u_p"], streams["u_n"])
    torch.testing.assert_close(queries, streams["u_p"], rtol=0, atol=0)
    torch.testing.assert_close(keys_and_values, streams["u_n"], rtol=0, atol=0)


def test_disease_classifier_reads_the_pooled_discrepancy_u_pn():
    streams = reverse_attention_streams(tiny_model().eval())
    torch.testing.assert_close(streams["classifier_input"], streams["u_pn"].mean(dim=1), rtol=0, atol=0)


def test_decoder_memory_u_s_stacks_u_p_u_n_and_the_disease_words():
    model = tiny_model().eval()
    streams = reverse_attention_streams(model)
    num_patches = streams["u_p"].shape[1]
    disease_words, _ = model.model.encoder.reverse_attention.select_disease_words(streams["disease_logits"])
    u_s = streams["u_s"]
    torch.testing.assert_close(u_s[:, :num_patches], streams["u_p"], rtol=0, atol=0)
    torch.testing.assert_close(u_s[:, num_patches : 2 * num_patches], streams["u_n"], rtol=0, atol=0)
    torch.testing.assert_close(u_s[:, 2 * num_patches :], disease_words, rtol=0, atol=0)


def test_segment_embeddings_mark_the_three_streams_of_the_encoder_input():
    model = tiny_model().eval()
    streams = reverse_attention_streams(model)
    u_s, num_patches = streams["u_s"], streams["u_p"].shape[1]
    positions = sinusoidal_positions(u_s.shape[1], u_s.shape[2], u_s.device, u_s.dtype)
    segments = model.model.encoder.segment_embeddings.weight
    expected_segments = torch.cat([segments[0].expand(num_patches, -1), segments[1].expand(num_patches, -1),
                                   segments[2].expand(u_s.shape[1] - 2 * num_patches, -1)])  # fmt: skip
    torch.testing.assert_close(streams["encoder_input"] - u_s - positions, expected_segments.expand_as(u_s))


# ---------------------------------------------------------------------------------------------------------------------
# Beam search against references
# ---------------------------------------------------------------------------------------------------------------------


def test_greedy_generation_equals_beam_search_with_one_beam(monkeypatch):
    model = tiny_model().eval()
    pixel_values = study_batch()
    greedy = model.generate(pixel_values=pixel_values, num_beams=1, max_length=12, min_length=12)
    # `generate()` maps num_beams=1 to greedy search; run its beam search with one beam instead
    beam_search_mode = lambda self, assistant_model=None: GenerationMode.BEAM_SEARCH  # noqa: E731
    monkeypatch.setattr(GenerationConfig, "get_generation_mode", beam_search_mode)
    calls = []
    beam_search = CdanForConditionalGeneration._beam_search
    monkeypatch.setattr(
        CdanForConditionalGeneration, "_beam_search", lambda *args, **kwargs: calls.append(1) or beam_search(*args, **kwargs)
    )
    one_beam = model.generate(pixel_values=pixel_values, num_beams=1, max_length=12, min_length=12)
    assert calls == [1]
    assert torch.equal(greedy, one_beam)


def reference_beam_search(model, pixel_values: torch.Tensor, num_beams: int, length: int) -> torch.Tensor:
    """
    Beam search by hand: at each step keep the `num_beams` highest sums of log-probabilities over every beam and word,
    recomputing the whole prefix (no cache); <eos> is banned, so every hypothesis has `length` tokens.
    """
    best = []
    for study in range(pixel_values.shape[0]):
        with torch.no_grad():
            memory = model.get_encoder()(pixel_values=pixel_values[study : study + 1])
            tokens = torch.tensor([[model.config.decoder_start_token_id]])
            scores = torch.zeros(1)
            for _ in range(length - 1):
                logits = model(encoder_outputs=memory, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
                log_probs = logits.log_softmax(dim=-1)
                log_probs[:, model.config.eos_token_id] = float("-inf")
                candidate_scores = (scores[:, None] + log_probs).flatten()  # (beams * vocab,)
                scores, flat_indices = candidate_scores.topk(num_beams)
                beam_indices, words = flat_indices // log_probs.shape[1], flat_indices % log_probs.shape[1]
                tokens = torch.cat([tokens[beam_indices], words[:, None]], dim=1)
        best.append(tokens[0])
    return torch.stack(best)


def test_beam_search_of_three_finds_the_reference_beam_search_hypothesis():
    model = tiny_model().eval()
    pixel_values = study_batch(batch_size=3)
    generated = model.generate(pixel_values=pixel_values, num_beams=3, max_length=10, min_length=10)
    greedy = model.generate(pixel_values=pixel_values, num_beams=1, max_length=10, min_length=10)
    assert not torch.equal(generated, greedy), "choose a model where beam search and greedy search differ"
    assert torch.equal(generated, reference_beam_search(model, pixel_values, num_beams=3, length=10))


# ---------------------------------------------------------------------------------------------------------------------
# Generation arguments checked before decoding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [0, -1, 2.5])
def test_generate_rejects_a_num_beams_that_is_not_a_positive_integer(num_beams):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=rf"`num_beams` must be a positive integer, got {num_beams}"):
        model.generate(pixel_values=study_batch(), num_beams=num_beams)


def test_generate_rejects_zero_return_sequences():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="`num_return_sequences` must be a positive integer, got 0"):
        model.generate(pixel_values=study_batch(), num_return_sequences=0)


@pytest.mark.parametrize(
    "lengths, named",
    [
        (dict(max_length=66), r"`max_length`=66 \(66 tokens\)"),
        (dict(max_new_tokens=65), r"`max_new_tokens`=65 \(66 tokens\)"),
        (dict(min_length=100, max_length=20), r"`min_length`=100 \(100 tokens\)"),
        (dict(min_new_tokens=65, max_new_tokens=10), r"`min_new_tokens`=65 \(66 tokens\)"),
    ],
)
def test_generate_rejects_lengths_beyond_the_decoder_positions_before_decoding(lengths, named):
    model = tiny_model().eval()  # max_position_embeddings=64: reports of at most 65 tokens, start token included
    decoder_calls = []
    model.get_decoder().register_forward_pre_hook(lambda module, args: decoder_calls.append(1))
    with pytest.raises(ValueError, match=rf"{named} would need more decoder positions.*`max_position_embeddings`=64"):
        model.generate(pixel_values=study_batch(), num_beams=2, **lengths)
    assert decoder_calls == []


def test_generate_still_writes_reports_of_the_longest_length_the_positions_allow():
    model = tiny_model().eval()
    generated = model.generate(pixel_values=study_batch(), num_beams=2, max_length=65, min_length=65)
    assert generated.shape == (2, 65)
