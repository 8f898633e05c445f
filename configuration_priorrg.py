"""PriorRG model configuration.

PriorRG (Liu et al., "PriorRG: Prior-Guided Contrastive Pre-training and Coarse-to-Fine Decoding for Chest X-ray
Report Generation", AAAI 2026, arXiv:2508.05353) reads the current study with its view positions, the clinical context
(indication, history) and the patient's prior study. A frozen vision transformer (RAD-DINO) and a BERT-family text
encoder (CXR-BERT cut to 6 layers) feed a shared Perceiver resampler; a GPT-2 decoder (DistilGPT-2 size, trained from
scratch) cross-attends to the resampled `[context, spatiotemporal, joint]` latents.

The configuration is composite, like `VisionEncoderDecoderConfig` and `BlipConfig`: `vision_config`, `text_config` and
`decoder_config` are full sub-configurations of stock `transformers` models (any `AutoModel` vision model whose output
has `last_hidden_state` and `hidden_states`, any BERT-family text model, any causal LM with cross-attention), and the
PriorRG modules (`priorrg_modules.py`) are described by flat fields. The defaults are the published sizes.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .priorrg_modules import DEFAULT_VIEW_POSITIONS
except ImportError:
    from priorrg_modules import DEFAULT_VIEW_POSITIONS


RAD_DINO = "microsoft/rad-dino"
"""The published vision encoder: a DINOv2 ViT-B/14 trained on chest X-rays, 518 px inputs."""

CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"
"""The published text encoder: CXR-BERT, of which PriorRG keeps the first 6 layers."""

PRIORRG_SIZES = {
    "published": {},
    "demo": {
        "vision_config": {
            "model_type": "dinov2", "image_size": 96, "patch_size": 16, "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "intermediate_size": 256,
        },
        "text_config": {"model_type": "bert", "num_hidden_layers": 2},
        "decoder_config": {"model_type": "gpt2", "n_layer": 3, "n_embd": 128, "n_head": 4},
        "hidden_size": 128, "num_latents": 32, "perceiver_num_heads": 4, "perceiver_head_dim": 32,
        "temporal_fusion_heads": 4, "freeze_vision_model": False,
    },
}  # fmt: skip
"""
Named sizes: `published` is PriorRG's; `demo` is a CPU-sized one for the embedded demo (a 4-layer DINOv2 trained from
scratch at 96 px, width 128, 32 latents, a 3-layer GPT-2), whose text encoder keeps the first 2 layers of what
`--context_text_encoder` loads (the text encoder dominates the step time on CPU).
"""

PRIORRG_STAGES = ("pretrain", "finetune")
"""PriorRG's two training stages: prior-guided contrastive pre-training, then coarse-to-fine report generation."""


