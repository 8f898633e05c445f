"""CDAN model configuration.

CDAN (Cross-modal Discrepancy Attention Network; Chen, Huang & Tan, J. Guangdong Univ. Tech. 42(1):70-78, 2025)
generates a chest X-ray findings report from one or more views of a study. The configuration follows the layout of
`transformers`' encoder-decoder configurations (BART, VisionEncoderDecoder): the visual extractor, the reverse-attention
module, the CDAN encoder and the report decoder are described by flat fields, and generation defaults (beam size,
maximum length) live in `generation_config.json`, not here.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""The 14 CheXpert observations classified by the reverse-attention module (Irvin et al., AAAI 2019)."""

ABLATIONS = {
    "BASE": {"use_reverse_attention": False, "use_semantic_consistency": False},
    "+RA": {"use_reverse_attention": True, "use_semantic_consistency": False},
    "+SC": {"use_reverse_attention": False, "use_semantic_consistency": True},
    "+RA+SC": {"use_reverse_attention": True, "use_semantic_consistency": True},
}
"""The rows of the paper's ablation table (Table 2), as configuration switches."""

MLC_LOSSES = ("bce", "weighted_bce", "asymmetric")
"""The choices of `CdanConfig.mlc_loss`, the multi-label classification loss L_mlc (Eq. 15)."""

LESION_FEATURE_MODES = ("roi_align", "crop")
"""How a lesion branch (D2R-Net, or CDAN's `use_lesion_branch`) reads a box: RoIAlign on the CNN's feature map, or
D2R-Net's crop of the image region, encoded by its own small CNN."""

DIAGNOSIS_STATES = ("negative", "positive", "uncertain")
"""The per-observation states of the diagnosis prompt (`CdanConfig.use_diagnosis_prompt`), by index. NEGATIVE and
NOT_MENTIONED labels are both "negative": the classifier cannot tell them apart."""

