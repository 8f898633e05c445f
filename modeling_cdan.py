"""PyTorch CDAN: Cross-modal Discrepancy Attention Network for radiology report generation.

CDAN reads the patch features of a chest X-ray study, looks both where self-attention looks (positive attention) and
where it does not (negative or *reverse* attention), classifies the discrepancy between the two into the 14 CheXpert
observations, embeds the most probable ones as disease words, and decodes a findings report from all three.

References:
1) Chen, Huang & Tan, "Cross-modal Discrepancy Attention Network for radiology report generation",
   Journal of Guangdong University of Technology 42(1):70-78, 2025. Equation numbers in comments are the paper's:
   L_text (3), visual extractor (4), PositiveAttention (5)-(8), NegativeAttention (9), u_p (10), u_n (11),
   u_pn (12), u_c (13), u_k (14), L_mlc (15), u_s (16), ClinicalBERT and L_mse (17)-(18), decoder (19)-(21),
   total loss (22).
2) Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020 (R2Gen): the IU X-Ray /
   MIMIC-CXR protocol and the stacking of several views along the token axis.
3) Vaswani et al., "Attention Is All You Need", NeurIPS 2017: the encoder and decoder layers.
4) Jin et al., "PromptMRG: Diagnosis-Driven Prompts for Medical Report Generation", AAAI 2024: the idea behind the
   optional diagnosis prompt (`CdanConfig.use_diagnosis_prompt`), which is not part of the paper's CDAN.
5) Hugging Face transformers: BART (attention with `EncoderDecoderCache` and `layer_idx`), VisionEncoderDecoder
   (model layout), T5Gemma2 (`self.loss_function`).
"""

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

try:
    from .configuration_cdan import DIAGNOSIS_STATES, CdanConfig
    from .d2r_modules import ImageTextAlignment, LesionEncoder
    from .layers_cdan import (
        CdanAttention,
        CdanDecoderLayer,
        CdanEncoderLayer,
        CdanLinear,
        CdanVisualExtractor,
        SharedMemoryGenerationMixin,
        check_lesion_box_tensors,
        check_study_pixel_values,
        key_padding_mask,
        patch_features_to_maps,
        shift_tokens_right,
        sinusoidal_positions,
    )
    from .priorrg_modules import (
        ContextEncoder,
        PerceiverResampler,
        TemporalFusion,
        ViewTemporalEmbeddings,
        scatter_rows,
    )
except ImportError:
    from configuration_cdan import DIAGNOSIS_STATES, CdanConfig
    from d2r_modules import ImageTextAlignment, LesionEncoder
    from layers_cdan import (
        CdanAttention,
        CdanDecoderLayer,
        CdanEncoderLayer,
        CdanLinear,
        CdanVisualExtractor,
        SharedMemoryGenerationMixin,
        check_lesion_box_tensors,
        check_study_pixel_values,
        key_padding_mask,
        patch_features_to_maps,
        shift_tokens_right,
        sinusoidal_positions,
    )
    from priorrg_modules import (
        ContextEncoder,
        PerceiverResampler,
        TemporalFusion,
        ViewTemporalEmbeddings,
        scatter_rows,
    )


logger = logging.get_logger(__name__)

DEFAULT_GENERATION_KWARGS = {"num_beams": 3, "max_length": 60, "early_stopping": True}
"""R2Gen-family evaluation decodes with beam 3 and at most 60 tokens (IU X-Ray); saved in generation_config.json."""


@dataclass
class CdanEncoderOutput(BaseModelOutput):
    r"""
    Output of the CDAN encoder: the visual extractor, the reverse-attention module and the transformer encoder.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, d_model)`):
            Encoded `u_s`, the memory the decoder cross-attends to.
        disease_logits (`torch.FloatTensor` of shape `(batch_size, num_observations)`, *optional*):
            `u_c`, the observation logits classified from `u_pn`. `None` without reverse attention.
        pooled_semantic_states (`torch.FloatTensor` of shape `(batch_size, d_model)`):
            Mean of `u_s` over its tokens, the input of the semantic-consistency projection.
        positive_attentions (`torch.FloatTensor` of shape `(batch_size, num_heads, num_patches, num_patches)`, *optional*):
            Softmax weights of the positive attention, returned when `output_attentions=True`.
        negative_attentions (`torch.FloatTensor` of shape `(batch_size, num_heads, num_patches, num_patches)`, *optional*):
            Weights of the negative attention (`1 - softmax`, renormalised if configured), returned when
            `output_attentions=True`.
        memory_mask (`torch.BoolTensor` of shape `(batch_size, memory_length)`, *optional*):
            With `use_lesion_branch`: `True` for the memory tokens to attend to (padded boxes are `False`).
        patch_embeddings (`torch.FloatTensor` of shape `(batch_size, num_patches, d_model)`, *optional*):
            With `use_lesion_alignment`: the projected patch features `u`, GAB's image side.
        lesion_embeddings (`torch.FloatTensor` of shape `(batch_size, num_views * max_lesion_boxes, d_model)`, *optional*):
            With `use_lesion_branch`: one feature per box (exact zeros at padding), LAB's image side.
        lesion_mask (`torch.BoolTensor` of shape `(batch_size, num_views * max_lesion_boxes)`, *optional*):
            Which lesion rows are real boxes.
    """

    disease_logits: torch.FloatTensor | None = None
    pooled_semantic_states: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None
    memory_mask: torch.BoolTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    lesion_embeddings: torch.FloatTensor | None = None
    lesion_mask: torch.BoolTensor | None = None


@dataclass
class CdanSeq2SeqModelOutput(Seq2SeqModelOutput):
    r"""
    [`Seq2SeqModelOutput`] plus the reverse-attention outputs of [`CdanEncoderOutput`].

    Args:
        disease_logits (`torch.FloatTensor` of shape `(batch_size, num_observations)`, *optional*):
            `u_c`, the CheXpert observation logits.
        pooled_semantic_states (`torch.FloatTensor` of shape `(batch_size, d_model)`, *optional*):
            Mean of `u_s` over its tokens.
        positive_attentions (`torch.FloatTensor`, *optional*):
            Positive attention weights, when `output_attentions=True`.
        negative_attentions (`torch.FloatTensor`, *optional*):
            Negative attention weights, when `output_attentions=True`.
        diagnosis_states (`torch.LongTensor` of shape `(batch_size, num_observations)`, *optional*):
            The diagnosis prompt the decoder read (indices into `DIAGNOSIS_STATES`), when `use_diagnosis_prompt`.
        patch_embeddings, lesion_embeddings, lesion_mask:
            The lesion branch's outputs of [`CdanEncoderOutput`], for the alignment losses.
    """

    disease_logits: torch.FloatTensor | None = None
    pooled_semantic_states: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None
    diagnosis_states: torch.LongTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    lesion_embeddings: torch.FloatTensor | None = None
    lesion_mask: torch.BoolTensor | None = None


