"""PriorRG: prior-guided contrastive pre-training and coarse-to-fine decoding for chest X-ray report generation.

The model reads the current study's views with their view positions, the clinical context (indication and history,
see `priorrg_modules.format_clinical_context`) and, when there is one, the patient's prior study:

```
u_t    = proj(ViT(x_t)) + e_view + e_temporal(0)            # current tokens, every view, (B, V*N, C)
u_t-1  = proj(ViT(x_t-1)) + e_view + e_temporal(1)          # prior tokens, studies with a prior only
u_st   = TemporalFusion(u_t, u_t-1)                          # current queries prior; u_t where there is no prior
ctx    = P(TextEncoder(context))                             # Perceiver over the context tokens, (B, M, C)
st     = P(u_st, latents=ctx)                                # coarse: spatiotemporal latents, (B, M, C)
joint  = P(proj(LayerwiseFusion(ViT hidden states)), latents=st)   # fine: all-layer detail, (B, M, C)
report = GPT2([ctx, st, joint])                              # the decoder cross-attends to 3M latents
```

Stage 1 (prior-guided contrastive pre-training) aligns `mean([ctx, st])` with the text encoder's projected `[CLS]`
state of `"[FINDINGS] " + findings` through a symmetric multi-positive InfoNCE
([`PriorRGForConditionalGeneration.get_contrastive_outputs`]); stage 2 trains the decoder with cross-entropy. One
Perceiver is shared by the three passes, as in PriorRG.

Differences from the public code, each a choice of this library: several views per study (each view's tokens carry
its view embedding and are concatenated), view and temporal embeddings both added after the projection to the
Perceiver width, the context's padding masked in the Perceiver, and checkpoints never selected on the test split.

References:
1) Liu et al., "PriorRG: Prior-Guided Contrastive Pre-training and Coarse-to-Fine Decoding for Chest X-ray Report
   Generation", AAAI 2026, arXiv:2508.05353, and its public code (github.com/mk-runner/PriorRG).
2) `transformers`' `VisionEncoderDecoderModel` (a stock vision encoder and a stock causal LM with cross-attention,
   `Seq2SeqLMOutput`) and `BlipForConditionalGeneration`.
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.utils import ModelOutput, can_return_tuple, logging

try:
    from .configuration_priorrg import PriorRGConfig
    from .priorrg_modules import (
        ContextEncoder,
        ContrastiveHead,
        LayerwiseFusion,
        PerceiverResampler,
        TemporalFusion,
        ViewTemporalEmbeddings,
        pooled_image_embedding,
        scatter_rows,
    )
except ImportError:
    from configuration_priorrg import PriorRGConfig
    from priorrg_modules import (
        ContextEncoder,
        ContrastiveHead,
        LayerwiseFusion,
        PerceiverResampler,
        TemporalFusion,
        ViewTemporalEmbeddings,
        pooled_image_embedding,
        scatter_rows,
    )

logger = logging.get_logger(__name__)

OFFLINE_HINT = (
    "This machine may be offline: download the model elsewhere and pass its local folder, or set HF_HUB_OFFLINE=1 to "
    "use only files already in the Hugging Face cache."
)


@dataclass
class PriorRGEncoderOutput(BaseModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 3 * num_latents, hidden_size)`):
        The decoder's memory: `[ctx, st, joint]` latents.
    context_latents (`torch.FloatTensor` of shape `(batch_size, num_latents, hidden_size)`):
        `ctx`, the Perceiver's reading of the clinical context (its learned latents when there is none).
    spatiotemporal_latents (`torch.FloatTensor` of shape `(batch_size, num_latents, hidden_size)`):
        `st`, the coarse reading of the current images fused with the prior study.
    joint_latents (`torch.FloatTensor` of shape `(batch_size, num_latents, hidden_size)`):
        `joint`, the fine reading of the layer-wise fused vision features.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Stage 1's image embedding, the mean over `[ctx, st]`.
    """

    context_latents: torch.FloatTensor | None = None
    spatiotemporal_latents: torch.FloatTensor | None = None
    joint_latents: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