@strict
class PriorRGConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PriorRGForConditionalGeneration`]. The defaults give PriorRG's published architecture:
    a RAD-DINO-sized DINOv2 (768 wide, 12 layers, patch 14, 518 px), a 6-layer BERT for the context, a 128-latent
    Perceiver of depth 3 (8 heads of 64), 3 temporal-fusion blocks and a DistilGPT-2-sized decoder (6 layers, 768 wide,
    12 heads). Build it with pre-trained backbones through
    [`PriorRGForConditionalGeneration.from_backbones_pretrained`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision encoder (an `AutoModel` config). Defaults to a RAD-DINO-sized `Dinov2Config`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The context and report text encoder (a BERT-family `AutoModel` config). Defaults to a 6-layer `BertConfig`
            (CXR-BERT cut to 6 layers).
        decoder_config (`dict` or `PreTrainedConfig`, *optional*):
            The report decoder (an `AutoModelForCausalLM` config with `add_cross_attention=True`). Defaults to a
            DistilGPT-2-sized `GPT2Config`; its vocabulary and special tokens are set from this configuration.
        vision_model_name_or_path (`str`, *optional*, defaults to `"microsoft/rad-dino"`):
            Where [`PriorRGForConditionalGeneration.from_backbones_pretrained`] loads the vision weights from by
            default (a Hub id or a local folder).
        text_model_name_or_path (`str`, *optional*, defaults to `"microsoft/BiomedVLP-CXR-BERT-specialized"`):
            The same for the text encoder.
        freeze_vision_model (`bool`, *optional*, defaults to `True`):
            Keep the vision encoder frozen, in eval mode (PriorRG freezes RAD-DINO). Switch off for a randomly
            initialised vision encoder.
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the Perceiver latents, the projected image and context tokens, and the decoder's memory.
        num_latents (`int`, *optional*, defaults to 128): Learned latents of the Perceiver.
        perceiver_depth (`int`, *optional*, defaults to 3): Perceiver layers.
        perceiver_num_heads (`int`, *optional*, defaults to 8): Perceiver attention heads.
        perceiver_head_dim (`int`, *optional*, defaults to 64): Width of each Perceiver head.
        perceiver_ff_mult (`int`, *optional*, defaults to 4): GEGLU inner width over `hidden_size`.
        temporal_fusion_layers (`int`, *optional*, defaults to 3): Temporal-fusion blocks (current queries prior).
        temporal_fusion_heads (`int`, *optional*, defaults to 8): Their attention heads.
        view_positions (`list[str]`, *optional*, defaults to `["PA", "AP", "LATERAL", "LL"]`): Named views with a
            learned embedding; any other view shares one "unknown" embedding. Must match the processor's.
        layerwise_fusion_reduction (`int`, *optional*, defaults to 4): Channel-attention reduction of the layer-wise
            fusion.
        contrastive_temperature (`float`, *optional*, defaults to 0.07): Initial temperature of stage 1's InfoNCE.
        dropout (`float`, *optional*, defaults to 0.0): Dropout of the Perceiver and the temporal fusion.
        vocab_size (`int`, *optional*, defaults to 764): Size of the report vocabulary (the processor's tokenizer).
        max_position_embeddings (`int`, *optional*, defaults to 128): Decoder positions (PriorRG writes 100 tokens).
        init_std (`float`, *optional*, defaults to 0.02): Standard deviation of the PriorRG modules' weights.
    """

    model_type = "priorrg"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="dinov2",
            init_kwargs={"image_size": 518, "patch_size": 14, "hidden_size": 768, "num_hidden_layers": 12},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", init_kwargs={"num_hidden_layers": 6}),
        "decoder_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="gpt2",
            init_kwargs={"n_layer": 6, "n_embd": 768, "n_head": 12, "add_cross_attention": True},
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    decoder_config: dict | PreTrainedConfig | None = None
    vision_model_name_or_path: str | None = RAD_DINO
    text_model_name_or_path: str | None = CXR_BERT
    freeze_vision_model: bool = True
    hidden_size: int = 768
    num_latents: int = 128
    perceiver_depth: int = 3
    perceiver_num_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_ff_mult: int = 4
    temporal_fusion_layers: int = 3
    temporal_fusion_heads: int = 8
    view_positions: list[str] | None = None
    layerwise_fusion_reduction: int = 4
    contrastive_temperature: float | int = 0.07
    dropout: float | int = 0.0
    vocab_size: int = 764
    max_position_embeddings: int = 128
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 1
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.view_positions is None:
            self.view_positions = list(DEFAULT_VIEW_POSITIONS)
        super().__post_init__(**kwargs)
        self.decoder_config.is_decoder = True
        self.decoder_config.add_cross_attention = True
        self.decoder_config.vocab_size = self.vocab_size
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            setattr(self.decoder_config, name, getattr(self, name))
        positions_name = "n_positions" if hasattr(self.decoder_config, "n_positions") else "max_position_embeddings"
        setattr(self.decoder_config, positions_name, self.max_position_embeddings)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """
        The report decoder's configuration, which generation reads (its cache has one layer per decoder layer), or
        with `encoder=True` alone the context and report text encoder's. `text_config` here is that encoder, not the
        decoder that the name means in `PreTrainedConfig.get_text_config`'s search.
        """
        if encoder and not decoder:
            return self.text_config
        return self.decoder_config

    def validate_architecture(self):
        """Part of `validate()`: sizes that the modules cannot be built with."""
        super().validate_architecture()
        for name in ("hidden_size", "num_latents", "perceiver_depth", "perceiver_num_heads", "perceiver_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.temporal_fusion_layers < 0:
            raise ValueError(f"`temporal_fusion_layers` must be non-negative, got {self.temporal_fusion_layers}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if not self.contrastive_temperature > 0:
            raise ValueError(f"`contrastive_temperature` must be positive, got {self.contrastive_temperature}.")
        views = [view.strip().upper() for view in self.view_positions]
        if len(set(views)) != len(views):
            raise ValueError(f"`view_positions` repeats a view: {self.view_positions}.")
        if not getattr(self.vision_config, "hidden_size", None):
            raise ValueError("`vision_config` must describe a vision model with a `hidden_size`.")
        if not getattr(self.text_config, "hidden_size", None):
            raise ValueError("`text_config` must describe a text encoder with a `hidden_size`.")


PriorRGConfig.register_for_auto_class()

__all__ = ["CXR_BERT", "PRIORRG_SIZES", "PRIORRG_STAGES", "RAD_DINO", "PriorRGConfig"]