@dataclass
class CdanSeq2SeqLMOutput(Seq2SeqLMOutput):
    r"""
    Output of [`CdanForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
            Token cross-entropy of the report (the paper's L_text). The multi-label and semantic-consistency terms
            are added by the trainer from `disease_logits` and `visual_semantics`.
        logits (`torch.FloatTensor` of shape `(batch_size, target_length, vocab_size)`):
            Next-word scores.
        disease_logits (`torch.FloatTensor` of shape `(batch_size, num_observations)`, *optional*):
            `u_c`, the CheXpert observation logits; `None` without reverse attention.
        visual_semantics (`torch.FloatTensor` of shape `(batch_size, semantic_dim)`, *optional*):
            Pooled `u_s` projected to the text encoder's width, the semantic-consistency target. Computed only when
            semantic consistency is on and `labels` are given, so never during generation.
        positive_attentions (`torch.FloatTensor`, *optional*):
            Positive attention weights, when `output_attentions=True`.
        negative_attentions (`torch.FloatTensor`, *optional*):
            Negative attention weights, when `output_attentions=True`.
        diagnosis_states (`torch.LongTensor` of shape `(batch_size, num_observations)`, *optional*):
            The diagnosis prompt the decoder read (indices into `DIAGNOSIS_STATES`), when `use_diagnosis_prompt`.
        global_alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
            With `use_lesion_alignment` and the report text inputs: D2R-Net's GAB loss (added by the trainer).
        local_alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
            With `use_lesion_alignment` and the sentence inputs: D2R-Net's LAB loss (added by the trainer).
        lesion_embeddings, lesion_mask:
            With `use_lesion_branch`: the per-box features and their mask (see [`CdanEncoderOutput`]).
    """

    disease_logits: torch.FloatTensor | None = None
    visual_semantics: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None
    diagnosis_states: torch.LongTensor | None = None
    global_alignment_loss: torch.FloatTensor | None = None
    local_alignment_loss: torch.FloatTensor | None = None
    lesion_embeddings: torch.FloatTensor | None = None
    lesion_mask: torch.BoolTensor | None = None


def diagnosis_states_from_logits(
    disease_logits: torch.Tensor, thresholds: list[float] | None = None, uncertainty_margin: float = 0.0
) -> torch.LongTensor:
    """
    The classifier's decision on each observation, as indices into `DIAGNOSIS_STATES`: positive when the logit exceeds
    its threshold by more than `uncertainty_margin`, uncertain within the margin, negative below it.

    Args:
        disease_logits (`torch.Tensor` of shape `(batch_size, num_observations)`): `u_c`.
        thresholds (`list[float]`, *optional*): one logit threshold per observation (`config.observation_thresholds`);
            0.0 for all when `None`.
        uncertainty_margin (`float`): `config.diagnosis_uncertainty_margin`.
    """
    thresholds = disease_logits.new_tensor(thresholds) if thresholds is not None else 0.0
    distance = disease_logits - thresholds  # (B, num_observations)
    states = torch.full_like(distance, DIAGNOSIS_STATES.index("negative"), dtype=torch.long)
    states[distance > -uncertainty_margin] = DIAGNOSIS_STATES.index("uncertain")  # empty band when the margin is 0
    states[distance > uncertainty_margin] = DIAGNOSIS_STATES.index("positive")
    return states