MODEL_SIZES = {
    "default": {},
    "paper-82m": {"encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
}
"""
Named model sizes. The paper gives 82.25 M parameters but not every width; the default (standard 2048-wide feed-forward
blocks) has 69.84 M. `paper-82m` doubles the six feed-forward widths, which gives 82.43 M, within 0.2 % of the paper's
count (`python scripts/count_parameters.py --model_size paper-82m`).
"""


@strict
class CdanConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CdanForConditionalGeneration`] model. The defaults give the paper's model: a ResNet-101
    visual extractor at 224 px over two views, the reverse-attention module with top-3 disease words, a 3-layer
    encoder and a 3-layer decoder of width 512 with 8 heads, and the ClinicalBERT-sized (768) semantic-consistency
    projection.

    Args:
        vocab_size (`int`, *optional*, defaults to 764):
            Size of the word-level report vocabulary (special tokens included). 764 is the R2Gen IU X-Ray
            vocabulary: 759 words, `<unk>`, `<pad>`, `<bos>` and `<eos>`.
        visual_extractor (`str`, *optional*, defaults to `"resnet101"`):
            Name of any `timm` CNN. Patch features are taken from its last feature map.
        visual_extractor_weights (`str`, *optional*):
            Local file (`.safetensors`, `.pth`, `.bin`) with ImageNet weights for the visual extractor, used by
            [`CdanForConditionalGeneration.from_backbone_pretrained`] instead of downloading them from the Hub.
        visual_extractor_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (for example `{"drop_path_rate": 0.1}`).
        visual_extractor_channels_last (`bool`, *optional*, defaults to `True`):
            Feed the CNN channels-last images, so its convolutions run in channels-last memory format, which oneDNN
            (CPU) and cuDNN (GPU, mixed precision) compute faster. Results agree with the default format up to
            floating-point rounding.
        prepacked_cpu_linear (`bool`, *optional*, defaults to `True`):
            For CPU float32 inference, multiply with linear weights that oneDNN has prepacked once (see
            `CdanLinear`), faster than `F.linear` in the decoding steps. Results agree up to floating-point
            rounding; training and GPUs are unaffected.
        num_views (`int`, *optional*, defaults to 2):
            Views per study: 2 for IU X-Ray (frontal and lateral), 1 for MIMIC-CXR. Patch features of all views
            are stacked along the token axis, as in R2Gen.
        use_reverse_attention (`bool`, *optional*, defaults to `True`):
            Use the reverse-attention module (Eq. 5-14, 16). Without it the patch features go straight to the encoder
            and there is no disease classifier (the paper's BASE and +SC rows).
        reverse_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the positive, negative and discrepancy attentions.
        renormalize_negative_attention (`bool`, *optional*, defaults to `True`):
            The negative weights `1 - softmax(QK^T/sqrt(d))` sum to `N - 1` over the `N` keys. When `True` they are
            divided by `N - 1` so each row is a distribution and `u_n` stays on the scale of `u_p`; when `False`
            they are used as the paper writes them.
        num_observations (`int`, *optional*, defaults to 14):
            Number of disease observations classified from `u_pn` (the 14 CheXpert observations).
        disease_top_k (`int`, *optional*, defaults to 3):
            How many of the most probable observations are embedded as disease words `u_k`.
        use_semantic_consistency (`bool`, *optional*, defaults to `True`):
            Add the training-only projection of pooled `u_s` onto the text encoder's embedding space (the paper's
            semantic-consistency term). It never runs during generation.
        semantic_dim (`int`, *optional*, defaults to 768):
            Width of the frozen text encoder's embedding: 768 for ClinicalBERT, 384 for all-MiniLM-L6-v2.
        d_model (`int`, *optional*, defaults to 512):
            Width of the encoder and decoder layers.
        encoder_layers (`int`, *optional*, defaults to 3):
            Number of CDAN encoder layers.
        encoder_attention_heads (`int`, *optional*, defaults to 8):
            Heads in each encoder self-attention.
        encoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Inner width of each encoder feed-forward block.
        decoder_layers (`int`, *optional*, defaults to 3):
            Number of report decoder layers.
        decoder_attention_heads (`int`, *optional*, defaults to 8):
            Heads in each decoder self- and cross-attention.
        decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Inner width of each decoder feed-forward block.
        activation_function (`str`, *optional*, defaults to `"relu"`):
            Feed-forward activation.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and residual branches.
        attention_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on attention weights.
        activation_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after the feed-forward activation.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Longest report (in tokens) the decoder's learned positions cover.
        scale_embedding (`bool`, *optional*, defaults to `True`):
            Multiply word embeddings by `sqrt(d_model)`.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of linear and embedding weights.
        observation_names (`list[str]`, *optional*):
            Names of the classified observations, in logit order: the training collator takes the disease labels of
            these observations, in this order, from each study's 14 CheXpert states. Defaults to the first
            `num_observations` CheXpert observations.
        mlc_loss (`str`, *optional*, defaults to `"bce"`):
            The multi-label classification loss L_mlc (Eq. 15), averaged over the observations of each study:
            - `"bce"`: binary cross-entropy with logits, as in the paper.
            - `"weighted_bce"`: binary cross-entropy whose positive terms are multiplied by `mlc_positive_weights`,
              so rare findings weigh as much as common ones.
            - `"asymmetric"`: the asymmetric loss of Ridnik et al. (ICCV 2021), which focuses away from easy
              negatives (`mlc_asymmetric_gamma_negative`, `mlc_asymmetric_clip`).
        mlc_positive_weights (`list[float]`, *optional*):
            One positive weight per observation, in `observation_names` order, for `mlc_loss="weighted_bce"`. When
            `None`, `CdanTrainer` sets it from its training labels to `negatives / positives` per observation,
            clipped to [1 / `mlc_max_positive_weight`, `mlc_max_positive_weight`]; it is saved with the checkpoint.
        mlc_max_positive_weight (`float`, *optional*, defaults to 50.0):
            Largest positive weight computed from the training labels (its inverse is the smallest), so an
            observation with very few (or no) positives does not dominate L_mlc.
        mlc_asymmetric_gamma_positive (`float`, *optional*, defaults to 0.0):
            Focusing exponent of the positive terms of the asymmetric loss (`gamma+`; 0 keeps plain cross-entropy).
        mlc_asymmetric_gamma_negative (`float`, *optional*, defaults to 4.0):
            Focusing exponent of the negative terms of the asymmetric loss (`gamma-`).
        mlc_asymmetric_clip (`float`, *optional*, defaults to 0.05):
            Probability margin `m` of the asymmetric loss: negatives use the shifted probability `max(p - m, 0)`, so
            negatives predicted below `m` add no loss.
        observation_thresholds (`list[float]`, *optional*):
            One decision threshold per observation, in `observation_names` order, on the logit scale: an observation
            is reported positive when its logit exceeds its threshold. `train.py` calibrates them on the validation
            split (the F1-optimal threshold of each observation) and saves them with the checkpoint. `None` means
            0.0 for all (probability 0.5).
        use_diagnosis_prompt (`bool`, *optional*, defaults to `False`):
            Diagnosis-guided decoding (in the spirit of PromptMRG, Jin et al., AAAI 2024): the classifier's decision
            on each observation (negative, positive or uncertain, see `DIAGNOSIS_STATES`), taken at
            `observation_thresholds`, becomes one learned prompt vector per observation that the decoder reads
            before the first report token (and keeps in its cache). Needs `use_reverse_attention`. Off in the paper.
        diagnosis_prompt_prediction_rate (`float`, *optional*, defaults to 0.5):
            In training, the probability that an observation's prompt state is the model's own prediction rather
            than the reference label, so the decoder learns to read the classifier's (imperfect) decisions it gets
            at inference. 0 trains on reference labels only, 1 on predictions only.
        diagnosis_prompt_memory_dropout (`float`, *optional*, defaults to 0.5):
            In training, the probability that a study's decoder reads its diagnosis prompt without the image memory
            (the encoder output it cross-attends to is zeroed for that study). Otherwise the decoder recognises each
            training study from its image features, recites its report and learns to ignore the prompt; with it,
            the decoder must write what the prompt says. Generation always reads both.
        observation_sentences (`dict[str, str]`, *optional*):
            When set, generated reports are edited to agree with the classifier's decisions (`consistency_cdan`):
            sentences asserting an observation it calls negative are removed, and for each observation it calls
            positive that the report does not assert, this sentence (the observation's most frequent single-finding
            training sentence) is appended. `train.py --observation_sentences True` sets it. Off in the paper.
        diagnosis_uncertainty_margin (`float`, *optional*, defaults to 0.0):
            Logits within this margin of an observation's threshold give the "uncertain" prompt state; 0 gives only
            negative and positive decisions (the reference labels still carry UNCERTAIN in training).
        use_clinical_context (`bool`, *optional*, defaults to `False`):
            PriorRG's context branch (not in the CDAN paper): the indication and history, read by a BERT-family text
            encoder (`context_text_config`), are resampled by a Perceiver into `context_num_latents` latents that
            join `u_s` before the encoder: `u_s = [u_p; u_n; u_k; ctx]`. Needs the processor's context tokenizer.
        context_text_config (`dict`, *optional*):
            The text encoder's configuration (an `AutoConfig` dict with `model_type`); a 6-layer BERT (CXR-BERT cut
            to 6 layers, as PriorRG) when `None`. `from_backbone_pretrained(context_text_model_name_or_path=...)`
            loads pre-trained weights.
        context_num_latents (`int`, *optional*, defaults to 32):
            Perceiver latents of the context.
        context_perceiver_depth (`int`, *optional*, defaults to 3):
            Perceiver layers (8 heads of 64, GEGLU feed-forward, as PriorRG).
        use_prior_study (`bool`, *optional*, defaults to `False`):
            PriorRG's temporal fusion (not in the CDAN paper): the prior study's patch features (same extractor and
            projection, plus a learned "prior" embedding) are read by the current ones through
            `temporal_fusion_layers` cross-attention blocks before the reverse attention; studies without a prior
            keep `u` unchanged.
        temporal_fusion_layers (`int`, *optional*, defaults to 3):
            Blocks of the temporal fusion.
        use_lesion_branch (`bool`, *optional*, defaults to `False`):
            D2R-Net's lesion branch (not in the CDAN paper): one token per detector box, pooled from the extractor's
            feature map (or cropped from the image, `lesion_feature_mode`) and enhanced by LERA, joins `u_s` after
            the other streams: `u_s = [u_p; u_n; u_k; (ctx;) lesions]`. Padded boxes are masked out of the encoder
            and the decoder. Needs `lesion_boxes` from `CdanProcessor(boxes=...)`.
        max_lesion_boxes (`int`, *optional*, defaults to 10):
            Boxes per view (K) the lesion branch reads.
        lesion_feature_mode (`str`, *optional*, defaults to `"roi_align"`):
            `"roi_align"` (RoIAlign on the extractor's feature map) or `"crop"` (D2R-Net's crop of the image, encoded
            by its small CNN).
        lesion_roi_size (`int`, *optional*, defaults to 7):
            RoIAlign output size.
        lesion_crop_size (`int`, *optional*, defaults to 64):
            Crop size in pixels in `"crop"` mode.
        use_lesion_alignment (`bool`, *optional*, defaults to `False`):
            D2R-Net's alignment blocks (needs `use_lesion_branch`): a BERT-family text encoder
            (`alignment_text_config`) whose token states are matched with `u` (GAB, the report) and with the lesion
            tokens (LAB, each sentence); `CdanTrainer` adds both losses, and the pipeline grounds sentences on boxes.
        alignment_text_config (`dict`, *optional*):
            The alignment text encoder's configuration (`AutoConfig` dict with `model_type`); a BERT-base-sized BERT
            when `None`.
        freeze_alignment_text_model (`bool`, *optional*, defaults to `True`):
            Keep the alignment text encoder fixed (its projection trains).
        alignment_margin (`float`, *optional*, defaults to 0.2):
            Margin of the alignment triplet losses.
        alignment_smoothing (`float`, *optional*, defaults to 9.0):
            Inverse temperature of the alignment's word-to-region attention.

    Example:

    ```python
    >>> from configuration_cdan import CdanConfig
    >>> from modeling_cdan import CdanForConditionalGeneration

    >>> config = CdanConfig()  # the paper's model: ResNet-101, RA + SC
    >>> base = CdanConfig.from_ablation("BASE", visual_extractor="resnet18")
    >>> model = CdanForConditionalGeneration(base)
    ```
    """

    model_type = "cdan"
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
    use_reverse_attention: bool = True
    reverse_attention_heads: int = 8
    renormalize_negative_attention: bool = True
    num_observations: int = 14
    disease_top_k: int = 3
    use_semantic_consistency: bool = True
    semantic_dim: int = 768
    d_model: int = 512
    encoder_layers: int = 3
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_layers: int = 3
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    max_position_embeddings: int = 512
    scale_embedding: bool = True
    init_std: float = 0.02
    observation_names: list[str] | None = None
    mlc_loss: str = "bce"
    mlc_positive_weights: list[float] | None = None
    mlc_max_positive_weight: float | int = 50.0
    mlc_asymmetric_gamma_positive: float | int = 0.0
    mlc_asymmetric_gamma_negative: float | int = 4.0
    mlc_asymmetric_clip: float | int = 0.05
    observation_thresholds: list[float] | None = None
    use_diagnosis_prompt: bool = False
    diagnosis_prompt_prediction_rate: float | int = 0.5
    diagnosis_prompt_memory_dropout: float | int = 0.5
    diagnosis_uncertainty_margin: float | int = 0.0
    observation_sentences: dict[str, str] | None = None
    use_clinical_context: bool = False
    context_text_config: dict | None = None
    context_num_latents: int = 32
    context_perceiver_depth: int = 3
    use_prior_study: bool = False
    temporal_fusion_layers: int = 3
    use_lesion_branch: bool = False
    max_lesion_boxes: int = 10
    lesion_feature_mode: str = "roi_align"
    lesion_roi_size: int = 7
    lesion_crop_size: int = 64
    use_lesion_alignment: bool = False
    alignment_text_config: dict | None = None
    freeze_alignment_text_model: bool = True
    alignment_margin: float | int = 0.2
    alignment_smoothing: float | int = 9.0
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 1
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.observation_names is None:
            self.observation_names = list(CHEXPERT_OBSERVATIONS[: self.num_observations])
        if self.use_clinical_context and self.context_text_config is None:
            self.context_text_config = {"model_type": "bert", "num_hidden_layers": 6}
        if self.use_lesion_alignment and self.alignment_text_config is None:
            self.alignment_text_config = {"model_type": "bert"}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check that the sizes fit together, with messages that name the offending fields."""
        super().validate_architecture()
        for width_name, heads_name in (
            ("d_model", "encoder_attention_heads"),
            ("d_model", "decoder_attention_heads"),
            ("d_model", "reverse_attention_heads"),
        ):
            width, heads = getattr(self, width_name), getattr(self, heads_name)
            if heads < 1 or width % heads != 0:
                raise ValueError(f"`{width_name}` ({width}) must be divisible by `{heads_name}` ({heads}).")
        if self.num_views < 1:
            raise ValueError(f"`num_views` must be at least 1, got {self.num_views}.")
        if not 1 <= self.disease_top_k <= self.num_observations:
            raise ValueError(
                f"`disease_top_k` ({self.disease_top_k}) must lie in [1, num_observations={self.num_observations}]."
            )
        if len(self.observation_names) != self.num_observations:
            raise ValueError(
                f"`observation_names` has {len(self.observation_names)} names but `num_observations` is "
                f"{self.num_observations}."
            )
        self.validate_mlc_loss()
        self.validate_observation_thresholds()
        self.validate_diagnosis_prompt()
        self.validate_prior_context()
        self.validate_lesion_branch()

    def validate_lesion_branch(self):
        """Check D2R-Net's switches: the box count, the feature mode, and alignment only with the lesion branch."""
        if self.lesion_feature_mode not in LESION_FEATURE_MODES:
            raise ValueError(
                f"`lesion_feature_mode` must be one of {list(LESION_FEATURE_MODES)}, got {self.lesion_feature_mode!r}."
            )
        if self.max_lesion_boxes < 1:
            raise ValueError(f"`max_lesion_boxes` must be at least 1, got {self.max_lesion_boxes}.")
        if self.use_lesion_alignment:
            if not self.use_lesion_branch:
                raise ValueError(
                    "`use_lesion_alignment` matches sentences with lesion tokens: set `use_lesion_branch`."
                )
            if not isinstance(self.alignment_text_config, dict) or "model_type" not in self.alignment_text_config:
                raise ValueError(
                    "`alignment_text_config` must be a configuration dict with a `model_type` (e.g. "
                    "`BertConfig(...).to_dict()`)."
                )

    def validate_prior_context(self):
        """Check the PriorRG switches: the sizes of the context Perceiver and of the temporal fusion."""
        if self.use_clinical_context:
            if self.context_num_latents < 1 or self.context_perceiver_depth < 1:
                raise ValueError(
                    "`context_num_latents` and `context_perceiver_depth` must be at least 1 with "
                    f"`use_clinical_context`; got {self.context_num_latents} and {self.context_perceiver_depth}."
                )
            if not isinstance(self.context_text_config, dict) or "model_type" not in self.context_text_config:
                raise ValueError(
                    "`context_text_config` must be a configuration dict with a `model_type` (e.g. "
                    "`BertConfig(...).to_dict()`)."
                )
        if self.use_prior_study and self.temporal_fusion_layers < 1:
            raise ValueError(f"`temporal_fusion_layers` must be at least 1, got {self.temporal_fusion_layers}.")

    def validate_diagnosis_prompt(self):
        """Check the diagnosis-prompt fields: the prompt reads the reverse-attention classifier."""
        if self.use_diagnosis_prompt and not self.use_reverse_attention:
            raise ValueError(
                "`use_diagnosis_prompt` reads the decisions of the reverse-attention classifier; set "
                "`use_reverse_attention=True` (ablation rows +RA or +RA+SC)."
            )
        for name in ("diagnosis_prompt_prediction_rate", "diagnosis_prompt_memory_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)}.")
        margin = self.diagnosis_uncertainty_margin
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"`diagnosis_uncertainty_margin` must be a non-negative number, got {margin}.")

    def validate_observation_thresholds(self):
        """Check that `observation_thresholds`, when set, has one finite logit threshold per observation."""
        if self.observation_thresholds is None:
            return
        if len(self.observation_thresholds) != self.num_observations:
            raise ValueError(
                f"`observation_thresholds` has {len(self.observation_thresholds)} thresholds but `num_observations` "
                f"is {self.num_observations}."
            )
        if not all(math.isfinite(threshold) for threshold in self.observation_thresholds):
            raise ValueError(f"`observation_thresholds` must be finite, got {self.observation_thresholds}.")

    def validate_mlc_loss(self):
        """Check the fields of the multi-label classification loss (L_mlc, Eq. 15)."""
        if self.mlc_loss not in MLC_LOSSES:
            raise ValueError(f"`mlc_loss` must be one of {list(MLC_LOSSES)}, got {self.mlc_loss!r}.")
        if self.mlc_positive_weights is not None:
            if len(self.mlc_positive_weights) != self.num_observations:
                raise ValueError(
                    f"`mlc_positive_weights` has {len(self.mlc_positive_weights)} weights but `num_observations` is "
                    f"{self.num_observations}."
                )
            if not all(math.isfinite(weight) and weight > 0 for weight in self.mlc_positive_weights):
                raise ValueError(
                    f"`mlc_positive_weights` must be finite and positive, got {self.mlc_positive_weights}."
                )
        if not (math.isfinite(self.mlc_max_positive_weight) and self.mlc_max_positive_weight >= 1):
            raise ValueError(f"`mlc_max_positive_weight` must be at least 1, got {self.mlc_max_positive_weight}.")
        for name in ("mlc_asymmetric_gamma_positive", "mlc_asymmetric_gamma_negative"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"`{name}` must be a non-negative number, got {getattr(self, name)}.")
        if not 0 <= self.mlc_asymmetric_clip < 1:
            raise ValueError(f"`mlc_asymmetric_clip` must lie in [0, 1), got {self.mlc_asymmetric_clip}.")

    @classmethod
    def from_ablation(cls, name: str, **kwargs) -> "CdanConfig":
        """
        Build the configuration of one row of the paper's ablation table.

        Args:
            name (`str`):
                One of `"BASE"`, `"+RA"`, `"+SC"`, `"+RA+SC"` (case-insensitive).
            kwargs:
                Any other configuration field; the two switches of the row take precedence.
        """
        switches = {key.upper(): value for key, value in ABLATIONS.items()}.get(name.upper())
        if switches is None:
            raise ValueError(f"Unknown ablation {name!r}; choose one of {list(ABLATIONS)}.")
        return cls(**{**kwargs, **switches})


CdanConfig.register_for_auto_class()

__all__ = [
    "ABLATIONS",
    "CHEXPERT_OBSERVATIONS",
    "DIAGNOSIS_STATES",
    "LESION_FEATURE_MODES",
    "MLC_LOSSES",
    "MODEL_SIZES",
    "CdanConfig",
]
