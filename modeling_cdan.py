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
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg


try:
    from .configuration_cdan import DIAGNOSIS_STATES, CdanConfig
    from .priorrg_modules import (
        ContextEncoder,
        PerceiverResampler,
        TemporalFusion,
        ViewTemporalEmbeddings,
        scatter_rows,
    )
except ImportError:
    from configuration_cdan import DIAGNOSIS_STATES, CdanConfig
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
    """

    disease_logits: torch.FloatTensor | None = None
    pooled_semantic_states: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None


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
    """

    disease_logits: torch.FloatTensor | None = None
    pooled_semantic_states: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None
    diagnosis_states: torch.LongTensor | None = None


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
    """

    disease_logits: torch.FloatTensor | None = None
    visual_semantics: torch.FloatTensor | None = None
    positive_attentions: torch.FloatTensor | None = None
    negative_attentions: torch.FloatTensor | None = None
    diagnosis_states: torch.LongTensor | None = None


def sinusoidal_positions(num_positions: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed sine/cosine position codes of Vaswani et al. (2017), shape `(num_positions, dim)`."""
    positions = torch.arange(num_positions, device=device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    frequencies = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(num_positions, dim, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(positions * frequencies)
    codes[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return codes.to(dtype)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: prepend the start token, drop the last label, and turn `-100` into padding."""
    decoder_input_ids = labels.new_zeros(labels.shape)
    decoder_input_ids[:, 1:] = labels[:, :-1].clone()
    decoder_input_ids[:, 0] = decoder_start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_token_id)


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


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch; inputs are `(B, H, T, D)`, the output is `(B, T, H, D)`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # QK^T / sqrt(d) of Eq. (8), (B, H, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return attn_output, attn_weights


class CdanVisualExtractor(nn.Module):
    """
    The visual extractor VE of Eq. (4): a `timm` CNN whose last feature map gives the patch features `u`.

    Each of the `num_views` views is encoded separately and their patches are stacked along the token axis, as R2Gen
    does, so a 224 px two-view study through ResNet-101 gives `2 x 7 x 7 = 98` tokens of width 2048.

    Args:
        config (`CdanConfig`):
            Reads `visual_extractor`, `visual_extractor_kwargs` and `visual_extractor_channels_last`.
    """

    def __init__(self, config: CdanConfig):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(
            config.visual_extractor,
            pretrained=False,
            num_classes=0,
            global_pool="",
            **(config.visual_extractor_kwargs or {}),
        )
        self.num_features = self.backbone.num_features
        self.channels_last = config.visual_extractor_channels_last
        # timm has initialised the backbone its own way (e.g. Kaiming for ResNets); keep that instead of the
        # generic normal(0, init_std) of `_init_weights`, which suits the transformer layers.
        for module in self.backbone.modules():
            module._is_hf_initialized = True

    def train(self, mode: bool = True) -> "CdanVisualExtractor":
        """A frozen extractor (no parameter requires grad) stays in eval mode, so its BatchNorm statistics stay fixed."""
        return super().train(mode and any(parameter.requires_grad for parameter in self.parameters()))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the CNN on a stack of single views: `(N, 3, H, W)` -> `(N, C, h, w)`."""
        if self.channels_last:  # convolutions follow their input's format; the weights may stay as they are
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, V, 3, H, W)` -> patch features `u` of shape `(B, V*h*w, C)`."""
        batch_size, num_views = pixel_values.shape[:2]
        feature_maps = self.forward_features(pixel_values.flatten(0, 1))  # (B*V, C, h, w)
        patches = feature_maps.flatten(2).transpose(1, 2)  # (B*V, h*w, C)
        return patches.reshape(batch_size, num_views * patches.shape[1], patches.shape[2])  # (B, V*h*w, C)

    def load_pretrained_weights(self, weights_path: str | os.PathLike | None = None) -> None:
        """
        Load ImageNet weights into the backbone, from a local file or, without one, from the Hugging Face Hub.

        Args:
            weights_path (`str` or `os.PathLike`, *optional*):
                A `.safetensors`, `.pth`, `.pt` or `.bin` state dict of the same `timm` architecture. Classifier
                weights in it are ignored.

        Raises:
            FileNotFoundError: `weights_path` does not exist.
            ValueError: the file does not match the architecture.
            OSError: no file was given and the Hub cannot be reached.
        """
        if weights_path is None:
            try:
                reference = timm.create_model(self.config.visual_extractor, pretrained=True, num_classes=0)
            except Exception as error:  # timm raises several network/Hub error types
                raise OSError(
                    f"Could not download ImageNet weights for the visual extractor {self.config.visual_extractor!r} "
                    f"from the Hugging Face Hub ({type(error).__name__}: {error}). If this machine is offline, pass "
                    "a local weights file: `--visual_extractor_weights /path/to/weights.safetensors` in train.py, "
                    "`CdanConfig(visual_extractor_weights=...)`, or `load_pretrained_weights(weights_path=...)`; or "
                    "train the extractor from scratch with `--visual_extractor_pretrained False`."
                ) from error
            state_dict = reference.state_dict()
        else:
            weights_path = os.fspath(weights_path)
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(f"Visual extractor weights file not found: {weights_path}")
            if weights_path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state_dict = load_file(weights_path)
            else:
                state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
                state_dict = state_dict.get("state_dict", state_dict)
        own_keys = set(self.backbone.state_dict())
        matched = {key: value for key, value in state_dict.items() if key in own_keys}
        missing = sorted(own_keys - set(matched))
        if missing:
            source = weights_path or "the Hub"
            raise ValueError(
                f"Weights from {source} do not fit visual extractor {self.config.visual_extractor!r}: "
                f"{len(missing)} tensors missing, e.g. {missing[:3]}."
            )
        self.backbone.load_state_dict(matched, strict=True)


class CdanLinear(nn.Linear):
    """
    `nn.Linear` with a faster path for CPU inference.

    Without autograd or autocast, on a float32 CPU weight, it multiplies with a copy of the weight that oneDNN has
    reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the prepacking that
    `torch.compile`'s CPU freezing pass applies), where `F.linear`'s BLAS call repacks the weight at every call. That
    repacking dominates when few rows meet a large weight, as in each decoding step (batch x beams rows): there the
    packed product is faster. Results agree with `F.linear` up to float32 rounding. Inputs of more than
    `max_packed_rows` rows take `F.linear`: the BLAS repacking is amortised there, and oneDNN's large products need
    more memory.

    The packed copy is built at the first such call, rebuilt when the weight is replaced or changed in place, dropped
    when the module moves, is copied or trains, and never saved: the state dict is that of `nn.Linear`. Everywhere
    else (training, GPUs, other dtypes, autocast, `torch.compile`, tracing) the layer is a plain `nn.Linear`.

    Args:
        in_features (`int`):
            Width of the input.
        out_features (`int`):
            Width of the output.
        bias (`bool`, *optional*, defaults to `True`):
            Whether to add a learned bias.
        prepack_on_cpu (`bool`, *optional*, defaults to `True`):
            Allow the packed CPU inference path (`CdanConfig.prepacked_cpu_linear`).
    """

    max_packed_rows = 256

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prepack_on_cpu: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.prepack_on_cpu = prepack_on_cpu
        self._drop_packed_weight()

    @classmethod
    def from_config(cls, config: CdanConfig, in_features: int, out_features: int, bias: bool = True) -> "CdanLinear":
        """The linear layer of a CDAN model: the configuration decides whether the packed CPU path is allowed."""
        return cls(in_features, out_features, bias=bias, prepack_on_cpu=config.prepacked_cpu_linear)

    def _drop_packed_weight(self) -> None:
        self._packed_weight: torch.Tensor | None = None
        self._packed_weight_key: tuple[int, int] | None = None  # the weight's address and version when packed
        self._packed_weight_storage: torch.UntypedStorage | None = None  # held, so the address cannot be reused

    def uses_packed_weight(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call takes the packed oneDNN path (see the class docstring)."""
        weight = self.weight
        return (
            self.prepack_on_cpu
            and not torch.is_grad_enabled()
            and weight.device.type == "cpu"
            and weight.dtype == hidden_states.dtype == torch.float32
            and hidden_states.shape[-1] == self.in_features
            and hidden_states.numel() <= self.max_packed_rows * self.in_features
            and not weight.is_inference()  # inference tensors keep no version counter to detect in-place changes
            and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
        )

    def packed_weight(self) -> torch.Tensor:
        """The oneDNN-packed weight, packed again if the weight changed since it was last packed."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        if key != self._packed_weight_key:
            self._packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._packed_weight_key, self._packed_weight_storage = key, weight.untyped_storage()
        return self._packed_weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.uses_packed_weight(hidden_states):
            return super().forward(hidden_states)
        try:
            return torch.ops.mkldnn._linear_pointwise(hidden_states, self.packed_weight(), self.bias, "none", [], "")
        except (AttributeError, NotImplementedError, RuntimeError) as error:  # a PyTorch build without these ops
            logger.warning_once(f"Prepacked CPU linear layers are unavailable ({error}); using `F.linear` instead.")
            self.prepack_on_cpu = False
            self._drop_packed_weight()
            return super().forward(hidden_states)

    def train(self, mode: bool = True) -> "CdanLinear":
        if mode:
            self._drop_packed_weight()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._drop_packed_weight()  # `.to()`, `.float()`, ... give the weight new storage
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, "_packed_weight": None, "_packed_weight_key": None, "_packed_weight_storage": None}


class CdanAttention(nn.Module):
    """
    Multi-head softmax attention, `Attention(Q, K, V) = softmax(QK^T / sqrt(d)) V`.

    It is the paper's PositiveAttention when used in the reverse-attention module, and the self- and cross-attention
    of the encoder and decoder layers, where it reads and writes an `EncoderDecoderCache` through `layer_idx`.

    Args:
        config (`CdanConfig`):
            Selects the attention kernel (`config._attn_implementation`).
        embed_dim (`int`):
            Width of queries, keys and values.
        num_heads (`int`):
            Number of heads.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention weights while training.
        is_causal (`bool`, *optional*, defaults to `False`):
            Whether this is the decoder's masked self-attention.
        layer_idx (`int`, *optional*):
            Index of the decoder layer, to address the cache.
    """

    def __init__(
        self,
        config: CdanConfig,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        is_causal: bool = False,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.q_proj = CdanLinear.from_config(config, embed_dim, embed_dim)  # W_q of Eq. (5)
        self.k_proj = CdanLinear.from_config(config, embed_dim, embed_dim)  # W_k of Eq. (6)
        self.v_proj = CdanLinear.from_config(config, embed_dim, embed_dim)  # W_v of Eq. (7)
        self.out_proj = CdanLinear.from_config(config, embed_dim, embed_dim)

    def project_query_key_value(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to heads, `(B, T, C)` -> `(B, H, T, D)`, reusing or extending the cache when one is given."""
        is_cross_attention = key_value_states is not None
        query_states = self.q_proj(hidden_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        layer_cache, cross_is_cached = cache, False
        if isinstance(cache, EncoderDecoderCache):
            cross_is_cached = is_cross_attention and cache.is_updated.get(self.layer_idx, False)
            layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        if cross_is_cached:  # the encoder memory does not change during generation: reuse its keys and values
            key_states = layer_cache.layers[self.layer_idx].keys
            value_states = layer_cache.layers[self.layer_idx].values
            return query_states, key_states, value_states

        source_states = key_value_states if is_cross_attention else hidden_states
        key_states = self.k_proj(source_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        value_states = self.v_proj(source_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if layer_cache is not None:
            key_states, value_states = layer_cache.update(key_states, value_states, self.layer_idx)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return query_states, key_states, value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries from `hidden_states` `(B, T, C)`; keys and values from `key_value_states` `(B, S, C)` if given."""
        query_states, key_states, value_states = self.project_query_key_value(hidden_states, key_value_states, cache)
        # `//` and `%` rather than `divmod`, which symbolic sizes (torch.export, ONNX export) do not support
        queries_per_memory = query_states.shape[0] // key_states.shape[0]
        unmatched = query_states.shape[0] % key_states.shape[0]
        if unmatched or (queries_per_memory > 1 and attention_mask is not None):
            raise ValueError(
                f"Cannot attend {query_states.shape[0]} query sequences to {key_states.shape[0]} memories: the number "
                "of queries must be a multiple of the number of memories, with no attention mask."
            )
        if queries_per_memory > 1:  # the beams of one study share its memory: one attention call per study
            query_states = query_states.unflatten(0, (-1, queries_per_memory)).transpose(1, 2).flatten(2, 3)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, H, D), or (B_memory, k*T, H, D) for grouped queries
        if queries_per_memory > 1:
            attn_output = attn_output.unflatten(1, (queries_per_memory, -1)).flatten(0, 1)  # (B, T, H, D)
            if attn_weights is not None:
                attn_weights = attn_weights.unflatten(2, (queries_per_memory, -1)).transpose(1, 2).flatten(0, 1)
        attn_output = self.out_proj(attn_output.flatten(2))  # (B, T, C)
        return attn_output, attn_weights


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


class CdanFeedForward(nn.Module):
    """Position-wise feed-forward block `W_2 act(W_1 x)`."""

    def __init__(self, config: CdanConfig, ffn_dim: int):
        super().__init__()
        self.fc1 = CdanLinear.from_config(config, config.d_model, ffn_dim)
        self.fc2 = CdanLinear.from_config(config, ffn_dim, config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return self.fc2(hidden_states)


class CdanEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer encoder layer over `u_s`."""

    def __init__(self, config: CdanConfig, layer_idx: int | None = None):
        super().__init__()
        self.self_attn = CdanAttention(
            config, config.d_model, config.encoder_attention_heads, config.attention_dropout, layer_idx=layer_idx
        )
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.feed_forward = CdanFeedForward(config, config.encoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.self_attn_layer_norm(hidden_states))
        hidden_states = hidden_states + nn.functional.dropout(attn_output, p=self.dropout, training=self.training)
        ffn_output = self.feed_forward(self.final_layer_norm(hidden_states))
        return hidden_states + nn.functional.dropout(ffn_output, p=self.dropout, training=self.training)


class CdanDecoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer decoder layer: masked self-attention, cross-attention to `u_s`, feed-forward."""

    def __init__(self, config: CdanConfig, layer_idx: int | None = None):
        super().__init__()
        width, heads, dropout = config.d_model, config.decoder_attention_heads, config.attention_dropout
        self.self_attn = CdanAttention(config, width, heads, dropout, is_causal=True, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.encoder_attn = CdanAttention(config, width, heads, dropout, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(width)
        self.feed_forward = CdanFeedForward(config, config.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(width)
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = True,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Returns the new hidden states `(B, T, C)`, and with `output_attentions=True` also the cross-attention weights
        over `encoder_hidden_states`, `(B, H, T, S)`.
        """
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), cache=cache, attention_mask=attention_mask
        )
        hidden_states = hidden_states + nn.functional.dropout(attn_output, p=self.dropout, training=self.training)
        cross_output, cross_weights = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + nn.functional.dropout(cross_output, p=self.dropout, training=self.training)
        ffn_output = self.feed_forward(self.final_layer_norm(hidden_states))
        hidden_states = hidden_states + nn.functional.dropout(ffn_output, p=self.dropout, training=self.training)
        if output_attentions:
            return hidden_states, cross_weights
        return hidden_states


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
        self.post_init()

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
        """Raise a clear `ValueError` for inputs the extractor cannot take, instead of a shape error deep in torch."""
        if pixel_values is None:
            raise ValueError(f"`{name}` is required: pass the processed images of a study.")
        if pixel_values.ndim == 4 and self.config.num_views == 1:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            raise ValueError(
                f"`{name}` must have shape (batch, views, 3, height, width); got "
                f"{tuple(pixel_values.shape)}. Use CdanImageProcessor to prepare images."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch.")
        if pixel_values.shape[1] != self.config.num_views:
            raise ValueError(
                f"This model reads {self.config.num_views} view(s) per study but `{name}` has "
                f"{pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})."
            )
        if not torch.isfinite(pixel_values).all():
            studies = (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"`{name}` of studies {studies} hold NaN or infinite values; CdanImageProcessor never writes "
                "them, so check how these inputs were made."
            )
        return pixel_values

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
        """
        output_attentions = bool(output_attentions)
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

        hidden_states = u_s + sinusoidal_positions(u_s.shape[1], u_s.shape[2], u_s.device, u_s.dtype)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        all_hidden_states = () if output_hidden_states else None
        for encoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = encoder_layer(hidden_states)
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
        **kwargs,
    ) -> Seq2SeqModelOutput:
        r"""
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
            raise ValueError("This model has no diagnosis prompt (`use_diagnosis_prompt=False`); drop diagnosis_states.")
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


class CdanForConditionalGeneration(CdanPreTrainedModel, GenerationMixin):
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

    def __init__(self, config: CdanConfig):
        super().__init__(config)
        self.model = CdanModel(config)
        self.lm_head = CdanLinear.from_config(config, config.d_model, config.vocab_size, bias=False)
        self.semantic_projection = (
            nn.Linear(config.d_model, config.semantic_dim) if config.use_semantic_consistency else None
        )
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

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """
        Expand the decoder inputs over beams (or returned sequences), but keep one copy of the encoder memory `u_s`
        per study. The cross-attention groups the queries of a study's beams (see `CdanAttention.forward`), so the
        memory's keys and values are projected, cached and read once per study instead of once per beam.
        """
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        diagnosis_states = model_kwargs.pop("diagnosis_states", None)  # one prompt per study, as the memory
        if is_encoder_decoder and encoder_outputs is None:
            raise ValueError("`generate()` needs `encoder_outputs` here; pass `pixel_values` or `visual_features`.")
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        if diagnosis_states is not None:
            model_kwargs["diagnosis_states"] = diagnosis_states
        return input_ids, model_kwargs

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs: dict):
        """Stock checks, plus a positive whole `num_beams` and `num_return_sequences` before anything runs."""
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(generation_config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{name}` must be a positive integer, got {value!r}; use `num_beams=1` for greedy search or more "
                    "for beam search, and `num_return_sequences` at most `num_beams`."
                )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _validate_generated_length(self, generation_config, input_ids_length: int, has_default_max_length: bool):
        """
        Stock checks, plus: no requested length may need more decoder positions than `max_position_embeddings`. A
        report of `n` tokens (the decoder start token included) feeds `n - 1` of them to the decoder, so the longest
        possible report has `max_position_embeddings + 1` tokens. Runs after the encoder, before the first decoding
        step.
        """
        longest = self.config.max_position_embeddings + 1
        config = generation_config
        requested = []  # (argument, value given, report length in tokens it asks for)
        if config.max_new_tokens is not None:
            requested.append(("max_new_tokens", config.max_new_tokens, config.max_new_tokens + input_ids_length))
        elif not has_default_max_length:  # a default `max_length` is already capped at `max_position_embeddings`
            requested.append(("max_length", config.max_length, config.max_length))
        if config.min_new_tokens is not None:
            requested.append(("min_new_tokens", config.min_new_tokens, config.min_new_tokens + input_ids_length))
        elif config.min_length is not None:
            requested.append(("min_length", config.min_length, config.min_length))
        too_long = [f"`{name}`={value} ({length} tokens)" for name, value, length in requested if length > longest]
        if too_long:
            raise ValueError(
                f"{' and '.join(too_long)} would need more decoder positions than the model has: "
                f"`max_position_embeddings`={self.config.max_position_embeddings} allows reports of at most "
                f"{longest} tokens, {input_ids_length} decoder start token(s) included (`max_new_tokens` at most "
                f"{longest - input_ids_length}). Lower the value(s) or use a model with more positions."
            )
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)

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
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # Eq. (21): p(w_t | w_<t, u_s), (B, T, vocab_size)

        loss = visual_semantics = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)  # Eq. (3): L_text
            if self.semantic_projection is not None:
                visual_semantics = self.semantic_projection(outputs.pooled_semantic_states)  # Eq. (18) input, (B, S)

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
        )


CdanModel.register_for_auto_class("AutoModel")
CdanForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "CdanEncoder",
    "CdanEncoderOutput",
    "CdanDecoder",
    "CdanDiagnosisPrompt",
    "CdanForConditionalGeneration",
    "CdanModel",
    "CdanPreTrainedModel",
    "CdanReverseAttention",
    "CdanSeq2SeqLMOutput",
    "CdanSeq2SeqModelOutput",
    "CdanVisualExtractor",
    "diagnosis_states_from_logits",
]