class CdanNegativeAttention(CdanAttention):
    """
    The paper's NegativeAttention: it weights each value by how little softmax attention gives it,
    `A_n = 1 - softmax(QK^T / sqrt(d))`, so it looks at what self-attention ignores.

    Each row of `1 - softmax` sums to `N - 1` over `N` keys. With `config.renormalize_negative_attention` (the
    default) the rows are divided by `N - 1` so they are distributions again; without it the weights are used as
    written in the paper.

    Attention dropout falls on the entries of `A_n`, whatever the kernel. Where there is no dropout (evaluation, or
    `attention_dropout=0`), no `output_attentions` and the SDPA kernel, it uses the identity
    `(1 - A) V = sum_j V_j - A V`, so the fused kernel computes `A V` and the `N x N` matrix `1 - A` is never
    materialised; the result equals the explicit path up to float rounding.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query_states, key_states, value_states = self.project_query_key_value(hidden_states, key_value_states)
        num_keys = key_states.shape[-2]
        normalizer = max(num_keys - 1, 1) if self.config.renormalize_negative_attention else 1
        dropout = self.dropout if self.training else 0.0

        if output_attentions or dropout > 0 or self.config._attn_implementation == "eager":
            scores = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling  # (B, H, T, S)
            positive_weights = nn.functional.softmax(scores, dim=-1)  # softmax(QK^T / sqrt(d)) of Eq. (8)
            negative_weights = (1.0 - positive_weights) / normalizer  # Eq. (9): A_n = 1 - softmax(QK^T / sqrt(d))
            negative_weights = nn.functional.dropout(negative_weights, p=dropout, training=self.training)
            attn_output = torch.matmul(negative_weights, value_states)  # Eq. (9): A_n V, (B, H, T, D)
        else:
            positive_output = nn.functional.scaled_dot_product_attention(
                query_states, key_states, value_states, scale=self.scaling
            )  # A V, (B, H, T, D)
            attn_output = (value_states.sum(dim=-2, keepdim=True) - positive_output) / normalizer  # Eq. (9)
            negative_weights = None
        attn_output = self.out_proj(attn_output.transpose(1, 2).flatten(2))  # (B, T, C)
        return attn_output, negative_weights


class CdanReverseAttention(nn.Module):
    """
    The reverse-attention module (Eq. 5-14, 16) that turns patch features `u` into the decoder memory `u_s`.

    ```
    u_p  = PositiveAttention(u, u, u)                      # looks where self-attention looks
    u_n  = NegativeAttention(u, u, u)                      # looks where it does not
    u_pn = PositiveAttention(u_p, u_n, u_n)                # the discrepancy between the two
    u_c  = Classify(u_pn)                                  # 14 CheXpert observation logits
    u_k  = top-k disease-word embeddings under Softmax(u_c)
    u_s  = Concat([u_p, u_n, u_k])                         # along the token axis
    ```

    The disease words are `disease_top_k` learned embeddings, one per observation. Each selected embedding is weighted
    by its softmax probability renormalised over the `k` selected observations, so the weights sum to one and the
    report loss also reaches the classifier. Every attention is followed by a residual connection and LayerNorm.

    Args:
        config (`CdanConfig`):
            Reads `d_model`, `reverse_attention_heads`, `attention_dropout`, `num_observations`, `disease_top_k`.
    """

    def __init__(self, config: CdanConfig):
        super().__init__()
        self.top_k = config.disease_top_k
        heads, width, dropout = config.reverse_attention_heads, config.d_model, config.attention_dropout
        self.positive_attention = CdanAttention(config, width, heads, dropout=dropout)
        self.negative_attention = CdanNegativeAttention(config, width, heads, dropout=dropout)
        self.discrepancy_attention = CdanAttention(config, width, heads, dropout=dropout)
        self.positive_layer_norm = nn.LayerNorm(width)
        self.negative_layer_norm = nn.LayerNorm(width)
        self.discrepancy_layer_norm = nn.LayerNorm(width)
        self.disease_classifier = CdanLinear.from_config(config, width, config.num_observations)
        self.disease_embeddings = nn.Embedding(config.num_observations, width)

    def select_disease_words(self, disease_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Embed the `top_k` most probable observations.

        Returns:
            `(u_k, top_k_indices)`: `u_k` of shape `(B, k, d_model)` and the chosen observation indices `(B, k)`.
        """
        disease_probabilities = disease_logits.softmax(dim=-1)  # (B, num_observations)
        top_k_probabilities, top_k_indices = disease_probabilities.topk(self.top_k, dim=-1)  # (B, k)
        word_weights = top_k_probabilities / top_k_probabilities.sum(dim=-1, keepdim=True)  # (B, k), sums to 1
        disease_words = self.disease_embeddings(top_k_indices) * word_weights.unsqueeze(-1)  # Eq. (14): u_k, (B, k, C)
        return disease_words, top_k_indices

    def forward(
        self, patch_features: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            patch_features (`torch.Tensor` of shape `(B, N, d_model)`): `u`.
            output_attentions (`bool`): also return the positive and negative attention weights.

        Returns:
            `(u_s, u_c, positive_weights, negative_weights)` with `u_s` of shape `(B, 2N + k, d_model)`.
        """
        u = patch_features
        positive_output, positive_weights = self.positive_attention(u, u, output_attentions=output_attentions)
        u_p = self.positive_layer_norm(u + positive_output)  # Eq. (10): u_p = PositiveAttention(u, u, u)
        negative_output, negative_weights = self.negative_attention(u, u, output_attentions=output_attentions)
        u_n = self.negative_layer_norm(u + negative_output)  # Eq. (11): u_n = NegativeAttention(u, u, u)
        discrepancy_output, _ = self.discrepancy_attention(u_p, u_n)
        u_pn = self.discrepancy_layer_norm(u_p + discrepancy_output)  # Eq. (12): PositiveAttention(u_p, u_n, u_n)
        u_c = self.disease_classifier(u_pn.mean(dim=1))  # Eq. (13): u_c = Classify(u_pn), (B, num_observations)
        u_k, _ = self.select_disease_words(u_c)  # Eq. (14): u_k = Topk(Softmax(u_c))
        u_s = torch.cat([u_p, u_n, u_k], dim=1)  # Eq. (16): u_s = Concat([u_p, u_n, u_k]), (B, 2N + k, d_model)
        return u_s, u_c, positive_weights, negative_weights


class CdanDiagnosisPrompt(nn.Module):
    """
    The diagnosis prompt: one learned vector per (observation, state) pair, so a study's decisions on the
    `num_observations` observations become `num_observations` prompt vectors that the decoder reads before the report.

    Args:
        config (`CdanConfig`):
            Reads `num_observations` and `d_model`.
    """

    def __init__(self, config: CdanConfig):
        super().__init__()
        self.num_observations, self.num_states = config.num_observations, len(DIAGNOSIS_STATES)
        self.state_embeddings = nn.Embedding(self.num_observations * self.num_states, config.d_model)

    def forward(self, diagnosis_states: torch.LongTensor) -> torch.Tensor:
        """`(B, num_observations)` state indices -> `(B, num_observations, d_model)` prompt vectors."""
        if diagnosis_states.ndim != 2 or diagnosis_states.shape[1] != self.num_observations:
            raise ValueError(
                f"`diagnosis_states` must have shape (batch, {self.num_observations}); "
                f"got {tuple(diagnosis_states.shape)}."
            )
        if diagnosis_states.min() < 0 or diagnosis_states.max() >= self.num_states:
            raise ValueError(f"`diagnosis_states` must hold indices 0 to {self.num_states - 1} of {DIAGNOSIS_STATES}.")
        observation_offsets = torch.arange(diagnosis_states.shape[1], device=diagnosis_states.device) * self.num_states
        return self.state_embeddings(diagnosis_states + observation_offsets)  # (B, O, C)


class CdanPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the shared class attributes of the CDAN models."""

    config: CdanConfig
    config_class = CdanConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CdanVisualExtractor", "CdanReverseAttention", "CdanEncoderLayer", "CdanDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False

    @property
    def has_disease_classifier(self) -> bool:
        """Whether the model classifies the CheXpert observations (the reverse-attention module, `u_c`)."""
        return self.config.use_reverse_attention

    def diagnosis_decisions(self, disease_logits: torch.Tensor) -> torch.LongTensor:
        """
        The classifier's decision on each observation, `(B, num_observations)` indices into `DIAGNOSIS_STATES`, at the
        configured `observation_thresholds` and `diagnosis_uncertainty_margin`: what the diagnosis prompt reads, and
        what the pipeline's `return_labels` reports.
        """
        config = self.config
        return diagnosis_states_from_logits(
            disease_logits, config.observation_thresholds, config.diagnosis_uncertainty_margin
        )

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, CdanEncoder) and module.segment_embeddings is not None:
            init.normal_(module.segment_embeddings.weight, std=self.config.init_std)
        elif isinstance(module, PerceiverResampler):
            module.reset_parameters()  # PriorRG: latents from torch.randn, std 1
        elif isinstance(module, ViewTemporalEmbeddings):
            init.normal_(module.temporal_embeddings.weight, std=self.config.init_std)

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.modules():  # timm backbones checkpoint their own stages
            if isinstance(module, CdanVisualExtractor) and hasattr(module.backbone, "set_grad_checkpointing"):
                module.backbone.set_grad_checkpointing(enable)