@dataclass
class PriorRGSeq2SeqLMOutput(Seq2SeqLMOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Token cross-entropy, PriorRG's only stage-2 loss.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Stage 1's image embedding of each study.
    disease_logits (`None`):
        PriorRG has no observation classifier; the field exists so the shared trainer and evaluation can ask.
    visual_semantics (`None`):
        PriorRG has no semantic-consistency term; as `disease_logits`.
    """

    image_embeds: torch.FloatTensor | None = None
    disease_logits: torch.FloatTensor | None = None
    visual_semantics: torch.FloatTensor | None = None


@dataclass
class PriorRGContrastiveOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): Stage 1's symmetric multi-positive InfoNCE.
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`): Scaled cosine similarities, image
        rows against report columns.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): `mean([ctx, st])` per study.
    report_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): The projected `[CLS]` state per report.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    report_embeds: torch.FloatTensor | None = None


def load_pretrained_backbone(model_class, name_or_path: str, what: str, **kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained(name_or_path)`, with a message that says what failed and what to do offline."""
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(f"Could not load the {what} from {name_or_path!r}: {error}\n{OFFLINE_HINT}") from error


class PriorRGPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the shared class attributes of the PriorRG models."""

    config: PriorRGConfig
    config_class = PriorRGConfig
    base_model_prefix = "priorrg"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerceiverResamplerLayer", "TemporalFusionLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    has_disease_classifier = False
    """PriorRG has no CheXpert observation classifier: its reports come without the model's own labels."""

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        if isinstance(module, PerceiverResampler):
            module.reset_parameters()  # PriorRG: latents from torch.randn, std 1
        elif isinstance(module, ContrastiveHead):
            module.reset_parameters()
        elif isinstance(module, ViewTemporalEmbeddings):
            init.normal_(module.view_embeddings.weight, std=self.config.init_std)
            init.normal_(module.temporal_embeddings.weight, std=self.config.init_std)


class PriorRGEncoder(PriorRGPreTrainedModel):
    """
    Everything before the decoder: the vision encoder, the context encoder, the temporal fusion, the layer-wise fusion
    and the shared Perceiver, giving the `[ctx, st, joint]` memory (see the module docstring).

    Args:
        config (`PriorRGConfig`): The configuration; the vision and text encoders are built from its sub-configs with
            random weights (see [`PriorRGForConditionalGeneration.from_backbones_pretrained`] for published ones).
    """

    def __init__(self, config: PriorRGConfig):
        super().__init__(config)
        vision_size, text_size = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.vision_projection = nn.Sequential(
            nn.Linear(vision_size, config.hidden_size), nn.LayerNorm(config.hidden_size)
        )
        self.view_temporal_embeddings = ViewTemporalEmbeddings(config.hidden_size, config.view_positions)
        self.temporal_fusion = TemporalFusion(
            config.hidden_size, config.temporal_fusion_layers, config.temporal_fusion_heads, dropout=config.dropout
        )
        self.layerwise_fusion = LayerwiseFusion(
            config.vision_config.num_hidden_layers, vision_size, reduction=config.layerwise_fusion_reduction
        )
        self.joint_projection = nn.Sequential(
            nn.Linear(vision_size, config.hidden_size), nn.LayerNorm(config.hidden_size)
        )
        self.context_encoder = ContextEncoder(AutoModel.from_config(config.text_config), config.hidden_size)
        self.perceiver = PerceiverResampler(
            config.hidden_size,
            num_latents=config.num_latents,
            depth=config.perceiver_depth,
            num_heads=config.perceiver_num_heads,
            head_dim=config.perceiver_head_dim,
            ff_mult=config.perceiver_ff_mult,
            dropout=config.dropout,
        )
        self.post_init()
        if text_size != config.text_config.hidden_size:  # pragma: no cover - sub-config sanity
            raise ValueError("text_config changed while building the context encoder.")
        self.set_vision_model_frozen(config.freeze_vision_model)

    def set_vision_model_frozen(self, frozen: bool = True) -> None:
        """Freeze (PriorRG) or unfreeze the vision encoder; a frozen one also stays in eval mode."""
        self.vision_model.requires_grad_(not frozen)
        self.vision_model.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "PriorRGEncoder":
        super().train(mode)
        if self.config.freeze_vision_model:
            self.vision_model.eval()  # a frozen encoder keeps its eval-mode behaviour (dropout off)
        return self

    def check_pixel_values(self, pixel_values: torch.Tensor | None, name: str = "pixel_values") -> torch.Tensor:
        """Check the `(batch, num_views, 3, height, width)` layout the processor produces."""
        if pixel_values is None:
            raise ValueError(f"PriorRG needs `{name}` of shape (batch, num_views, 3, height, width).")
        if pixel_values.ndim != 5 or pixel_values.shape[2] != self.config.vision_config.num_channels:
            raise ValueError(
                f"`{name}` must have shape (batch, num_views, {self.config.vision_config.num_channels}, height, "
                f"width), as CdanProcessor returns; got {tuple(pixel_values.shape)}."
            )
        return pixel_values

    def encode_views(
        self,
        pixel_values: torch.Tensor,
        view_position_ids: torch.LongTensor | None,
        temporal_id: int,
        output_layers: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Encode every view of every study.

        Returns:
            The projected tokens with view and temporal embeddings, `(B, V * N, C)`, and with `output_layers` the
            layer-wise fused vision features `(B, V * N, C)` (`None` otherwise).
        """
        batch_size, num_views = pixel_values.shape[:2]
        outputs = self.vision_model(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=output_layers)
        tokens = self.vision_projection(outputs.last_hidden_state)  # (B*V, N, C)
        if view_position_ids is not None:
            if view_position_ids.shape != (batch_size, num_views):
                raise ValueError(
                    f"`view_position_ids` must have shape (batch, num_views) = {(batch_size, num_views)}; got "
                    f"{tuple(view_position_ids.shape)}."
                )
            view_position_ids = view_position_ids.flatten()
        else:
            unknown = self.view_temporal_embeddings.unknown_view_id
            view_position_ids = torch.full((batch_size * num_views,), unknown, device=tokens.device)
        tokens = self.view_temporal_embeddings(tokens, view_position_ids, temporal_id)  # (B*V, N, C)
        tokens = tokens.unflatten(0, (batch_size, num_views)).flatten(1, 2)  # (B, V*N, C)
        joint_features = None
        if output_layers:
            layer_states = torch.stack(outputs.hidden_states[1:], dim=1)  # (B*V, L, N, C_vision), embeddings dropped
            joint_features = self.joint_projection(self.layerwise_fusion(layer_states))  # (B*V, N, C)
            joint_features = joint_features.unflatten(0, (batch_size, num_views)).flatten(1, 2)  # (B, V*N, C)
        return tokens, joint_features

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        view_position_ids: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        prior_pixel_values: torch.FloatTensor | None = None,
        has_prior: torch.BoolTensor | None = None,
        prior_view_position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> PriorRGEncoderOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            The current study's views, as [`CdanProcessor`] returns them.
        view_position_ids (`torch.LongTensor` of shape `(batch_size, num_views)`, *optional*):
            Index of each view's position in `config.view_positions` (`len(view_positions)` = unknown).
        context_input_ids (`torch.LongTensor` of shape `(batch_size, context_length)`, *optional*):
            The clinical context, tokenised by the processor's context tokenizer.
        context_attention_mask (`torch.LongTensor` of shape `(batch_size, context_length)`, *optional*):
            Its mask; a row of zeros is a study without context.
        prior_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`, *optional*):
            The prior study's views (any values in rows without a prior).
        has_prior (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Which studies have a prior; all of them when `prior_pixel_values` is given without it.
        prior_view_position_ids (`torch.LongTensor` of shape `(batch_size, num_prior_views)`, *optional*):
            As `view_position_ids`, for the prior views.
        """
        pixel_values = self.check_pixel_values(pixel_values)
        batch_size = pixel_values.shape[0]
        current_tokens, joint_features = self.encode_views(pixel_values, view_position_ids, 0, output_layers=True)

        spatiotemporal = current_tokens  # (B, V*N, C)
        if prior_pixel_values is not None:
            prior_pixel_values = self.check_pixel_values(prior_pixel_values, "prior_pixel_values")
            if has_prior is None:
                has_prior = torch.ones(batch_size, dtype=torch.bool, device=pixel_values.device)
            has_prior = has_prior.bool()
            if has_prior.shape != (batch_size,):
                raise ValueError(f"`has_prior` must have shape ({batch_size},); got {tuple(has_prior.shape)}.")
            if has_prior.any():
                prior_ids = prior_view_position_ids[has_prior] if prior_view_position_ids is not None else None
                prior_tokens, _ = self.encode_views(prior_pixel_values[has_prior], prior_ids, 1)  # (B_p, V'*N, C)
                prior_states = scatter_rows(prior_tokens, has_prior)  # (B, V'*N, C), zeros without a prior
                spatiotemporal = self.temporal_fusion(current_tokens, prior_states, has_prior)  # (B, V*N, C)

        context_states, context_mask = self.context_encoder.encode_study_context(
            context_input_ids, context_attention_mask, batch_size
        )  # (B, T, C), (B, T)
        context_latents = self.perceiver(context_states, context_mask)  # ctx = P(context), (B, M, C)
        spatiotemporal_latents = self.perceiver(spatiotemporal, latents=context_latents)  # st = P(u_st, ctx)
        joint_latents = self.perceiver(joint_features, latents=spatiotemporal_latents)  # joint = P(fused, st)
        memory = torch.cat([context_latents, spatiotemporal_latents, joint_latents], dim=1)  # (B, 3M, C)
        return PriorRGEncoderOutput(
            last_hidden_state=memory,
            context_latents=context_latents,
            spatiotemporal_latents=spatiotemporal_latents,
            joint_latents=joint_latents,
            image_embeds=pooled_image_embedding(context_latents, spatiotemporal_latents),  # (B, C)
        )


class PriorRGForConditionalGeneration(PriorRGPreTrainedModel, GenerationMixin):
    """
    PriorRG with its report decoder: current views, clinical context and prior study in, findings report out, through
    the stock `generate()` (greedy, beam search, `no_repeat_ngram_size`) with the decoder's key/value cache.

    Example:

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/priorrg", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/priorrg", trust_remote_code=True)
    >>> inputs = processor(images=[["frontal.png"]], indication=["cough"], prior_images=[["last_year.png"]])
    >>> report = processor.batch_decode(model.generate(**inputs, num_beams=3, max_length=100))[0]
    ```
    """

    def __init__(self, config: PriorRGConfig):
        super().__init__(config)
        self.encoder = PriorRGEncoder(config)
        decoder_width = config.decoder_config.hidden_size
        self.memory_projection = (
            nn.Linear(config.hidden_size, decoder_width) if decoder_width != config.hidden_size else nn.Identity()
        )
        self.decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        self.contrastive_head = ContrastiveHead(config.contrastive_temperature)
        self.loss_type = "ForMaskedLM"  # labels are already aligned with the right-shifted decoder inputs
        self.post_init()

    @classmethod
    def from_backbones_pretrained(
        cls,
        config: PriorRGConfig | None = None,
        vision_model_name_or_path: str | None = None,
        text_model_name_or_path: str | None = None,
        load_vision_model: bool = True,
        load_text_model: bool = True,
        **config_kwargs,
    ) -> "PriorRGForConditionalGeneration":
        """
        A new PriorRG model whose vision and text encoders start from pre-trained weights (the published RAD-DINO and
        CXR-BERT by default, from the Hub or a local folder); the text encoder keeps its first
        `config.text_config.num_hidden_layers` layers. Each loaded model's configuration replaces the sub-config.

        Args:
            config (`PriorRGConfig`, *optional*): Built from `config_kwargs` when omitted.
            vision_model_name_or_path (`str`, *optional*): Defaults to `config.vision_model_name_or_path`.
            text_model_name_or_path (`str`, *optional*): Defaults to `config.text_model_name_or_path`.
            load_vision_model (`bool`, *optional*, defaults to `True`): `False` keeps a random vision encoder of
                `config.vision_config` (e.g. a small one trained from scratch).
            load_text_model (`bool`, *optional*, defaults to `True`): The same for the text encoder.
        """
        config = config if config is not None else PriorRGConfig(**config_kwargs)
        vision_model = text_model = None
        if load_vision_model:
            vision_path = vision_model_name_or_path or config.vision_model_name_or_path
            vision_model = load_pretrained_backbone(AutoModel, vision_path, "vision encoder")
            config.vision_config, config.vision_model_name_or_path = vision_model.config, vision_path
        if load_text_model:
            text_path = text_model_name_or_path or config.text_model_name_or_path
            text_model = load_pretrained_backbone(
                AutoModel, text_path, "text encoder", num_hidden_layers=config.text_config.num_hidden_layers
            )
            config.text_config, config.text_model_name_or_path = text_model.config, text_path
        model = cls(config)
        if vision_model is not None:
            model.encoder.vision_model.load_state_dict(vision_model.state_dict())
        if text_model is not None:
            model.encoder.context_encoder.text_model.load_state_dict(text_model.state_dict())
        model.encoder.set_vision_model_frozen(config.freeze_vision_model)
        return model

    def resize_text_embeddings(self, num_tokens: int) -> None:
        """Resize the text encoder's embeddings to the context tokenizer (which adds the section tags)."""
        text_model = self.encoder.context_encoder.text_model
        text_model.resize_token_embeddings(num_tokens)
        self.config.text_config.vocab_size = num_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.decoder.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality: str | None = None) -> PriorRGEncoder:
        return self.encoder

    def get_decoder(self) -> PreTrainedModel:
        return self.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, self.config.pad_token_id)
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted

    def report_embeddings(
        self, report_input_ids: torch.LongTensor, report_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projected `[CLS]` state of each `"[FINDINGS] " + findings` text, stage 1's report embedding (B, C)."""
        states, _ = self.encoder.context_encoder(report_input_ids, report_attention_mask)  # (B, T, C)
        return states[:, 0]

    def get_contrastive_outputs(
        self,
        report_input_ids: torch.LongTensor,
        report_attention_mask: torch.Tensor | None = None,
        study_ids: torch.Tensor | Sequence[Hashable] | None = None,
        encoder_outputs: PriorRGEncoderOutput | None = None,
        **encoder_inputs,
    ) -> PriorRGContrastiveOutput:
        """
        Stage 1: PriorRG's prior-guided contrastive loss between each study's `mean([ctx, st])` and its report.

        Args:
            report_input_ids (`torch.LongTensor` of shape `(batch_size, report_length)`): `"[FINDINGS] " + findings`
                tokenised by the context tokenizer (which writes `[CLS]` first).
            report_attention_mask (`torch.Tensor` of shape `(batch_size, report_length)`, *optional*): Its mask.
            study_ids (`torch.Tensor` or a sequence, *optional*): Rows with equal ids are positives of each other;
                every row its own study when omitted.
            encoder_outputs (`PriorRGEncoderOutput`, *optional*): Precomputed encoder outputs.
            encoder_inputs: The encoder's inputs (`pixel_values`, `context_input_ids`, `prior_pixel_values`, ...).
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(**encoder_inputs)
        image_embeds = encoder_outputs.image_embeds  # (B, C)
        report_embeds = self.report_embeddings(report_input_ids, report_attention_mask)  # (B, C)
        if study_ids is None:
            study_ids = torch.arange(image_embeds.shape[0], device=image_embeds.device)
        loss = self.contrastive_head(image_embeds, report_embeds, study_ids)  # symmetric multi-positive InfoNCE
        logits_per_image = self.contrastive_head.scale() * (
            nn.functional.normalize(image_embeds, dim=-1) @ nn.functional.normalize(report_embeds, dim=-1).t()
        )  # (B, B)
        return PriorRGContrastiveOutput(
            loss=loss, logits_per_image=logits_per_image, image_embeds=image_embeds, report_embeds=report_embeds
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: PriorRGEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        view_position_ids: torch.LongTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        prior_pixel_values: torch.FloatTensor | None = None,
        has_prior: torch.BoolTensor | None = None,
        prior_view_position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> PriorRGSeq2SeqLMOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            The current study's views (see [`PriorRGEncoder.forward`] for them and the other encoder inputs).
        decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Report tokens fed to the decoder; built from `labels` when omitted.
        decoder_attention_mask (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Padding mask of `decoder_input_ids`.
        encoder_outputs (`PriorRGEncoderOutput`, *optional*):
            Precomputed encoder outputs, as `generate()` passes them.
        cache (`EncoderDecoderCache`, *optional*):
            Cached decoder keys and values.
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target report tokens ending in `eos`, padded with `-100`.
        kwargs:
            `num_items_in_batch` from the Trainer, so the loss is correct under gradient accumulation.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                pixel_values=pixel_values,
                view_position_ids=view_position_ids,
                context_input_ids=context_input_ids,
                context_attention_mask=context_attention_mask,
                prior_pixel_values=prior_pixel_values,
                has_prior=has_prior,
                prior_view_position_ids=prior_view_position_ids,
            )
        elif isinstance(encoder_outputs, tuple):
            encoder_outputs = PriorRGEncoderOutput(*encoder_outputs)
        memory = self.memory_projection(encoder_outputs.last_hidden_state)  # (B, 3M, C_decoder)

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=memory,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = decoder_outputs.logits  # (B, T, vocab_size)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )  # cross-entropy, stage 2's only loss

        return PriorRGSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            image_embeds=encoder_outputs.image_embeds,
        )


PriorRGForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "PriorRGContrastiveOutput",
    "PriorRGEncoder",
    "PriorRGEncoderOutput",
    "PriorRGForConditionalGeneration",
    "PriorRGPreTrainedModel",
    "PriorRGSeq2SeqLMOutput",
]
