"""The layers shared by this library's encoder-decoder report models (CDAN, and D2R-Net through CDAN's switches and
its own decoder): the `timm` visual extractor, attention with an `EncoderDecoderCache` whose beams share one memory
per study, pre-LayerNorm encoder and decoder layers, positions, masks, input checks and the `generate()` hooks.

References:
1) Vaswani et al., "Attention Is All You Need", NeurIPS 2017: attention, the encoder and decoder layers, sinusoidal
   positions.
2) Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020 (R2Gen): several views
   stacked along the token axis.
3) Hugging Face transformers: BART (attention with `EncoderDecoderCache` and `layer_idx`), the attention-kernel
   interface (`ALL_ATTENTION_FUNCTIONS`), `GradientCheckpointingLayer`.
"""

import math
import os
from collections.abc import Callable

import timm
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

try:
    from .configuration_cdan import CdanConfig
except ImportError:
    from configuration_cdan import CdanConfig


logger = logging.get_logger(__name__)


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


def check_study_pixel_values(
    pixel_values: torch.Tensor | None, num_views: int, name: str = "pixel_values"
) -> torch.Tensor:
    """
    Check processed study views `(B, V, 3, H, W)` (a `(B, 3, H, W)` batch is read as one view when `num_views` is
    1) and raise a clear `ValueError` for inputs a visual extractor cannot take, not a shape error deep in torch.
    """
    if pixel_values is None:
        raise ValueError(f"`{name}` is required: pass the processed images of a study.")
    if pixel_values.ndim == 4 and num_views == 1:
        pixel_values = pixel_values.unsqueeze(1)
    if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
        raise ValueError(
            f"`{name}` must have shape (batch, views, 3, height, width); got "
            f"{tuple(pixel_values.shape)}. Use CdanImageProcessor to prepare images."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch.")
    if pixel_values.shape[1] != num_views:
        raise ValueError(
            f"This model reads {num_views} view(s) per study but `{name}` has "
            f"{pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})."
        )
    if not torch.isfinite(pixel_values).all():
        studies = (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` of studies {studies} hold NaN or infinite values; CdanImageProcessor never writes "
            "them, so check how these inputs were made."
        )
    return pixel_values


def key_padding_mask(mask: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, S)` booleans (True = attend) -> the additive `(B, 1, 1, S)` mask the attention kernels take."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return additive[:, None, None, :]


def check_lesion_box_tensors(
    lesion_boxes: torch.Tensor | None,
    lesion_box_mask: torch.Tensor | None,
    batch_size: int,
    num_views: int,
    max_boxes: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """
    Check lesion boxes `(B, V, K, 4)` and their mask `(B, V, K)` as `CdanProcessor(boxes=...)` gives them, with
    clear errors; no boxes at all are `K` empty rows per view.
    """
    if lesion_boxes is None:
        if lesion_box_mask is not None:
            raise ValueError("`lesion_box_mask` was given without `lesion_boxes`.")
        empty_boxes = torch.zeros(batch_size, num_views, max_boxes, 4, device=device)
        return empty_boxes, torch.zeros(batch_size, num_views, max_boxes, dtype=torch.bool, device=device)
    if lesion_boxes.ndim != 4 or lesion_boxes.shape[0] != batch_size or lesion_boxes.shape[1] != num_views:
        raise ValueError(
            f"`lesion_boxes` must have shape (batch={batch_size}, views={num_views}, boxes, 4); got "
            f"{tuple(lesion_boxes.shape)}. Use CdanProcessor(images=..., boxes=...) to prepare them."
        )
    if lesion_boxes.shape[2] != max_boxes or lesion_boxes.shape[3] != 4:
        raise ValueError(
            f"`lesion_boxes` has {lesion_boxes.shape[2]} boxes per view of {lesion_boxes.shape[3]} numbers; this "
            f"model reads max_lesion_boxes={max_boxes} boxes of 4 numbers (x_min, y_min, x_max, y_max)."
        )
    if lesion_box_mask is None:
        raise ValueError("`lesion_boxes` needs its `lesion_box_mask` (True for real boxes).")
    if lesion_box_mask.shape != lesion_boxes.shape[:3]:
        raise ValueError(
            f"`lesion_box_mask` must have shape {tuple(lesion_boxes.shape[:3])}; got {tuple(lesion_box_mask.shape)}."
        )
    lesion_box_mask = lesion_box_mask.bool()
    if not torch.isfinite(lesion_boxes[lesion_box_mask]).all():
        raise ValueError("`lesion_boxes` holds NaN or infinite coordinates under `lesion_box_mask`.")
    return lesion_boxes, lesion_box_mask


def patch_features_to_maps(visual_features: torch.Tensor, num_views: int) -> torch.Tensor:
    """
    The visual extractor's stacked patch features `(B, V*h*w, C)` back as square feature maps `(B*V, C, h, w)`, one
    per view (the processor's views are square), e.g. for RoIAlign on cached features.
    """
    patches_per_view = visual_features.shape[1] // num_views
    side = math.isqrt(patches_per_view)
    if side * side * num_views != visual_features.shape[1]:
        raise ValueError(
            f"Expected {num_views} square feature maps in {visual_features.shape[1]} patch features; the lesion "
            "branch needs square views (CdanImageProcessor makes them)."
        )
    feature_maps = visual_features.unflatten(1, (num_views, side, side)).flatten(0, 1)  # (B*V, h, w, C)
    return feature_maps.permute(0, 3, 1, 2).contiguous()  # (B*V, C, h, w)


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
        per_query_mask = attention_mask is not None and attention_mask.shape[-2] != 1
        if unmatched or (queries_per_memory > 1 and per_query_mask):
            raise ValueError(
                f"Cannot attend {query_states.shape[0]} query sequences to {key_states.shape[0]} memories: the number "
                "of queries must be a multiple of the number of memories, with at most a key padding mask."
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

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`(B, S, C)` -> `(B, S, C)`; `attention_mask` is an additive key mask, e.g. `(B, 1, 1, S)` for padding."""
        attn_output, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask)
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
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Returns the new hidden states `(B, T, C)`, and with `output_attentions=True` also the cross-attention weights
        over `encoder_hidden_states`, `(B, H, T, S)`. `encoder_attention_mask` is an additive key mask of the memory,
        `(B_memory, 1, 1, S)`, e.g. for padded lesion tokens.
        """
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), cache=cache, attention_mask=attention_mask
        )
        hidden_states = hidden_states + nn.functional.dropout(attn_output, p=self.dropout, training=self.training)
        cross_output, cross_weights = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            cache=cache,
            attention_mask=encoder_attention_mask,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + nn.functional.dropout(cross_output, p=self.dropout, training=self.training)
        ffn_output = self.feed_forward(self.final_layer_norm(hidden_states))
        hidden_states = hidden_states + nn.functional.dropout(ffn_output, p=self.dropout, training=self.training)
        if output_attentions:
            return hidden_states, cross_weights
        return hidden_states


class SharedMemoryGenerationMixin:
    """
    `generate()` hooks of the encoder-decoder report models of this library (CDAN, D2R-Net): one copy of the encoder
    memory per study under beam search, and clear errors for generation settings the decoder cannot honour.
    """

    per_study_generation_inputs: tuple[str, ...] = ("encoder_outputs",)
    """Model inputs kept once per study (not expanded over beams): the encoder outputs and what belongs to them."""

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """
        Expand the decoder inputs over beams (or returned sequences), but keep one copy of the encoder memory (and
        of the other `per_study_generation_inputs`) per study. The cross-attention groups the queries of a study's
        beams (see `CdanAttention.forward`), so the memory's keys and values are projected, cached and read once per
        study instead of once per beam.
        """
        per_study = {name: model_kwargs.pop(name, None) for name in self.per_study_generation_inputs}
        if is_encoder_decoder and per_study.get("encoder_outputs") is None:
            raise ValueError("`generate()` needs `encoder_outputs` here; pass `pixel_values` or `visual_features`.")
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        model_kwargs.update({name: value for name, value in per_study.items() if value is not None})
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


__all__ = [
    "CdanAttention",
    "CdanDecoderLayer",
    "CdanEncoderLayer",
    "CdanFeedForward",
    "CdanLinear",
    "CdanVisualExtractor",
    "SharedMemoryGenerationMixin",
    "check_lesion_box_tensors",
    "check_study_pixel_values",
    "eager_attention_forward",
    "key_padding_mask",
    "patch_features_to_maps",
    "shift_tokens_right",
    "sinusoidal_positions",
]