class CdanEncoder(CdanPreTrainedModel):
    """
    Image side of CDAN: visual extractor (Eq. 4), projection to `d_model`, reverse attention (Eq. 5-14, 16) and the
    3-layer transformer encoder over `u_s`. It is what `generate()` runs once per study.

    The encoder input is `u_s` plus fixed sinusoidal positions and a learned segment embedding that tells apart the
    three streams `u_p`, `u_n` and `u_k` (without reverse attention there is one stream, `u`).

    Args:
        config (`CdanConfig`): the model configuration.
    """

    def __init__(self, config: CdanConfig):
        super().__init__(config)
        self.visual_extractor = CdanVisualExtractor(config)
        self.visual_projection = CdanLinear.from_config(config, self.visual_extractor.num_features, config.d_model)
        self.reverse_attention = CdanReverseAttention(config) if config.use_reverse_attention else None
        self.segment_embeddings = nn.Embedding(3, config.d_model) if config.use_reverse_attention else None
        self.dropout = config.dropout
        self.layers = nn.ModuleList([CdanEncoderLayer(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.prior_embeddings = self.temporal_fusion = None
        if config.use_prior_study:  # PriorRG's temporal fusion (priorrg_modules), not in the CDAN paper
            self.prior_embeddings = ViewTemporalEmbeddings(config.d_model, view_positions=())
            self.temporal_fusion = TemporalFusion(
                config.d_model, config.temporal_fusion_layers, config.encoder_attention_heads, dropout=config.dropout
            )
        self.context_encoder = self.context_perceiver = None
        if config.use_clinical_context:  # PriorRG's context branch, not in the CDAN paper
            text_config = dict(config.context_text_config)
            text_model = AutoModel.from_config(AutoConfig.for_model(text_config.pop("model_type"), **text_config))
            self.context_encoder = ContextEncoder(text_model, config.d_model)
            self.context_perceiver = PerceiverResampler(
                config.d_model, num_latents=config.context_num_latents, depth=config.context_perceiver_depth
            )
        self.lesion_encoder = self.lesion_norm = self.lesion_type_embedding = None
        if config.use_lesion_branch:  # D2R-Net's lesion branch (d2r_modules), not in the CDAN paper
            crop = config.lesion_feature_mode == "crop"
            self.lesion_encoder = LesionEncoder(
                3 if crop else self.visual_extractor.num_features,
                config.d_model,
                mode=config.lesion_feature_mode,
                roi_size=config.lesion_roi_size,
                crop_size=config.lesion_crop_size,
            )
            for submodule in self.lesion_encoder.modules():  # a CNN head: keep PyTorch's initialisation
                submodule._is_hf_initialized = True
            self.lesion_norm = nn.LayerNorm(config.d_model)
            self.lesion_type_embedding = nn.Embedding(1, config.d_model)  # tells lesion tokens from the rest
        self.post_init()

    def encode_lesions(
        self,
        visual_features: torch.Tensor,
        pixel_values: torch.Tensor | None,
        lesion_boxes: torch.Tensor | None,
        lesion_box_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """
        One feature per box of every view (D2R-Net's lesion branch): RoIAlign on the extractor's square feature map
        (rebuilt from `visual_features`, so cached features work too) or a crop of `pixel_values`.

        Returns:
            `(lesion_embeddings, lesion_mask)`: `(B, V*K, d_model)` with exact zeros at padding, and `(B, V*K)`.
        """
        config = self.config
        batch_size, num_views = visual_features.shape[0], config.num_views
        lesion_boxes, lesion_box_mask = check_lesion_box_tensors(
            lesion_boxes, lesion_box_mask, batch_size, num_views, config.max_lesion_boxes, visual_features.device
        )
        feature_maps = patch_features_to_maps(visual_features, num_views)  # (B*V, C, h, w)
        side = feature_maps.shape[-1]
        if pixel_values is not None:
            views = check_study_pixel_values(pixel_values, num_views).flatten(0, 1)  # (B*V, 3, H, W)
            image_size = tuple(views.shape[-2:])
        elif config.lesion_feature_mode == "crop":
            raise ValueError("`lesion_feature_mode='crop'` crops the images: pass `pixel_values`, not features.")
        else:
            reduction = self.visual_extractor.backbone.feature_info[-1]["reduction"]  # e.g. 32 for ResNets
            views, image_size = None, (side * reduction, side * reduction)  # cached features of square images
        lesion_embeddings = self.lesion_encoder(
            lesion_boxes.flatten(0, 1).to(feature_maps.dtype),  # (B*V, K, 4)
            lesion_box_mask.flatten(0, 1),  # (B*V, K)
            image_size=image_size,
            feature_map=feature_maps,  # (B*V, C, h, w)
            pixel_values=views,
        )  # (B*V, K, d_model)
        return lesion_embeddings.reshape(batch_size, -1, config.d_model), lesion_box_mask.reshape(batch_size, -1)

    def fuse_prior_study(
        self, u: torch.Tensor, prior_pixel_values: torch.Tensor, has_prior: torch.Tensor | None
    ) -> torch.Tensor:
        """`u` read against the prior study's projected patch features (PriorRG's temporal fusion), `(B, N, d)`."""
        if has_prior is None:
            has_prior = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
        has_prior = has_prior.bool()
        if has_prior.shape != (u.shape[0],) or prior_pixel_values.shape[0] != u.shape[0]:
            raise ValueError(
                f"`prior_pixel_values` and `has_prior` need one row per study ({u.shape[0]}); got "
                f"{tuple(prior_pixel_values.shape)} and {tuple(has_prior.shape)}."
            )
        if not has_prior.any():
            return u
        prior_pixel_values = self.check_pixel_values(prior_pixel_values[has_prior], name="prior_pixel_values")
        prior_features = self.visual_extractor(prior_pixel_values.to(self.visual_projection.weight.dtype))
        prior_u = self.prior_embeddings(self.visual_projection(prior_features), temporal_ids=1)  # (B_p, N, d)
        return self.temporal_fusion(u, scatter_rows(prior_u, has_prior), has_prior)  # (B, N, d)

    def check_pixel_values(self, pixel_values: torch.Tensor | None, name: str = "pixel_values") -> torch.Tensor:
        """Raise a clear `ValueError` for inputs the extractor cannot take (see [`check_study_pixel_values`])."""
        return check_study_pixel_values(pixel_values, self.config.num_views, name)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        prior_pixel_values: torch.FloatTensor | None = None,
        has_prior: torch.BoolTensor | None = None,
        lesion_boxes: torch.FloatTensor | None = None,
        lesion_box_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> CdanEncoderOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            Processed views of each study (see [`CdanImageProcessor`]).
        visual_features (`torch.FloatTensor` of shape `(batch_size, num_patches, num_features)`, *optional*):
            Precomputed output of the visual extractor, used instead of `pixel_values` when the extractor is frozen
            and its features are cached.
        output_attentions (`bool`, *optional*):
            Return the positive and negative attention weights of the reverse-attention module.
        output_hidden_states (`bool`, *optional*):
            Return the input and output of every encoder layer.
        context_input_ids (`torch.LongTensor` of shape `(batch_size, context_length)`, *optional*):
            With `use_clinical_context`: the indication and history, tokenised by the processor's context tokenizer.
        context_attention_mask (`torch.LongTensor` of shape `(batch_size, context_length)`, *optional*):
            Its mask; an all-zero row is a study without context.
        prior_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`, *optional*):
            With `use_prior_study`: the prior study's views (any values in rows without a prior).
        has_prior (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Which studies have a prior; all when `prior_pixel_values` is given without it.
        lesion_boxes (`torch.FloatTensor` of shape `(batch_size, num_views, max_lesion_boxes, 4)`, *optional*):
            With `use_lesion_branch`: detector boxes in pixels of the processed views (`CdanProcessor(boxes=...)`);
            a study without boxes reads no lesion token.
        lesion_box_mask (`torch.BoolTensor` of shape `(batch_size, num_views, max_lesion_boxes)`, *optional*):
            `True` for real boxes.
        """
        output_attentions = bool(output_attentions)
        if lesion_boxes is not None and self.lesion_encoder is None:
            raise ValueError("This model has no lesion branch (`use_lesion_branch=False`); drop `lesion_boxes`.")
        if context_input_ids is not None and self.context_encoder is None:
            raise ValueError("This model reads no clinical context (`use_clinical_context=False`); drop the context.")
        if prior_pixel_values is not None and self.temporal_fusion is None:
            raise ValueError("This model reads no prior study (`use_prior_study=False`); drop `prior_pixel_values`.")
        if visual_features is None:
            pixel_values = self.check_pixel_values(pixel_values)
            visual_features = self.visual_extractor(pixel_values.to(self.visual_projection.weight.dtype))  # Eq. (4)
        elif visual_features.ndim != 3 or visual_features.shape[-1] != self.visual_extractor.num_features:
            raise ValueError(
                f"`visual_features` must have shape (batch, patches, {self.visual_extractor.num_features}); got "
                f"{tuple(visual_features.shape)}."
            )
        u = self.visual_projection(visual_features.to(self.visual_projection.weight.dtype))  # (B, N, d_model)
        if self.temporal_fusion is not None and prior_pixel_values is not None:
            u = self.fuse_prior_study(u, prior_pixel_values, has_prior)  # PriorRG's temporal fusion, (B, N, d_model)

        disease_logits = positive_weights = negative_weights = None
        if self.reverse_attention is not None:
            u_s, disease_logits, positive_weights, negative_weights = self.reverse_attention(u, output_attentions)
            num_patches, top_k = u.shape[1], self.config.disease_top_k
            segment_ids = torch.repeat_interleave(
                torch.arange(3, device=u.device), torch.tensor([num_patches, num_patches, top_k], device=u.device)
            )
            u_s = u_s + self.segment_embeddings(segment_ids)  # (B, 2N + k, d_model)
        else:
            u_s = u
        pooled_semantic_states = u_s.mean(dim=1)  # (B, d_model)
        if self.context_encoder is not None:
            context_states, context_mask = self.context_encoder.encode_study_context(
                context_input_ids, context_attention_mask, u_s.shape[0]
            )  # (B, T, d_model), (B, T)
            context_latents = self.context_perceiver(context_states, context_mask)  # PriorRG's ctx, (B, M, d_model)
            u_s = torch.cat([u_s, context_latents], dim=1)  # (B, 2N + k + M, d_model)
        memory_mask = lesion_embeddings = lesion_mask = None
        if self.lesion_encoder is not None:  # D2R-Net's lesion tokens, after every other stream
            lesion_embeddings, lesion_mask = self.encode_lesions(
                visual_features, pixel_values, lesion_boxes, lesion_box_mask
            )  # (B, V*K, d_model), (B, V*K)
            lesion_tokens = self.lesion_norm(lesion_embeddings) + self.lesion_type_embedding.weight[0]
            memory_mask = torch.cat([lesion_mask.new_ones(u_s.shape[:2]), lesion_mask], dim=1)
            u_s = torch.cat([u_s, lesion_tokens.to(u_s.dtype)], dim=1)  # (B, 2N + k (+ M) + V*K, d_model)

        hidden_states = u_s + sinusoidal_positions(u_s.shape[1], u_s.shape[2], u_s.device, u_s.dtype)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        attention_mask = None if memory_mask is None else key_padding_mask(memory_mask, hidden_states.dtype)
        all_hidden_states = () if output_hidden_states else None
        for encoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = encoder_layer(hidden_states, attention_mask=attention_mask)
        hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return CdanEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            disease_logits=disease_logits,
            pooled_semantic_states=pooled_semantic_states,
            positive_attentions=positive_weights,
            negative_attentions=negative_weights,
            memory_mask=memory_mask,
            patch_embeddings=u if self.config.use_lesion_alignment else None,
            lesion_embeddings=lesion_embeddings,
            lesion_mask=lesion_mask,
        )


class CdanDecoder(CdanPreTrainedModel):
    """
    The report decoder (Eq. 19-21): word embeddings plus learned positions, `decoder_layers` masked self-attention /
    cross-attention layers over the encoded `u_s`, and a final LayerNorm. Keys and values are cached in an
    `EncoderDecoderCache` during generation.

    With `use_diagnosis_prompt`, the first forward of a report (empty cache) puts the `num_observations` diagnosis
    prompt vectors before the report tokens: the report tokens attend to them causally, their keys and values stay in
    the cache, and they have no word position (report positions still start at 0) and no output.

    Args:
        config (`CdanConfig`): the model configuration.
    """

    def __init__(self, config: CdanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.dropout = config.dropout
        self.layers = nn.ModuleList([CdanDecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.diagnosis_prompt = CdanDiagnosisPrompt(config) if config.use_diagnosis_prompt else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        diagnosis_states: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        encoder_attention_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        r"""
        encoder_attention_mask (`torch.BoolTensor` of shape `(num_studies, memory_length)`, *optional*):
            `True` for the memory tokens to attend to (padded lesion tokens are `False`); `num_studies` may divide
            the batch (the beams of a study share its memory).
        output_attentions (`bool`, *optional*):
            Return the cross-attention weights of every layer in `cross_attentions`, each of shape
            `(batch_size, num_heads, target_length, memory_length)` (report tokens only: no diagnosis-prompt rows).
            They are computed with the eager kernel; without this option the cross-attention path is unchanged.
        diagnosis_states (`torch.LongTensor` of shape `(num_studies, num_observations)`, *optional*):
            The diagnosis prompt (indices into `DIAGNOSIS_STATES`), read when the cache is empty; required then with
            `use_diagnosis_prompt`. `num_studies` may divide the batch (beams of one study share their prompt).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `decoder_input_ids` and `decoder_inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, d_model)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))

        batch_size, target_length = inputs_embeds.shape[:2]
        hidden_device = inputs_embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0  # prompt included, once it is cached
        prompt_length = self.config.num_observations if self.diagnosis_prompt is not None else 0
        past_report_length = max(past_length - prompt_length, 0)
        if past_report_length + target_length > self.config.max_position_embeddings:
            raise ValueError(
                f"Report length {past_report_length + target_length} exceeds `max_position_embeddings` "
                f"({self.config.max_position_embeddings}); lower the generation `max_length`."
            )
        position_ids = torch.arange(past_report_length, past_report_length + target_length, device=hidden_device)
        hidden_states = inputs_embeds + self.embed_positions(position_ids)  # Eq. (19): word + position embeddings
        new_prompt_length = 0
        if self.diagnosis_prompt is not None and past_length == 0:
            prompt = self.diagnosis_prompt_embeddings(diagnosis_states, batch_size)  # (B, O, d_model)
            hidden_states = torch.cat([prompt.to(hidden_states.dtype), hidden_states], dim=1)  # (B, O + T, d_model)
            new_prompt_length = prompt_length
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_report_length + target_length, device=inputs_embeds.device)
        if prompt_length:  # the mask covers report tokens; the prompt is always visible
            attention_mask = torch.cat([attention_mask.new_ones(batch_size, prompt_length), attention_mask], dim=-1)
        self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=self_attention_cache,
            position_ids=torch.arange(past_length, past_length + hidden_states.shape[1], device=hidden_device)[None],
        )

        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        memory_attention_mask = None
        if encoder_attention_mask is not None and not encoder_attention_mask.all():
            memory_attention_mask = key_padding_mask(encoder_attention_mask, hidden_states.dtype)  # (B_s, 1, 1, S)
        all_hidden_states = () if output_hidden_states else None
        all_cross_attentions = () if output_attentions else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_outputs = decoder_layer(  # Eq. (20): masked self-attention, cross-attention to u_s, feed-forward
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional, for gradient checkpointing
                cache=cache,
                use_cache=use_cache,
                output_attentions=bool(output_attentions),
                encoder_attention_mask=memory_attention_mask,
            )
            if output_attentions:
                hidden_states, cross_weights = layer_outputs  # (B, H, O + T, S) with a prompt read, else (B, H, T, S)
                all_cross_attentions += (cross_weights[:, :, new_prompt_length:],)  # report tokens only
            else:
                hidden_states = layer_outputs
        hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if new_prompt_length:  # outputs for the report tokens only
            hidden_states = hidden_states[:, new_prompt_length:]
            if output_hidden_states:
                all_hidden_states = tuple(states[:, new_prompt_length:] for states in all_hidden_states)
        return Seq2SeqModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            decoder_hidden_states=all_hidden_states,
            cross_attentions=all_cross_attentions,
        )

    def diagnosis_prompt_embeddings(self, diagnosis_states: torch.LongTensor | None, batch_size: int) -> torch.Tensor:
        """The prompt vectors of `diagnosis_states`, repeated over the beams (or samples) of each study."""
        if diagnosis_states is None:
            raise ValueError(
                "This decoder reads a diagnosis prompt (`use_diagnosis_prompt`): pass `diagnosis_states`, or run the "
                "full model, which takes them from the classifier."
            )
        num_studies = diagnosis_states.shape[0]
        if num_studies == 0 or batch_size % num_studies:
            raise ValueError(
                f"`diagnosis_states` has {num_studies} rows, which does not divide the decoder batch of {batch_size}."
            )
        prompt = self.diagnosis_prompt(diagnosis_states.to(self.embed_positions.weight.device))  # (studies, O, C)
        return prompt.repeat_interleave(batch_size // num_studies, dim=0)  # (B, O, C)


class CdanModel(CdanPreTrainedModel):
    """The bare CDAN encoder-decoder, returning decoder states without the language-model head."""

    def __init__(self, config: CdanConfig):
        super().__init__(config)
        self.encoder = CdanEncoder(config)
        self.decoder = CdanDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> CdanEncoder:
        return self.encoder

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: CdanEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        visual_features: torch.FloatTensor | None = None,
        diagnosis_states: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        prior_pixel_values: torch.FloatTensor | None = None,
        has_prior: torch.BoolTensor | None = None,
        lesion_boxes: torch.FloatTensor | None = None,
        lesion_box_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> CdanSeq2SeqModelOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values=pixel_values,
                visual_features=visual_features,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                context_input_ids=context_input_ids,
                context_attention_mask=context_attention_mask,
                prior_pixel_values=prior_pixel_values,
                has_prior=has_prior,
                lesion_boxes=lesion_boxes,
                lesion_box_mask=lesion_box_mask,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, CdanEncoderOutput):
            encoder_outputs = CdanEncoderOutput(*encoder_outputs)
        memory = encoder_outputs.last_hidden_state  # (B, 2N + k, d_model)
        if self.decoder.diagnosis_prompt is not None:
            diagnosis_states = self.diagnosis_prompt_states(encoder_outputs.disease_logits, diagnosis_states)
            if self.training and self.config.diagnosis_prompt_memory_dropout > 0:
                keep = torch.rand(memory.shape[0], device=memory.device) >= self.config.diagnosis_prompt_memory_dropout
                memory = memory * keep[:, None, None].to(memory.dtype)  # dropped studies read the prompt alone
        elif diagnosis_states is not None:
            raise ValueError(
                "This model has no diagnosis prompt (`use_diagnosis_prompt=False`); drop diagnosis_states."
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=memory,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            diagnosis_states=diagnosis_states,
            output_attentions=output_attentions,
            encoder_attention_mask=encoder_outputs.memory_mask,
            return_dict=True,
        )
        return CdanSeq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.decoder_hidden_states,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            disease_logits=encoder_outputs.disease_logits,
            pooled_semantic_states=encoder_outputs.pooled_semantic_states,
            positive_attentions=encoder_outputs.positive_attentions,
            negative_attentions=encoder_outputs.negative_attentions,
            diagnosis_states=diagnosis_states,
            patch_embeddings=encoder_outputs.patch_embeddings,
            lesion_embeddings=encoder_outputs.lesion_embeddings,
            lesion_mask=encoder_outputs.lesion_mask,
        )

    def diagnosis_prompt_states(
        self, disease_logits: torch.Tensor, reference_states: torch.LongTensor | None = None
    ) -> torch.LongTensor:
        """
        The diagnosis prompt of each study, `(num_studies, num_observations)` indices into `DIAGNOSIS_STATES`.

        Without `reference_states` it is the classifier's decision (`diagnosis_decisions`), as in generation. Given states are used as they are in eval mode (to condition a
        report on a chosen diagnosis), and in training each observation takes the model's own decision with
        probability `diagnosis_prompt_prediction_rate`, the reference otherwise.
        """
        predicted = self.diagnosis_decisions(disease_logits.detach())  # (studies, O)
        if reference_states is None:
            return predicted
        if reference_states.shape != predicted.shape:
            raise ValueError(
                f"`diagnosis_states` must have one row per study and one column per observation, "
                f"{tuple(predicted.shape)}; got {tuple(reference_states.shape)}."
            )
        reference_states = reference_states.to(device=predicted.device, dtype=torch.long)
        if not self.training:
            return reference_states
        rate = self.config.diagnosis_prompt_prediction_rate
        use_prediction = torch.rand(predicted.shape, device=predicted.device) < rate
        return torch.where(use_prediction, predicted, reference_states)


