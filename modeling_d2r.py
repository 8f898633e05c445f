"""PyTorch D2R-Net: lesion-aware radiology report generation from detector boxes.

D2R-Net reads the views of a chest X-ray study and the lesion boxes a detector found on each view. A global branch
(a CNN, channel-prior convolutional attention, 1x1 convolution) gives patch features, a lesion branch gives one
feature per box (RoIAlign on the CNN's feature map, or the paper's crop of the image, then the lesion-area
enhancement LERA), a transformer encoder reads both, and R2Gen's memory-driven decoder writes the report. During
training two alignment blocks pull the image toward a BERT encoding of the reference: GAB (report <-> patches) and
LAB (sentences <-> lesions); LAB's word-to-lesion attention also grounds each generated sentence on the boxes.

References:
1) Tang et al., "From Detection to Radiology Report Generation: Fine-Grained Multi-Modal Alignment with
   Semi-Supervised Learning", J Imaging Inform Med 2025, doi:10.1007/s10278-025-01650-z (D2R-Net); partial public
   code in the cloneiq/D2R-Net repository. The modules the paper describes without code (LERA, GAB, LAB) are
   reconstructions, documented in `d2r_modules.py`.
2) Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020 (R2Gen): the relational
   memory (RM) and the memory-driven conditional layer normalisation (MCLN) of the decoder, Eq. (4)-(13) there.
3) Hugging Face transformers: BART (`EncoderDecoderCache`, `layer_idx`), VisionEncoderDecoder (layout), T5Gemma2
   (`self.loss_function`); the CDAN model of this library for the shared layers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.utils import ModelOutput, can_return_tuple, logging

try:
    from .configuration_d2r import D2RNetConfig
    from .d2r_modules import GlobalImageEmbedding, ImageTextAlignment, LesionEncoder
    from .layers_cdan import (
        CdanAttention,
        CdanEncoderLayer,
        CdanFeedForward,
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
    from .modeling_cdan import DEFAULT_GENERATION_KWARGS
except ImportError:
    from configuration_d2r import D2RNetConfig
    from d2r_modules import GlobalImageEmbedding, ImageTextAlignment, LesionEncoder
    from layers_cdan import (
        CdanAttention,
        CdanEncoderLayer,
        CdanFeedForward,
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
    from modeling_cdan import DEFAULT_GENERATION_KWARGS


logger = logging.get_logger(__name__)


@dataclass
class D2RNetEncoderOutput(BaseModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, memory_length, d_model)`):
        The encoded memory the decoder cross-attends to: the patch tokens of every view, then the lesion tokens of
        every view (`num_views * max_lesion_boxes`, padding included) when the lesion branch is on.
    memory_mask (`torch.BoolTensor` of shape `(batch_size, memory_length)`):
        `True` for real tokens; padded lesion tokens are `False` and never attended to.
    patch_embeddings (`torch.FloatTensor` of shape `(batch_size, num_patches, embed_size)`):
        The global branch's patch features (GAB's image side).
    lesion_embeddings (`torch.FloatTensor` of shape `(batch_size, num_views * max_lesion_boxes, embed_size)`):
        *Optional.* One feature per box (LAB's image side); exact zeros at padding.
    lesion_mask (`torch.BoolTensor` of shape `(batch_size, num_views * max_lesion_boxes)`, *optional*):
        Which lesion rows are real boxes.
    """

    memory_mask: torch.BoolTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    lesion_embeddings: torch.FloatTensor | None = None
    lesion_mask: torch.BoolTensor | None = None


