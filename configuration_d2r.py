"""D2R-Net model configuration.

D2R-Net (Tang et al., "From Detection to Radiology Report Generation: Fine-Grained Multi-Modal Alignment with
Semi-Supervised Learning", J Imaging Inform Med 2025) writes a report from a chest X-ray and the lesion boxes a
semi-supervised detector found on it: a global branch (ResNet-101, channel-prior convolutional attention), a lesion
branch (one feature per box, enhanced by LERA), global and local image-text alignment (GAB, LAB) against a BERT
encoder, and R2Gen's memory-driven transformer as the report decoder.

The layout follows [`CdanConfig`] (flat fields, same names for the shared parts: visual extractor, views, widths,
special tokens), so D2R-Net shares the CDAN processor, data, trainer and evaluation.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

try:
    from .configuration_cdan import LESION_FEATURE_MODES
except ImportError:
    from configuration_cdan import LESION_FEATURE_MODES


D2R_SIZES = {
    "published": {},
    "demo": {
        "alignment_text_layers": 2,
        "embed_size": 256,
        "d_model": 256,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "relational_memory_heads": 4,
        "dropout": 0.1,
        "attention_dropout": 0.1,
    },
}
"""
Named sizes. `published` is the paper's: ResNet-101, 1024-d visual and lesion embeddings, R2Gen's 3-layer
encoder and decoder of width 512 (feed-forward 512, 8 heads) with 3 memory slots. `demo` is a CPU size for the
offline demo set (width 256, the first 2 layers of the text encoder; `train.py --preset d2r_demo` pairs it with
timm's ResNet-10-T trained from scratch).
"""


@strict
class D2RNetConfig(PreTrainedConfig):
    r"""
    Configuration of a [`D2RNetForConditionalGeneration`] model. The defaults give the paper's model.

    Args:
        vocab_size (`int`, *optional*, defaults to 764):
            Size of the word-level report vocabulary (the CDAN processor's tokenizer).
        visual_extractor (`str`, *optional*, defaults to `"resnet101"`):
            Any `timm` CNN; its last feature map feeds the global and the lesion branch.
        visual_extractor_weights (`str`, *optional*):
            Local ImageNet weights file for the CNN (see [`CdanVisualExtractor.load_pretrained_weights`]).
        visual_extractor_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`.
        visual_extractor_channels_last (`bool`, *optional*, defaults to `True`):
            Run the CNN in channels-last memory format.
        prepacked_cpu_linear (`bool`, *optional*, defaults to `True`):
            Prepacked oneDNN weights for CPU float32 inference in the shared linear layers (see `CdanLinear`).
        num_views (`int`, *optional*, defaults to 2):
            Views per study; their patch and lesion features are stacked along the token axis, as in R2Gen.
        embed_size (`int`, *optional*, defaults to 1024):
            Width of the global patch features (after CPCA and a 1x1 convolution), of the lesion features and of the
            joint image-text space of the alignment blocks.
        cpca_reduction (`int`, *optional*, defaults to 4):
            Channel reduction of the channel-prior convolutional attention's channel MLP.
        max_lesion_boxes (`int`, *optional*, defaults to 10):
            Boxes per view (K); the processor pads or truncates to it.
        use_lesion_branch (`bool`, *optional*, defaults to `True`):
            Append one token per box to the encoder input. Off: the global branch alone (an ablation).
        lesion_feature_mode (`str`, *optional*, defaults to `"roi_align"`):
            `"roi_align"` pools each box from the CNN's feature map; `"crop"` crops the box from the processed image
            and encodes it with the paper's small CNN (see `LESION_FEATURE_MODES`).
        lesion_roi_size (`int`, *optional*, defaults to 7):
            RoIAlign output size on the feature map.
        lesion_crop_size (`int`, *optional*, defaults to 64):
            Crop size in pixels in `"crop"` mode.
        use_alignment (`bool`, *optional*, defaults to `True`):
            Build the text encoder and the alignment blocks (GAB, LAB). Their losses are computed when the alignment
            text inputs are given (training), and LAB's scores ground generated sentences on the boxes.
        alignment_text_config (`dict`, *optional*):
            Configuration dict (with `model_type`) of the BERT-family text encoder; defaults to a BERT-base-sized
            BERT. Its weights come from [`D2RNetForConditionalGeneration.load_alignment_text_model`].
        alignment_text_layers (`int`, *optional*):
            Keep only the first this many layers of the text encoder (its embeddings and those layers load from the
            pre-trained model); all of them when `None`.
        freeze_alignment_text_model (`bool`, *optional*, defaults to `True`):
            Keep the text encoder's weights fixed (its projection to `embed_size` always trains).
        alignment_margin (`float`, *optional*, defaults to 0.2):
            Margin of the hinge triplet loss of GAB and LAB.
        alignment_smoothing (`float`, *optional*, defaults to 9.0):
            Inverse temperature of the word-to-region attention of the alignment similarity.
        d_model (`int`, *optional*, defaults to 512):
            Width of the encoder and decoder.
        encoder_layers, decoder_layers (`int`, *optional*, defaults to 3):
            Layers of the transformer encoder and of the memory-driven decoder.
        encoder_attention_heads, decoder_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads.
        encoder_ffn_dim, decoder_ffn_dim (`int`, *optional*, defaults to 512):
            Feed-forward widths (R2Gen's `d_ff`).
        relational_memory_slots (`int`, *optional*, defaults to 3):
            Slots of the relational memory (R2Gen's `rm_num_slots`).
        relational_memory_heads (`int`, *optional*, defaults to 8):
            Heads of the relational memory's attention.
        activation_function (`str`, *optional*, defaults to `"relu"`):
            Feed-forward activation.
        dropout, attention_dropout, activation_dropout (`float`, *optional*, defaults to 0.1, 0.1, 0.0):
            Dropout rates.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Longest report (tokens) the decoder reads; positions are sinusoidal, as in R2Gen.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
    """

    model_type = "d2r_net"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "decoder_attention_heads",
        "num_hidden_layers": "decoder_layers",
    }

    vocab_size: int = 764
    visual_extractor: str = "resnet101"
    visual_extractor_weights: str | None = None
    visual_extractor_kwargs: dict | None = None
    visual_extractor_channels_last: bool = True
    prepacked_cpu_linear: bool = True
    num_views: int = 2
    embed_size: int = 1024
    cpca_reduction: int = 4
    max_lesion_boxes: int = 10
    use_lesion_branch: bool = True
    lesion_feature_mode: str = "roi_align"
    lesion_roi_size: int = 7
    lesion_crop_size: int = 64
    use_alignment: bool = True
    alignment_text_config: dict | None = None
    alignment_text_layers: int | None = None
    freeze_alignment_text_model: bool = True
    alignment_margin: float | int = 0.2
    alignment_smoothing: float | int = 9.0
    d_model: int = 512
    encoder_layers: int = 3
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 512
    decoder_layers: int = 3
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 512
    relational_memory_slots: int = 3
    relational_memory_heads: int = 8
    activation_function: str = "relu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    max_position_embeddings: int = 512
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 1
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.use_alignment and self.alignment_text_config is None:
            self.alignment_text_config = {"model_type": "bert"}
        if self.use_alignment and self.alignment_text_layers is not None:
            self.alignment_text_config = {
                **self.alignment_text_config,
                "num_hidden_layers": self.alignment_text_layers,
            }
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check that the sizes fit together, with messages that name the offending fields."""
        super().validate_architecture()
        for width_name, heads_name in (
            ("d_model", "encoder_attention_heads"),
            ("d_model", "decoder_attention_heads"),
            ("d_model", "relational_memory_heads"),
        ):
            width, heads = getattr(self, width_name), getattr(self, heads_name)
            if heads < 1 or width % heads != 0:
                raise ValueError(f"`{width_name}` ({width}) must be divisible by `{heads_name}` ({heads}).")
        if self.lesion_feature_mode not in LESION_FEATURE_MODES:
            raise ValueError(
                f"`lesion_feature_mode` must be one of {list(LESION_FEATURE_MODES)}, got {self.lesion_feature_mode!r}."
            )
        for name in ("num_views", "max_lesion_boxes", "relational_memory_slots", "embed_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.use_alignment and (
            not isinstance(self.alignment_text_config, dict) or "model_type" not in self.alignment_text_config
        ):
            raise ValueError(
                "`alignment_text_config` must be a configuration dict with a `model_type` (e.g. "
                "`BertConfig(...).to_dict()`)."
            )


D2RNetConfig.register_for_auto_class()

__all__ = ["D2R_SIZES", "D2RNetConfig"]