class CdanForConditionalGeneration(SharedMemoryGenerationMixin, CdanPreTrainedModel, GenerationMixin):
    """
    CDAN with its language-model head: chest X-ray views in, findings report out.

    `forward` returns the token cross-entropy (`loss`), next-word `logits`, the CheXpert `disease_logits` and, when
    semantic consistency is on and `labels` are given, `visual_semantics` for the trainer's MSE term. Reports are
    written with the stock `generate()` (greedy, beam, sampling, `no_repeat_ngram_size`), which reuses cached keys and
    values.

    Example:

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/checkpoint", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/checkpoint", trust_remote_code=True)
    >>> inputs = processor(images=[["frontal.png", "lateral.png"]])
    >>> report = processor.batch_decode(model.generate(**inputs))[0]
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    per_study_generation_inputs = ("encoder_outputs", "diagnosis_states")  # one diagnosis prompt per study

    def __init__(self, config: CdanConfig):
        super().__init__(config)
        self.model = CdanModel(config)
        self.lm_head = CdanLinear.from_config(config, config.d_model, config.vocab_size, bias=False)
        self.semantic_projection = (
            nn.Linear(config.d_model, config.semantic_dim) if config.use_semantic_consistency else None
        )
        self.alignment = None
        if config.use_lesion_alignment:  # D2R-Net's alignment blocks (d2r_modules), not in the CDAN paper
            self.alignment = ImageTextAlignment.from_text_config(
                config.alignment_text_config, config.d_model, freeze_text_model=config.freeze_alignment_text_model,
                margin=config.alignment_margin, smoothing=config.alignment_smoothing,
            )  # fmt: skip
        self.loss_type = "ForMaskedLM"  # labels are already aligned with the right-shifted decoder inputs
        if config.tie_word_embeddings:  # the tied head is not saved; loaders should not report it missing
            self._keys_to_ignore_on_save = ["lm_head.weight"]
        self.post_init()
        self.generation_config.update(**DEFAULT_GENERATION_KWARGS)

    @classmethod
    def from_backbone_pretrained(
        cls, config: CdanConfig | None = None, weights_path: str | os.PathLike | None = None, **config_kwargs
    ) -> "CdanForConditionalGeneration":
        """
        A new CDAN model whose visual extractor starts from ImageNet weights (the rest is randomly initialised),
        as the paper trains it.

        Args:
            config (`CdanConfig`, *optional*):
                The configuration; built from `config_kwargs` when omitted.
            weights_path (`str` or `os.PathLike`, *optional*):
                Local weights file for the backbone. Defaults to `config.visual_extractor_weights`, and without
                either the weights are downloaded from the Hugging Face Hub through `timm`.
        """
        config = config if config is not None else CdanConfig(**config_kwargs)
        model = cls(config)
        model.model.encoder.visual_extractor.load_pretrained_weights(weights_path or config.visual_extractor_weights)
        return model

    def load_context_text_model(self, name_or_path: str, num_tokens: int | None = None) -> None:
        """
        Load pre-trained weights into the clinical-context encoder (`use_clinical_context`), e.g. a local
        all-MiniLM-L6-v2 or CXR-BERT, and resize its embeddings to the context tokenizer's `num_tokens`.
        `config.context_text_config` must describe the same architecture (see `context_text_config_from`).
        """
        if self.model.encoder.context_encoder is None:
            raise ValueError("This model reads no clinical context (`use_clinical_context=False`).")
        text_model = self.model.encoder.context_encoder.text_model
        try:
            pretrained = AutoModel.from_pretrained(name_or_path, num_hidden_layers=text_model.config.num_hidden_layers)
        except OSError as error:
            raise OSError(
                f"Could not load the context text encoder from {name_or_path!r}: {error}\nOffline, pass a local folder."
            ) from error
        text_model.load_state_dict(pretrained.state_dict())
        if num_tokens is not None and num_tokens != text_model.config.vocab_size:
            text_model.resize_token_embeddings(num_tokens)
            self.config.context_text_config = {**self.config.context_text_config, "vocab_size": num_tokens}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    def get_encoder(self, modality: str | None = None) -> CdanEncoder:
        return self.model.encoder

    def get_decoder(self) -> CdanDecoder:
        return self.model.decoder

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """
        Beam search only moves hypotheses between the beams of one study, which share the encoder memory: reorder the
        self-attention keys and values, and leave the cross-attention ones (one row per study, 2N + k tokens) in place.
        """
        cache.self_attention_cache.reorder_cache(beam_idx)
        return cache

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: CdanEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        visual_features: torch.FloatTensor | None = None,
        diagnosis_states: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        prior_pixel_values: torch.FloatTensor | None = None,
        has_prior: torch.BoolTensor | None = None,
        lesion_boxes: torch.FloatTensor | None = None,
        lesion_box_mask: torch.BoolTensor | None = None,
        report_text_input_ids: torch.LongTensor | None = None,
        report_text_attention_mask: torch.LongTensor | None = None,
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> CdanSeq2SeqLMOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            Processed views of each study (see [`CdanImageProcessor`]).
        decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Report tokens fed to the decoder. Built from `labels` (shifted right behind `decoder_start_token_id`)
            when omitted.
        decoder_attention_mask (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Padding mask of `decoder_input_ids`; a causal mask is always applied.
        encoder_outputs (`CdanEncoderOutput`, *optional*):
            Precomputed encoder outputs, as `generate()` passes them.
        cache (`EncoderDecoderCache`, *optional*):
            Cached decoder keys and values.
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target report tokens ending in `eos`, padded with `-100`.
        output_attentions (`bool`, *optional*):
            Return the positive and negative attention weights, and the decoder's cross-attention weights over the
            encoded `u_s` in `cross_attentions` (one `(batch_size, num_heads, target_length, 2N + k)` per layer).
        visual_features (`torch.FloatTensor` of shape `(batch_size, num_patches, num_features)`, *optional*):
            Cached visual-extractor features, used instead of `pixel_values` (frozen-extractor training).
        diagnosis_states (`torch.LongTensor` of shape `(batch_size, num_observations)`, *optional*):
            Only with `use_diagnosis_prompt`: reference decisions (indices into `DIAGNOSIS_STATES`). In training
            they are mixed with the classifier's own (`diagnosis_prompt_prediction_rate`); in eval mode and
            `generate()` they replace them. Without them the prompt is the classifier's decision.
        context_input_ids, context_attention_mask, prior_pixel_values, has_prior:
            PriorRG's inputs, for models with `use_clinical_context` / `use_prior_study` (see [`CdanEncoder.forward`]).
        lesion_boxes, lesion_box_mask:
            D2R-Net's boxes, for models with `use_lesion_branch` (see [`CdanEncoder.forward`]).
        report_text_input_ids, report_text_attention_mask, sentence_input_ids, sentence_attention_mask:
            Training only, with `use_lesion_alignment`: the reference report `(batch_size, length)` and its sentences
            `(batch_size, sentences, length)` tokenised for the alignment text encoder; they give GAB's and LAB's
            losses (see [`D2RNetForConditionalGeneration.forward`]).
        kwargs:
            `num_items_in_batch` from the Trainer, so the loss is correct under gradient accumulation, and
            `return_dict=False` for a tuple instead of a [`CdanSeq2SeqLMOutput`].
        """
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)

        outputs = self.model(
            pixel_values=pixel_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            visual_features=visual_features,
            diagnosis_states=diagnosis_states,
            context_input_ids=context_input_ids,
            context_attention_mask=context_attention_mask,
            prior_pixel_values=prior_pixel_values,
            has_prior=has_prior,
            lesion_boxes=lesion_boxes,
            lesion_box_mask=lesion_box_mask,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # Eq. (21): p(w_t | w_<t, u_s), (B, T, vocab_size)

        loss = visual_semantics = global_alignment_loss = local_alignment_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)  # Eq. (3): L_text
            if self.semantic_projection is not None:
                visual_semantics = self.semantic_projection(outputs.pooled_semantic_states)  # Eq. (18) input, (B, S)
        if self.alignment is not None and labels is not None:  # D2R-Net's GAB and LAB, not in the CDAN paper
            global_alignment_loss, local_alignment_loss = self.alignment.losses(
                outputs.patch_embeddings, outputs.lesion_embeddings, outputs.lesion_mask, report_text_input_ids,
                report_text_attention_mask, sentence_input_ids, sentence_attention_mask,
            )  # fmt: skip
        elif report_text_input_ids is not None or sentence_input_ids is not None:
            raise ValueError(
                "This model has no alignment blocks (`use_lesion_alignment=False`); drop the text inputs."
            )

        return CdanSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            disease_logits=outputs.disease_logits,
            visual_semantics=visual_semantics,
            positive_attentions=outputs.positive_attentions,
            negative_attentions=outputs.negative_attentions,
            diagnosis_states=outputs.diagnosis_states,
            global_alignment_loss=global_alignment_loss,
            local_alignment_loss=local_alignment_loss,
            lesion_embeddings=outputs.lesion_embeddings,
            lesion_mask=outputs.lesion_mask,
        )


CdanModel.register_for_auto_class("AutoModel")
CdanForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "CdanDecoder",
    "CdanDiagnosisPrompt",
    "CdanEncoder",
    "CdanEncoderOutput",
    "CdanForConditionalGeneration",
    "CdanModel",
    "CdanPreTrainedModel",
    "CdanReverseAttention",
    "CdanSeq2SeqLMOutput",
    "CdanSeq2SeqModelOutput",
    "diagnosis_states_from_logits",
]