@dataclass
class D2RNetSeq2SeqLMOutput(Seq2SeqLMOutput):
    r"""
    global_alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
        GAB's image-report matching loss, when the report text inputs are given.
    local_alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
        LAB's sentence-lesion matching loss, when the sentence inputs are given.
    memory_mask, lesion_embeddings, lesion_mask:
        As in [`D2RNetEncoderOutput`].
    """

    global_alignment_loss: torch.FloatTensor | None = None
    local_alignment_loss: torch.FloatTensor | None = None
    memory_mask: torch.BoolTensor | None = None
    lesion_embeddings: torch.FloatTensor | None = None
    lesion_mask: torch.BoolTensor | None = None
    disease_logits: torch.FloatTensor | None = None
    visual_semantics: torch.FloatTensor | None = None


@dataclass
class D2RNetDecoderOutput(ModelOutput):
    """Decoder states `(B, T, d)`, the cache, and optionally all layers' states and cross-attention weights."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class RelationalMemory(nn.Module):
    """
    R2Gen's relational memory (Eq. 4-8 of R2Gen): a few memory slots that read each report token in turn through
    multi-head attention over `[M; y_t]`, a two-layer MLP and LSTM-like input and forget gates.

    Args:
        config (`D2RNetConfig`): reads `d_model`, `relational_memory_slots` and `relational_memory_heads`.
    """

    def __init__(self, config: D2RNetConfig):
        super().__init__()
        self.num_slots, self.width = config.relational_memory_slots, config.d_model
        self.attention = CdanAttention(config, config.d_model, config.relational_memory_heads)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_model),
            nn.ReLU(),
            nn.Linear(config.d_model, config.d_model),
            nn.ReLU(),
        )
        self.input_gate_projection = nn.Linear(config.d_model, 2 * config.d_model)  # W of Eq. (7)-(8)
        self.memory_gate_projection = nn.Linear(config.d_model, 2 * config.d_model)  # U of Eq. (7)-(8)

    def initial_memory(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """R2Gen's start state: slot i is the i-th unit vector (zero-padded to `d_model`), `(B, slots, d_model)`."""
        memory = torch.eye(self.num_slots, self.width, device=device, dtype=dtype)
        return memory.unsqueeze(0).expand(batch_size, -1, -1)

    def step(self, token_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One token `(B, d)` read into the memory `(B, slots, d)`; returns the next memory."""
        keys_values = torch.cat([memory, token_states.unsqueeze(1)], dim=1)  # [M_{t-1}; y_t], (B, slots + 1, d)
        attended = memory + self.attention(memory, key_value_states=keys_values)[0]  # Eq. (4)-(5)
        candidate = attended + self.mlp(attended)  # Eq. (6)
        gates = self.input_gate_projection(token_states).unsqueeze(1) + self.memory_gate_projection(torch.tanh(memory))
        input_gate, forget_gate = torch.sigmoid(gates).chunk(2, dim=-1)  # Eq. (7)-(8), (B, slots, d) each
        return input_gate * torch.tanh(candidate) + forget_gate * memory  # Eq. (9)

    def forward(self, token_states: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Read `token_states` `(B, T, d)` in order, starting from `memory` `(B, slots, d)`.

        Returns:
            The memory after each token, flattened for MCLN, `(B, T, slots * d)`, and the last memory.
        """
        states = []
        for position in range(token_states.shape[1]):
            memory = self.step(token_states[:, position], memory)
            states.append(memory.flatten(1))
        return torch.stack(states, dim=1), memory


class ConditionalLayerNorm(nn.Module):
    """
    R2Gen's memory-driven conditional layer normalisation (MCLN, Eq. 10-12 of R2Gen): a LayerNorm whose scale and
    shift are offset by MLPs of the relational memory at the same position.

    Args:
        width (`int`): the normalised width (`d_model`).
        memory_width (`int`): the flattened memory width (`slots * d_model`).
        eps (`float`, *optional*, defaults to 1e-6): added to the standard deviation, as in R2Gen.
    """

    def __init__(self, width: int, memory_width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))  # gamma
        self.bias = nn.Parameter(torch.zeros(width))  # beta
        self.eps = eps
        self.scale_mlp = nn.Sequential(nn.Linear(memory_width, width), nn.ReLU(), nn.Linear(width, width))
        self.shift_mlp = nn.Sequential(nn.Linear(memory_width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, hidden_states: torch.Tensor, memory_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `(B, T, d)` normalised with the memory `(B, T, slots * d)` of each position."""
        mean = hidden_states.mean(-1, keepdim=True)
        std = hidden_states.std(-1, keepdim=True)
        scale = self.weight + self.scale_mlp(memory_states)  # gamma_hat = gamma + delta_gamma, Eq. (10)
        shift = self.bias + self.shift_mlp(memory_states)  # beta_hat = beta + delta_beta, Eq. (11)
        return scale * (hidden_states - mean) / (std + self.eps) + shift  # Eq. (12)


class RelationalMemoryCache(EncoderDecoderCache):
    """
    An `EncoderDecoderCache` that also keeps the relational memory after the last cached token, `(B, slots, d)`,
    so that each decoding step reads one token into it. Beam search reorders it with the self-attention cache.
    """

    def __init__(self, *caches) -> None:
        super().__init__(*caches)
        self.memory: torch.Tensor | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.reorder_memory(beam_idx)

    def reorder_memory(self, beam_idx: torch.LongTensor) -> None:
        """Move the relational memory with the beams (the self-attention cache moves separately)."""
        if self.memory is not None:
            self.memory = self.memory.index_select(0, beam_idx.to(self.memory.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.memory is not None:
            self.memory = self.memory.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.memory is not None:
            self.memory = self.memory[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "The relational memory cannot be rolled back to an earlier token; assisted decoding is not supported."
        )

    def reset(self):
        super().reset()
        self.memory = None


class D2RNetDecoderLayer(GradientCheckpointingLayer):
    """
    R2Gen's decoder layer: masked self-attention, cross-attention to the memory and feed-forward, each behind an
    MCLN conditioned on the relational memory (pre-norm residual blocks, Eq. 13 of R2Gen).
    """

    def __init__(self, config: D2RNetConfig, layer_idx: int | None = None):
        super().__init__()
        width, heads, dropout = config.d_model, config.decoder_attention_heads, config.attention_dropout
        memory_width = config.relational_memory_slots * config.d_model
        self.self_attn = CdanAttention(config, width, heads, dropout, is_causal=True, layer_idx=layer_idx)
        self.self_attn_layer_norm = ConditionalLayerNorm(width, memory_width)
        self.encoder_attn = CdanAttention(config, width, heads, dropout, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = ConditionalLayerNorm(width, memory_width)
        self.feed_forward = CdanFeedForward(config, config.decoder_ffn_dim)
        self.final_layer_norm = ConditionalLayerNorm(width, memory_width)
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`(B, T, d)` -> `(B, T, d)`, and the cross-attention weights `(B, H, T, S)` with `output_attentions`."""
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states, memory_states), cache=cache, attention_mask=attention_mask
        )
        hidden_states = hidden_states + nn.functional.dropout(attn_output, p=self.dropout, training=self.training)
        cross_output, cross_weights = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states, memory_states),
            key_value_states=encoder_hidden_states,
            cache=cache,
            attention_mask=encoder_attention_mask,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + nn.functional.dropout(cross_output, p=self.dropout, training=self.training)
        ffn_output = self.feed_forward(self.final_layer_norm(hidden_states, memory_states))
        hidden_states = hidden_states + nn.functional.dropout(ffn_output, p=self.dropout, training=self.training)
        if output_attentions:
            return hidden_states, cross_weights
        return hidden_states


class D2RNetPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the shared class attributes of the D2R-Net models."""

    config: D2RNetConfig
    config_class = D2RNetConfig
    base_model_prefix = "d2r_net"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CdanVisualExtractor", "CdanEncoderLayer", "D2RNetDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    has_disease_classifier = False
    """D2R-Net has no CheXpert observation classifier: its reports come without the model's own labels."""

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, D2RNetEncoder):
            init.normal_(module.segment_embeddings.weight, std=self.config.init_std)


class D2RNetEncoder(D2RNetPreTrainedModel):
    """
    Image side of D2R-Net, what `generate()` runs once per study: the CNN, the global branch (CPCA, 1x1 convolution
    to `embed_size`), the lesion branch (one feature per box) and a transformer encoder over both, whose output is
    the decoder's memory.

    Args:
        config (`D2RNetConfig`): the model configuration.
    """

    def __init__(self, config: D2RNetConfig):
        super().__init__(config)
        self.visual_extractor = CdanVisualExtractor(config)
        channels = self.visual_extractor.num_features
        self.global_embedding = GlobalImageEmbedding(channels, config.embed_size, reduction=config.cpca_reduction)
        self.lesion_encoder = None
        if config.use_lesion_branch:
            crop = config.lesion_feature_mode == "crop"
            self.lesion_encoder = LesionEncoder(
                3 if crop else channels,
                config.embed_size,
                mode=config.lesion_feature_mode,
                roi_size=config.lesion_roi_size,
                crop_size=config.lesion_crop_size,
            )
        for branch in (self.global_embedding, self.lesion_encoder):  # convolutional branches keep PyTorch's init
            for submodule in branch.modules() if branch is not None else ():
                submodule._is_hf_initialized = True
        # R2Gen's att_embed (Linear, ReLU, dropout) behind a LayerNorm, our stand-in for its optional BatchNorm
        # (`use_bn`): CPCA's multiplicative gates leave the patch and lesion features on a small, varying scale.
        self.memory_projection = nn.Sequential(
            nn.LayerNorm(config.embed_size),
            nn.Linear(config.embed_size, config.d_model),
            nn.ReLU(),
            nn.Dropout(config.dropout),
        )
        self.segment_embeddings = nn.Embedding(2, config.d_model)  # patch / lesion token (ours: tells them apart)
        self.layers = nn.ModuleList([CdanEncoderLayer(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        lesion_boxes: torch.FloatTensor | None = None,
        lesion_box_mask: torch.BoolTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> D2RNetEncoderOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            Processed views of each study (see [`CdanImageProcessor`]).
        lesion_boxes (`torch.FloatTensor` of shape `(batch_size, num_views, max_lesion_boxes, 4)`, *optional*):
            Boxes `x_min, y_min, x_max, y_max` in pixels of the processed views, as `CdanProcessor(boxes=...)` gives
            them. Without boxes a study is read by the global branch alone.
        lesion_box_mask (`torch.BoolTensor` of shape `(batch_size, num_views, max_lesion_boxes)`, *optional*):
            `True` for real boxes.
        output_hidden_states (`bool`, *optional*):
            Return the input and output of every encoder layer.
        """
        pixel_values = check_study_pixel_values(pixel_values, self.config.num_views)
        batch_size = pixel_values.shape[0]
        pixel_values = pixel_values.to(self.memory_projection[1].weight.dtype)
        views = pixel_values.flatten(0, 1)  # (B*V, 3, H, W)
        feature_maps = patch_features_to_maps(
            self.visual_extractor(pixel_values), self.config.num_views
        )  # (B*V, C, h, w)
        patch_embeddings = self.global_embedding(feature_maps)  # (B*V, h*w, E)
        patch_embeddings = patch_embeddings.reshape(batch_size, -1, patch_embeddings.shape[-1])  # (B, V*h*w, E)
        memory_inputs = self.memory_projection(patch_embeddings) + self.segment_embeddings.weight[0]  # (B, P, d)
        memory_mask = torch.ones(memory_inputs.shape[:2], dtype=torch.bool, device=memory_inputs.device)

        lesion_embeddings = lesion_mask = None
        if self.lesion_encoder is not None:
            lesion_boxes, lesion_box_mask = check_lesion_box_tensors(
                lesion_boxes, lesion_box_mask, batch_size, self.config.num_views, self.config.max_lesion_boxes,
                views.device,
            )  # fmt: skip
            lesion_embeddings = self.lesion_encoder(
                lesion_boxes.flatten(0, 1).to(views.dtype),  # (B*V, K, 4)
                lesion_box_mask.flatten(0, 1),  # (B*V, K)
                image_size=tuple(views.shape[-2:]),
                feature_map=feature_maps,
                pixel_values=views,
            )  # (B*V, K, E)
            lesion_embeddings = lesion_embeddings.reshape(batch_size, -1, lesion_embeddings.shape[-1])  # (B, V*K, E)
            lesion_mask = lesion_box_mask.reshape(batch_size, -1)  # (B, V*K)
            lesion_tokens = self.memory_projection(lesion_embeddings) + self.segment_embeddings.weight[1]
            memory_inputs = torch.cat([memory_inputs, lesion_tokens], dim=1)  # (B, P + V*K, d)
            memory_mask = torch.cat([memory_mask, lesion_mask], dim=1)
        elif lesion_boxes is not None:
            raise ValueError("This model has no lesion branch (`use_lesion_branch=False`); drop `lesion_boxes`.")

        attention_mask = key_padding_mask(memory_mask, memory_inputs.dtype)  # (B, 1, 1, S)
        hidden_states = memory_inputs
        all_hidden_states = () if output_hidden_states else None
        for encoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = encoder_layer(hidden_states, attention_mask=attention_mask)
        hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return D2RNetEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            memory_mask=memory_mask,
            patch_embeddings=patch_embeddings,
            lesion_embeddings=lesion_embeddings,
            lesion_mask=lesion_mask,
        )


class D2RNetDecoder(D2RNetPreTrainedModel):
    """
    R2Gen's memory-driven transformer decoder: scaled word embeddings plus sinusoidal positions, a relational memory
    that reads the report token by token, and `decoder_layers` layers whose normalisations are conditioned on it.
    Keys, values and the last memory are cached in a [`RelationalMemoryCache`] during generation.

    Args:
        config (`D2RNetConfig`): the model configuration.
    """

    def __init__(self, config: D2RNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.embed_scale = config.d_model**0.5
        self.dropout = config.dropout
        self.relational_memory = RelationalMemory(config)
        self.layers = nn.ModuleList([D2RNetDecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.layer_norm = ConditionalLayerNorm(config.d_model, config.relational_memory_slots * config.d_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.BoolTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        r"""
        encoder_attention_mask (`torch.BoolTensor` of shape `(num_studies, memory_length)`, *optional*):
            `True` for memory tokens to attend to; `num_studies` may divide the batch (beams share their memory).
        cache ([`RelationalMemoryCache`], *optional*):
            Cached keys and values, and the relational memory after the cached tokens. A plain, empty
            `EncoderDecoderCache` (as `generate()` makes) is taken over.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `decoder_input_ids` and `decoder_inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, d)
        if use_cache and not isinstance(cache, RelationalMemoryCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("D2R-Net continues from a `RelationalMemoryCache`; this cache has no memory state.")
            cache = RelationalMemoryCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        batch_size, target_length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length + target_length > self.config.max_position_embeddings:
            raise ValueError(
                f"Report length {past_length + target_length} exceeds `max_position_embeddings` "
                f"({self.config.max_position_embeddings}); lower the generation `max_length`."
            )
        positions = sinusoidal_positions(past_length + target_length, self.config.d_model, inputs_embeds.device,
                                         inputs_embeds.dtype)[past_length:]  # fmt: skip
        hidden_states = inputs_embeds + positions  # R2Gen's tgt_embed: (B, T, d)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        memory = cache.memory if isinstance(cache, RelationalMemoryCache) and past_length > 0 else None
        if memory is None:
            memory = self.relational_memory.initial_memory(batch_size, hidden_states.device, hidden_states.dtype)
        memory_states, memory = self.relational_memory(hidden_states, memory)  # (B, T, slots*d), (B, slots, d)
        if isinstance(cache, RelationalMemoryCache):
            cache.memory = memory

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_length + target_length, device=hidden_states.device)
        self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=self_attention_cache,
            position_ids=torch.arange(past_length, past_length + target_length, device=hidden_states.device)[None],
        )
        memory_attention_mask = None
        if encoder_attention_mask is not None and not encoder_attention_mask.all():
            memory_attention_mask = key_padding_mask(encoder_attention_mask, hidden_states.dtype)  # (B_s, 1, 1, S)

        all_hidden_states = () if output_hidden_states else None
        all_cross_attentions = () if output_attentions else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_outputs = decoder_layer(
                hidden_states,
                memory_states,
                causal_mask,
                encoder_hidden_states,
                memory_attention_mask,
                cache=cache,
                output_attentions=bool(output_attentions),
            )
            if output_attentions:
                hidden_states, cross_weights = layer_outputs
                all_cross_attentions += (cross_weights,)
            else:
                hidden_states = layer_outputs
        hidden_states = self.layer_norm(hidden_states, memory_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return D2RNetDecoderOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            cross_attentions=all_cross_attentions,
        )


class D2RNetForConditionalGeneration(SharedMemoryGenerationMixin, D2RNetPreTrainedModel, GenerationMixin):
    """
    D2R-Net with its language-model head: chest X-ray views and their lesion boxes in, findings report out.

    `forward` returns the token cross-entropy (`loss`, LM) and, when the alignment text inputs are given (training),
    GAB's and LAB's losses, which the trainer adds (the paper's total loss, weights 1). Reports are written with
    the stock `generate()`; `model.alignment.ground(...)` ([`ImageTextAlignment.ground`]) scores each generated
    sentence against the boxes it was generated from.

    Example:

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/checkpoint", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/checkpoint", trust_remote_code=True)
    >>> inputs = processor(images=[["frontal.png", "lateral.png"]], boxes=[[[[120, 300, 260, 420]], []]])
    >>> report = processor.batch_decode(model.generate(**inputs))[0]
    ```
    """

    per_study_generation_inputs = ("encoder_outputs",)

    def __init__(self, config: D2RNetConfig):
        super().__init__(config)
        self.encoder = D2RNetEncoder(config)
        self.decoder = D2RNetDecoder(config)
        self.lm_head = CdanLinear.from_config(config, config.d_model, config.vocab_size, bias=False)
        self.alignment = None
        if config.use_alignment:  # GAB and LAB (d2r_modules)
            self.alignment = ImageTextAlignment.from_text_config(
                config.alignment_text_config, config.embed_size, freeze_text_model=config.freeze_alignment_text_model,
                margin=config.alignment_margin, smoothing=config.alignment_smoothing,
            )  # fmt: skip
        self.loss_type = "ForMaskedLM"  # labels are already aligned with the right-shifted decoder inputs
        self.post_init()
        self.generation_config.update(**DEFAULT_GENERATION_KWARGS)

    @classmethod
    def from_backbones_pretrained(
        cls,
        config: D2RNetConfig,
        visual_weights_path: str | None = None,
        text_model_name_or_path: str | None = None,
    ) -> "D2RNetForConditionalGeneration":
        """
        A new D2R-Net whose CNN starts from ImageNet weights (a local file, or the Hub through `timm`) and whose
        text encoder starts from a pre-trained BERT-family model (a local folder or a Hub id); the rest is random.
        """
        model = cls(config)
        if visual_weights_path is not None or config.visual_extractor_weights is not None:
            model.encoder.visual_extractor.load_pretrained_weights(visual_weights_path)
        if text_model_name_or_path is not None:
            model.load_alignment_text_model(text_model_name_or_path)
        return model

    def load_alignment_text_model(self, name_or_path: str) -> None:
        """Load pre-trained weights into the alignment text encoder; `alignment_text_config` must match them."""
        if self.alignment is None:
            raise ValueError("This model has no alignment text encoder (`use_alignment=False`).")
        self.alignment.load_text_model(name_or_path)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    def get_encoder(self, modality: str | None = None) -> D2RNetEncoder:
        return self.encoder

    def get_decoder(self) -> D2RNetDecoder:
        return self.decoder

    def _reorder_cache(self, cache: RelationalMemoryCache, beam_idx: torch.LongTensor) -> RelationalMemoryCache:
        """Beams of a study share its memory: reorder the self-attention cache and the relational memory only."""
        cache.self_attention_cache.reorder_cache(beam_idx)
        if isinstance(cache, RelationalMemoryCache):
            cache.reorder_memory(beam_idx)
        return cache

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: D2RNetEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        lesion_boxes: torch.FloatTensor | None = None,
        lesion_box_mask: torch.BoolTensor | None = None,
        report_text_input_ids: torch.LongTensor | None = None,
        report_text_attention_mask: torch.LongTensor | None = None,
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> D2RNetSeq2SeqLMOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            Processed views of each study (see [`CdanImageProcessor`]).
        decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Report tokens fed to the decoder; built from `labels` when omitted.
        decoder_attention_mask (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Padding mask of `decoder_input_ids`; a causal mask is always applied.
        encoder_outputs ([`D2RNetEncoderOutput`], *optional*):
            Precomputed encoder outputs, as `generate()` passes them.
        cache ([`RelationalMemoryCache`], *optional*):
            Cached decoder keys, values and relational memory.
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target report tokens ending in `eos`, padded with `-100`.
        lesion_boxes, lesion_box_mask:
            The boxes of each view (see [`D2RNetEncoder.forward`]).
        report_text_input_ids, report_text_attention_mask (`torch.LongTensor` of shape `(batch_size, length)`):
            *Optional*, training only: the reference report tokenised for the alignment text encoder (GAB).
        sentence_input_ids, sentence_attention_mask (`torch.LongTensor` of shape `(batch_size, sentences, length)`):
            *Optional*, training only: its sentences, one per row (all-zero mask rows are padding) (LAB).
        kwargs:
            `num_items_in_batch` from the Trainer, so the loss is correct under gradient accumulation.
        """
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values=pixel_values,
                lesion_boxes=lesion_boxes,
                lesion_box_mask=lesion_box_mask,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, D2RNetEncoderOutput):
            encoder_outputs = D2RNetEncoderOutput(*encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_outputs.memory_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(decoder_outputs.last_hidden_state)  # (B, T, vocab_size)

        loss = global_loss = local_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)  # LM
            if self.alignment is not None:  # GAB and LAB
                global_loss, local_loss = self.alignment.losses(
                    encoder_outputs.patch_embeddings, encoder_outputs.lesion_embeddings, encoder_outputs.lesion_mask,
                    report_text_input_ids, report_text_attention_mask, sentence_input_ids, sentence_attention_mask,
                )  # fmt: skip
        if self.alignment is None and (report_text_input_ids is not None or sentence_input_ids is not None):
            raise ValueError("This model has no alignment blocks (`use_alignment=False`); drop the text inputs.")
        return D2RNetSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            global_alignment_loss=global_loss,
            local_alignment_loss=local_loss,
            memory_mask=encoder_outputs.memory_mask,
            lesion_embeddings=encoder_outputs.lesion_embeddings,
            lesion_mask=encoder_outputs.lesion_mask,
        )


D2RNetForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "ConditionalLayerNorm",
    "D2RNetDecoder",
    "D2RNetDecoderLayer",
    "D2RNetEncoder",
    "D2RNetEncoderOutput",
    "D2RNetForConditionalGeneration",
    "D2RNetPreTrainedModel",
    "D2RNetSeq2SeqLMOutput",
    "RelationalMemory",
    "RelationalMemoryCache",
]
