"""Reusable building blocks of PriorRG: clinical context, view and temporal embeddings, temporal fusion, the shared
Perceiver resampler, layer-wise fusion of a vision encoder's hidden states, and the prior-guided contrastive loss.

The modules take plain sizes rather than a configuration class, so that a PriorRG model and CDAN (through its
config) can both build them.

References:
1) Liu et al., "PriorRG: Prior-Guided Contrastive Pre-training and Coarse-to-Fine Decoding for Chest X-ray Report
   Generation", AAAI 2026, arXiv:2508.05353, and its public code (github.com/mk-runner/PriorRG:
   `models/model_github.py`, `models/perceiver_pytorch.py`, `tools/dataset_github.py`, `main_github.py`). Its
   `TemporalFusion` is imported from `models/bert_model.py`, which the repository does not publish; the block here
   follows the cross-attention `Transformer` of `models/perceiver_pytorch.py` that the call site describes.
2) Jaegle et al., "Perceiver: General Perception with Iterative Attention", ICML 2021, and lucidrains'
   perceiver-pytorch, which PriorRG adapts: pre-LayerNorm cross-attention, GEGLU feed-forward, latent self-attention.
3) Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", NeurIPS 2022 (lucidrains'
   flamingo-pytorch): the Perceiver resampler variant whose keys also include the latents
   (`concat_latents_to_keys=True` here; PriorRG does not do this).
4) Shazeer, "GLU Variants Improve Transformer", 2020: the GEGLU feed-forward.
5) Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018: the channel and spatial attention of
   `LayerwiseFusion`.
6) Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), ICML 2021: the
   learnable temperature, initialised at 1/0.07 and capped at 100; van den Oord et al., "Representation Learning with
   Contrastive Predictive Coding", 2018: InfoNCE.
"""

import math
from collections.abc import Hashable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

DEFAULT_VIEW_POSITIONS = ("PA", "AP", "LATERAL", "LL")
"""The frequent MIMIC-CXR `ViewPosition` values; any other view (or none) maps to the "unknown" embedding."""

CONTEXT_SECTION_TAGS = ("[INDICATION]", "[HISTORY]")
"""Section tags of the clinical context. PriorRG adds them to its tokenizer as new tokens (`main_github.py`)."""

REPORT_SECTION_TAG = "[FINDINGS]"
"""Tag written before the findings when stage 1 embeds a report: `"[CLS] [FINDINGS] " + findings` (PriorRG)."""

CLIP_MAX_LOGIT_SCALE = 100.0
"""CLIP caps the exponentiated temperature at 100."""


def format_clinical_context(indication: str | None, history: str | None, sep_token: str = "[SEP]") -> str:
    """
    The clinical context text that PriorRG's text encoder reads.

    Exact format, with each piece stripped of surrounding whitespace and a whitespace-only piece counted as missing:

    - both pieces: `"[INDICATION] {indication} [SEP] [HISTORY] {history}"`
    - only the indication: `"[INDICATION] {indication}"`
    - only the history: `"[HISTORY] {history}"`
    - neither: `""`. Encode such a study with `has_context=False` in [`ContextEncoder`], so the Perceiver sees no
      context tokens at all rather than the tokenizer's special tokens.

    PriorRG (`tools/dataset_github.py`) always writes both tags, also around empty pieces
    (`"[INDICATION] [SEP] [HISTORY] "`); dropping empty sections is this library's choice.

    Args:
        indication (`str`, *optional*): The INDICATION section of the report.
        history (`str`, *optional*): The HISTORY (or clinical history) section.
        sep_token (`str`, *optional*, defaults to `"[SEP]"`): The separator; PriorRG uses its tokenizer's
            `sep_token`, `"[SEP]"`.
    """
    indication = (indication or "").strip()
    history = (history or "").strip()
    sections = []
    if indication:
        sections.append(f"{CONTEXT_SECTION_TAGS[0]} {indication}")
    if history:
        sections.append(f"{CONTEXT_SECTION_TAGS[1]} {history}")
    return f" {sep_token} ".join(sections)


def _key_padding_mask(attention_mask: torch.Tensor | None, batch_size: int, length: int) -> torch.Tensor | None:
    """Check a `(B, S)` mask (True or 1 = attend) and return it as bool, or `None` when absent."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, length):
        raise ValueError(
            f"The attention mask must have shape (batch, keys) = {(batch_size, length)}; "
            f"got {tuple(attention_mask.shape)}."
        )
    return attention_mask.bool()


class PriorRGAttention(nn.Module):
    """
    Multi-head softmax attention of queries `(B, T, C)` over keys and values `(B, S, C_kv)`, through torch's
    `scaled_dot_product_attention` with a boolean key-padding mask.

    A query row whose keys are all masked would get `softmax` over nothing (NaN); here its output is zero instead, so a
    residual block passes its input through unchanged.

    Args:
        query_size (`int`): Width of the queries and of the output.
        key_value_size (`int`, *optional*): Width of the keys and values; `query_size` when `None`.
        num_heads (`int`, *optional*, defaults to 8): Number of heads.
        head_dim (`int`, *optional*, defaults to 64): Width of each head; the inner width is `num_heads * head_dim`.
        qkv_bias (`bool`, *optional*, defaults to `False`): Biases on the query, key and value projections
            (perceiver-pytorch has none; PriorRG's temporal-fusion attention has them).
        dropout (`float`, *optional*, defaults to 0.0): Dropout on the attention weights while training.
    """

    def __init__(
        self,
        query_size: int,
        key_value_size: int | None = None,
        num_heads: int = 8,
        head_dim: int = 64,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        key_value_size = key_value_size or query_size
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        inner_size = num_heads * head_dim
        self.q_proj = nn.Linear(query_size, inner_size, bias=qkv_bias)
        self.k_proj = nn.Linear(key_value_size, inner_size, bias=qkv_bias)
        self.v_proj = nn.Linear(key_value_size, inner_size, bias=qkv_bias)
        self.out_proj = nn.Linear(inner_size, query_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_queries, query_size)`): The queries.
            key_value_states (`torch.Tensor` of shape `(batch_size, num_keys, key_value_size)`, *optional*):
                Keys and values; `hidden_states` (self-attention) when `None`.
            attention_mask (`torch.Tensor` of shape `(batch_size, num_keys)`, *optional*): True (or 1) for keys to
                attend to.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_queries, query_size)`.
        """
        key_value_states = hidden_states if key_value_states is None else key_value_states
        batch_size, num_keys = key_value_states.shape[:2]
        query = self.q_proj(hidden_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B,H,T,D)
        key = self.k_proj(key_value_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B,H,S,D)
        value = self.v_proj(key_value_states).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        key_mask = _key_padding_mask(attention_mask, batch_size, num_keys)  # (B, S)
        has_keys = None
        if key_mask is not None:
            has_keys = key_mask.any(dim=1)  # (B,)
            # Rows without any key attend to all of them (finite), and their output is zeroed below.
            key_mask = key_mask | ~has_keys[:, None]
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, S), broadcast over heads and queries
        attn_output = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        attn_output = self.out_proj(attn_output.transpose(1, 2).flatten(2))  # (B, T, C)
        if has_keys is not None:
            attn_output = attn_output * has_keys[:, None, None].to(attn_output.dtype)
        return attn_output


class GegluFeedForward(nn.Module):
    """
    GEGLU feed-forward `W_2 (a * GELU(g))` with `[a, g] = W_1 x` (Shazeer, 2020), as in perceiver-pytorch.

    Args:
        hidden_size (`int`): Input and output width.
        mult (`int`, *optional*, defaults to 4): The inner width is `mult * hidden_size`.
        dropout (`float`, *optional*, defaults to 0.0): Dropout on the output while training.
    """

    def __init__(self, hidden_size: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size * mult * 2)
        self.fc2 = nn.Linear(hidden_size * mult, hidden_size)
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gates = self.fc1(hidden_states).chunk(2, dim=-1)  # (B, T, mult*C) each
        hidden_states = self.fc2(hidden_states * nn.functional.gelu(gates))  # (B, T, C)
        return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)


class PerceiverResamplerLayer(nn.Module):
    """
    One Perceiver layer as PriorRG uses it (`self_per_cross_attn=1`): pre-LayerNorm cross-attention of the latents to
    the inputs, a GEGLU feed-forward, latent self-attention and a second GEGLU feed-forward, each with a residual.
    """

    def __init__(
        self,
        hidden_size: int,
        input_size: int,
        num_heads: int,
        head_dim: int,
        ff_mult: int,
        dropout: float,
        concat_latents_to_keys: bool,
    ):
        super().__init__()
        if concat_latents_to_keys and input_size != hidden_size:
            raise ValueError("`concat_latents_to_keys` needs inputs as wide as the latents.")
        self.concat_latents_to_keys = concat_latents_to_keys
        self.cross_attn_latent_norm = nn.LayerNorm(hidden_size)
        self.cross_attn_input_norm = nn.LayerNorm(input_size)
        self.cross_attn = PriorRGAttention(hidden_size, input_size, num_heads, head_dim, dropout=dropout)
        self.cross_ff_norm = nn.LayerNorm(hidden_size)
        self.cross_ff = GegluFeedForward(hidden_size, ff_mult, dropout)
        self.self_attn_norm = nn.LayerNorm(hidden_size)
        self.self_attn = PriorRGAttention(hidden_size, None, num_heads, head_dim, dropout=dropout)
        self.self_ff_norm = nn.LayerNorm(hidden_size)
        self.self_ff = GegluFeedForward(hidden_size, ff_mult, dropout)

    def forward(
        self, latents: torch.Tensor, inputs: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        normed_latents = self.cross_attn_latent_norm(latents)  # (B, M, C)
        key_value_states = self.cross_attn_input_norm(inputs)  # (B, N, C_in)
        if self.concat_latents_to_keys:  # Flamingo: the latents are keys too, so a row always has some
            key_value_states = torch.cat([key_value_states, normed_latents], dim=1)  # (B, N + M, C)
            if attention_mask is not None:
                latent_mask = attention_mask.new_ones(latents.shape[:2])  # (B, M)
                attention_mask = torch.cat([attention_mask, latent_mask], dim=1)  # (B, N + M)
        latents = latents + self.cross_attn(normed_latents, key_value_states, attention_mask)
        latents = latents + self.cross_ff(self.cross_ff_norm(latents))
        latents = latents + self.self_attn(self.self_attn_norm(latents))
        return latents + self.self_ff(self.self_ff_norm(latents))


class PerceiverResampler(nn.Module):
    """
    PriorRG's Perceiver: `num_latents` learned latents read a variable-length set of input tokens through `depth`
    layers of cross-attention, GEGLU feed-forward and latent self-attention (a second feed-forward follows the
    self-attention, as in perceiver-pytorch's `self_per_cross_attn=1`). PriorRG builds one and reuses it across its
    passes, each starting from the previous pass's output:

    ```python
    ctx = resampler(context_states, context_mask)  # (B, M, C), from the learned latents
    st = resampler(spatiotemporal_states, latents=ctx)
    joint = resampler(joint_states, latents=st)
    ```

    Differences from the public code (`models/perceiver_pytorch.py`), which attends to every input position:
    `attention_mask` removes inputs (e.g. the padding of the context text) from the cross-attention. A study whose
    inputs are all masked (no context) gets zero from the cross-attention, so its latents pass through it unchanged
    (the feed-forwards and self-attention still apply): the output is finite and equals what the same latents give
    with no inputs at all. There is no final LayerNorm, as in PriorRG (Flamingo's resampler has one).

    Args:
        hidden_size (`int`): Width of the latents (and of the output).
        num_latents (`int`, *optional*, defaults to 128): Number of learned latents.
        depth (`int`, *optional*, defaults to 3): Number of layers.
        num_heads (`int`, *optional*, defaults to 8): Heads of the cross- and self-attention.
        head_dim (`int`, *optional*, defaults to 64): Width of each head.
        ff_mult (`int`, *optional*, defaults to 4): The GEGLU inner width is `ff_mult * hidden_size`.
        input_size (`int`, *optional*): Width of the inputs; `hidden_size` when `None` (PriorRG projects everything to
            `hidden_size` first).
        dropout (`float`, *optional*, defaults to 0.0): Attention and feed-forward dropout (PriorRG: 0).
        concat_latents_to_keys (`bool`, *optional*, defaults to `False`): Flamingo's variant, where the latents also
            serve as keys and values of the cross-attention. PriorRG does not.
    """

    def __init__(
        self,
        hidden_size: int,
        num_latents: int = 128,
        depth: int = 3,
        num_heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        input_size: int | None = None,
        dropout: float = 0.0,
        concat_latents_to_keys: bool = False,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_size = input_size or hidden_size
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))  # PriorRG: torch.randn, std 1
        self.layers = nn.ModuleList(
            PerceiverResamplerLayer(
                hidden_size, self.input_size, num_heads, head_dim, ff_mult, dropout, concat_latents_to_keys
            )
            for _ in range(depth)
        )

    def reset_parameters(self, std: float = 1.0) -> None:
        """Re-draw the learned latents from `N(0, std^2)` (PriorRG: `torch.randn`, std 1); for a host `_init_weights`."""
        init.normal_(self.latents, std=std)

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            inputs (`torch.Tensor` of shape `(batch_size, num_inputs, input_size)`): The tokens to resample.
            attention_mask (`torch.Tensor` of shape `(batch_size, num_inputs)`, *optional*): True (or 1) for inputs to
                attend to; all inputs when `None`.
            latents (`torch.Tensor` of shape `(batch_size, num_queries, hidden_size)`, *optional*): Initial latents
                per study, replacing the learned ones (e.g. the output of a previous pass).

        Returns:
            `torch.Tensor` of shape `(batch_size, num_queries, hidden_size)`; `num_queries` is `num_latents` unless
            `latents` are given.
        """
        batch_size, num_inputs = inputs.shape[:2]
        attention_mask = _key_padding_mask(attention_mask, batch_size, num_inputs)
        if latents is None:
            latents = self.latents.unsqueeze(0).expand(batch_size, -1, -1)  # (B, M, C)
        elif latents.ndim != 3 or latents.shape[0] != batch_size or latents.shape[2] != self.hidden_size:
            raise ValueError(
                f"`latents` must have shape (batch, num_queries, {self.hidden_size}) with batch {batch_size}; "
                f"got {tuple(latents.shape)}."
            )
        for layer in self.layers:
            latents = layer(latents, inputs, attention_mask)
        return latents


class TemporalFusionLayer(nn.Module):
    """
    One block of temporal fusion: the current study's tokens query the prior study's tokens (LayerNorm on both, as
    PriorRG's `ScaledDotProductAttention2D`), then a pre-LayerNorm GELU feed-forward, each with a residual.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(hidden_size)
        self.key_value_norm = nn.LayerNorm(hidden_size)
        self.cross_attn = PriorRGAttention(hidden_size, None, num_heads, head_dim, qkv_bias=True, dropout=dropout)
        self.ff_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden_size)
        self.dropout = dropout

    def forward(
        self, current: torch.Tensor, prior: torch.Tensor, prior_attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        current = current + self.cross_attn(self.query_norm(current), self.key_value_norm(prior), prior_attention_mask)
        hidden_states = nn.functional.gelu(self.fc1(self.ff_norm(current)))  # (B, N, ffn_dim)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = nn.functional.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        return current + hidden_states


class TemporalFusion(nn.Module):
    """
    PriorRG's temporal fusion: `num_layers` blocks in which the current image tokens cross-attend to the prior
    study's image tokens, then pass a feed-forward. Studies without a prior skip it: their output is `current`
    itself (bit-identical), decided per study by `has_prior`, so one batch can mix studies with and without priors.

    PriorRG's module (`models/bert_model.py`) is not public; the call site (`models/model_github.py`) passes
    `heads=num_heads`, `dim_head=hidden_size // 4` and `mlp_dim=hidden_size`, and notes layer norms in the first and
    last sublayer, which matches the cross-attention `Transformer` of `models/perceiver_pytorch.py` followed here.
    Unlike PriorRG, which ends the block with a LayerNorm and normalises studies without a prior by a separate
    LayerNorm, this module returns the residual stream: apply one shared LayerNorm to its whole output if wanted.

    Args:
        hidden_size (`int`): Width of the image tokens.
        num_layers (`int`, *optional*, defaults to 3): Number of blocks.
        num_heads (`int`, *optional*, defaults to 8): Attention heads.
        head_dim (`int`, *optional*): Width of each head; `hidden_size // 4` (PriorRG's choice) when `None`.
        ffn_dim (`int`, *optional*): Inner width of the feed-forward; `hidden_size` (PriorRG's) when `None`.
        dropout (`float`, *optional*, defaults to 0.0): Attention and feed-forward dropout.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int = 3,
        num_heads: int = 8,
        head_dim: int | None = None,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        head_dim = head_dim or max(1, hidden_size // 4)
        ffn_dim = ffn_dim or hidden_size
        self.layers = nn.ModuleList(
            TemporalFusionLayer(hidden_size, num_heads, head_dim, ffn_dim, dropout) for _ in range(num_layers)
        )

    def forward(
        self,
        current: torch.Tensor,
        prior: torch.Tensor,
        has_prior: torch.Tensor,
        prior_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            current (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`): The current study's tokens.
            prior (`torch.Tensor` of shape `(batch_size, num_prior_tokens, hidden_size)`): The prior study's tokens;
                any values (e.g. zeros) in rows without a prior, which are never read.
            has_prior (`torch.Tensor` of shape `(batch_size,)`, bool): Which studies have a prior.
            prior_attention_mask (`torch.Tensor` of shape `(batch_size, num_prior_tokens)`, *optional*): True (or 1)
                for prior tokens to attend to (e.g. several prior views padded to one length).

        Returns:
            `torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`: fused tokens where `has_prior`, `current`
            unchanged elsewhere.
        """
        batch_size = current.shape[0]
        if prior.shape[0] != batch_size or has_prior.shape != (batch_size,):
            raise ValueError(
                f"`prior` must have batch {batch_size} and `has_prior` shape ({batch_size},); got "
                f"{tuple(prior.shape)} and {tuple(has_prior.shape)}."
            )
        prior_attention_mask = _key_padding_mask(prior_attention_mask, batch_size, prior.shape[1])
        has_prior = has_prior.bool()
        if not has_prior.any():
            return current
        fused, prior_states = current[has_prior], prior[has_prior]  # only studies with a prior are computed
        prior_mask = prior_attention_mask[has_prior] if prior_attention_mask is not None else None
        for layer in self.layers:
            fused = layer(fused, prior_states, prior_mask)
        if has_prior.all():
            return fused
        output = current.clone()
        output[has_prior] = fused
        return output


class ViewTemporalEmbeddings(nn.Module):
    """
    Learned view-position embeddings (one per named view, plus one for any other or missing view) and temporal
    embeddings (0 = current study, 1 = prior study), added to every token of an image.

    PriorRG (`models/model_github.py`) adds the view embedding to the vision encoder's output before its projection
    head and the temporal embedding after it; `forward` adds whichever of the two it is given, so both orders can be
    built from one or two instances. Its view table comes from a JSON file it does not publish.

    Args:
        hidden_size (`int`): Width of the tokens.
        view_positions (`Sequence[str]`, *optional*, defaults to `("PA", "AP", "LATERAL", "LL")`): The named views;
            names are matched case-insensitively after stripping. Index `len(view_positions)` is "unknown".
        num_temporal_positions (`int`, *optional*, defaults to 2): Current and prior.
    """

    CURRENT, PRIOR = 0, 1

    def __init__(
        self,
        hidden_size: int,
        view_positions: Sequence[str] = DEFAULT_VIEW_POSITIONS,
        num_temporal_positions: int = 2,
    ):
        super().__init__()
        self.view_positions = tuple(view.strip().upper() for view in view_positions)
        if len(set(self.view_positions)) != len(self.view_positions):
            raise ValueError(f"`view_positions` repeats a view: {view_positions}.")
        self.view_to_id = {view: index for index, view in enumerate(self.view_positions)}
        self.unknown_view_id = len(self.view_positions)
        self.view_embeddings = nn.Embedding(len(self.view_positions) + 1, hidden_size)  # N(0, 1), as torch.randn
        self.temporal_embeddings = nn.Embedding(num_temporal_positions, hidden_size)

    def view_position_ids(
        self, view_positions: Sequence[str | None], device: torch.device | None = None
    ) -> torch.Tensor:
        """Names (`"PA"`, `"lateral"`, `None`, ...) -> `(B,)` indices; unlisted or missing views -> `unknown_view_id`."""
        ids = [self.view_to_id.get((view or "").strip().upper(), self.unknown_view_id) for view in view_positions]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        view_positions: torch.Tensor | Sequence[str | None] | None = None,
        temporal_ids: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`): Image tokens.
            view_positions (`torch.LongTensor` of shape `(batch_size,)` or a sequence of names, *optional*): Each
                image's view, as indices or names; no view embedding when `None`.
            temporal_ids (`torch.LongTensor` of shape `(batch_size,)` or `int`, *optional*): 0 for the current study,
                1 for a prior; no temporal embedding when `None`.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`.
        """
        batch_size = hidden_states.shape[0]
        if view_positions is not None:
            if not isinstance(view_positions, torch.Tensor):
                view_positions = self.view_position_ids(view_positions, device=hidden_states.device)
            if view_positions.shape != (batch_size,):
                raise ValueError(
                    f"Expected one view per image, shape ({batch_size},); got {tuple(view_positions.shape)}."
                )
            hidden_states = hidden_states + self.view_embeddings(view_positions).unsqueeze(1)  # (B, 1, C) broadcast
        if temporal_ids is not None:
            if not isinstance(temporal_ids, torch.Tensor):
                temporal_ids = torch.full((batch_size,), temporal_ids, dtype=torch.long, device=hidden_states.device)
            hidden_states = hidden_states + self.temporal_embeddings(temporal_ids).unsqueeze(1)  # (B, 1, C)
        return hidden_states


class ChannelAttention(nn.Module):
    """CBAM channel attention over the layer axis: `sigmoid(MLP(avgpool) + MLP(maxpool))`, one weight per layer."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        reduced = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, reduced, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(reduced, channels, kernel_size=1, bias=False),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        average = hidden_states.mean(dim=(2, 3), keepdim=True)  # (B, L, 1, 1)
        maximum = hidden_states.amax(dim=(2, 3), keepdim=True)  # (B, L, 1, 1)
        return torch.sigmoid(self.mlp(average) + self.mlp(maximum))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a `k x k` convolution of the mean and max over layers, one weight per (token, feature)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        maximum = hidden_states.amax(dim=1, keepdim=True)  # (B, 1, N, C)
        average = hidden_states.mean(dim=1, keepdim=True)  # (B, 1, N, C)
        return torch.sigmoid(self.conv(torch.cat([maximum, average], dim=1)))  # (B, 1, N, C)


class LayerwiseFusion(nn.Module):
    """
    PriorRG's attention-enhanced fusion of a vision encoder's per-layer hidden states into one token map.

    The `L` layers are the channels of an image whose "pixels" are the `(N, C)` token-by-feature plane: CBAM channel
    attention then spatial attention with a residual, `x + SA(CA(x) x) CA(x) x`, then 1x1 convolutions
    `L -> L/2` (BatchNorm, ReLU) `-> 1`, so a 12-layer ViT gives `12 -> 6 -> 1`. As in PriorRG
    (`models/model_github.py`), the spatial attention's `7 x 7` kernel slides over neighbouring tokens and
    neighbouring feature channels, and the channel MLP reduces by 4 (`LayerwiseFusion(reduction=4)`). PriorRG feeds
    `hidden_states[1:]` of RAD-DINO (every layer output, not the embeddings), CLS token included.

    Args:
        num_layers (`int`): `L`, the number of hidden states fused.
        hidden_size (`int`): `C`, their width (checked; the convolutions act on the layer axis).
        reduction (`int`, *optional*, defaults to 4): Channel-attention reduction.
        kernel_size (`int`, *optional*, defaults to 7): Spatial-attention kernel.
    """

    def __init__(self, num_layers: int, hidden_size: int, reduction: int = 4, kernel_size: int = 7):
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.channel_attention = ChannelAttention(num_layers, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)
        half = max(1, num_layers // 2)
        self.projection = nn.Sequential(
            nn.Conv2d(num_layers, half, kernel_size=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, 1, kernel_size=1),
        )

    def forward(self, hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_layers, num_tokens, hidden_size)`, or a sequence
                of `num_layers` tensors `(batch_size, num_tokens, hidden_size)`, such as a model's `hidden_states`
                without its first, embedding, entry).

        Returns:
            `torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`: the joint token map.
        """
        if not isinstance(hidden_states, torch.Tensor):
            hidden_states = torch.stack(tuple(hidden_states), dim=1)  # (B, L, N, C)
        if (
            hidden_states.ndim != 4
            or hidden_states.shape[1] != self.num_layers
            or hidden_states.shape[3] != self.hidden_size
        ):
            raise ValueError(
                f"Expected hidden states of shape (batch, {self.num_layers}, tokens, {self.hidden_size}); "
                f"got {tuple(hidden_states.shape)}."
            )
        attended = hidden_states * self.channel_attention(hidden_states)  # (B, L, N, C)
        attended = attended * self.spatial_attention(attended)
        fused = self.projection(attended + hidden_states)  # (B, 1, N, C)
        return fused.squeeze(1)  # (B, N, C)


class ContextEncoder(nn.Module):
    """
    Encodes the clinical context (see [`format_clinical_context`]) with a BERT-family text model and projects its
    token states for the Perceiver. PriorRG uses CXR-BERT cut to 6 layers; any `AutoModel` returning
    `last_hidden_state` fits.

    The projection head follows PriorRG's `ProjectionHead` (two position-wise layers through a half-width hidden layer
    and ReLU) with LayerNorm instead of BatchNorm: BatchNorm statistics would include the padding tokens and make a
    study's features depend on the rest of its batch.

    PriorRG embeds the report for its contrastive loss with the same encoder and head, taking the projected state of
    the report's first token (`[CLS]`, written into the text): `states[:, 0]` of `forward`.

    Args:
        text_model (`PreTrainedModel`): The text encoder, e.g. `AutoModel.from_pretrained(...)`.
        projection_dim (`int`): Output width (the Perceiver's `hidden_size`).
        projection_hidden_dim (`int`, *optional*): Width of the head's hidden layer; `projection_dim // 2` (PriorRG)
            when `None`.
    """

    def __init__(self, text_model: PreTrainedModel, projection_dim: int, projection_hidden_dim: int | None = None):
        super().__init__()
        self.text_model = text_model
        text_size = text_model.config.hidden_size
        projection_hidden_dim = projection_hidden_dim or max(1, projection_dim // 2)
        self.projection = nn.Sequential(
            nn.Linear(text_size, projection_hidden_dim),
            nn.LayerNorm(projection_hidden_dim),
            nn.ReLU(),
            nn.Linear(projection_hidden_dim, projection_dim),
        )

    def encode_study_context(
        self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The context of a batch as the processor gives it: a study whose attention-mask row is all zeros has no
        context, and without `input_ids` no study has any (one all-masked zero token each, which the Perceiver
        ignores).

        Returns:
            `tuple` of the projected token states `(batch_size, num_tokens, projection_dim)` and their bool mask.
        """
        if input_ids is None:
            device = self.projection[-1].weight.device
            placeholder = torch.zeros(batch_size, 1, self.projection[-1].out_features, device=device)  # (B, 1, P)
            return placeholder, torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self(input_ids, attention_mask, has_context=attention_mask.bool().any(dim=1))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        has_context: torch.Tensor | None = None,
        **text_model_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, num_tokens)`): Tokenised context.
            attention_mask (`torch.Tensor` of shape `(batch_size, num_tokens)`, *optional*): The tokenizer's mask.
            has_context (`torch.Tensor` of shape `(batch_size,)`, bool, *optional*): False for studies without any
                context text (empty [`format_clinical_context`]); their returned mask is all False.
            text_model_kwargs: Passed to the text model (e.g. `token_type_ids`).

        Returns:
            `tuple` of the projected token states `(batch_size, num_tokens, projection_dim)` and the bool mask
            `(batch_size, num_tokens)` for [`PerceiverResampler`].
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **text_model_kwargs)
        states = self.projection(outputs.last_hidden_state)  # (B, T, P)
        mask = attention_mask.bool()  # (B, T)
        if has_context is not None:
            mask = mask & has_context.bool()[:, None]
        return states, mask


def scatter_rows(rows: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Put `rows` `(R, ...)` back at the True positions of `row_mask` `(B,)`, zeros elsewhere: `(B, ...)`."""
    batch = rows.new_zeros(row_mask.shape[0], *rows.shape[1:])
    batch[row_mask] = rows
    return batch


def study_id_codes(study_ids: Sequence[Hashable], device: torch.device | None = None) -> torch.Tensor:
    """Hashable study ids -> `(B,)` integer codes, equal exactly where the ids are (first-seen order)."""
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(study_id, len(index)) for study_id in study_ids], device=device)


def study_targets(study_ids: torch.Tensor | Sequence[Hashable], device: torch.device | None = None) -> torch.Tensor:
    """
    Multi-positive targets: `T[i, j] = [id_i == id_j] / #{k: id_k == id_i}`, each row summing to 1, so the images of
    one study are each other's positives.

    Args:
        study_ids (`torch.Tensor` of shape `(batch_size,)` or a sequence of hashable ids, e.g. `"subject_study"`).
    """
    if not isinstance(study_ids, torch.Tensor):
        study_ids = study_id_codes(study_ids, device=device)
    same_study = (study_ids[:, None] == study_ids[None, :]).float()  # (B, B)
    return (same_study / same_study.sum(dim=1, keepdim=True)).to(device or study_ids.device)


def multi_positive_info_nce(
    image_embeddings: torch.Tensor,
    report_embeddings: torch.Tensor,
    study_ids: torch.Tensor | Sequence[Hashable],
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """
    PriorRG's symmetric InfoNCE with multi-positive soft targets (`global_alignment_loss` in
    `models/model_github.py`): both embeddings are L2-normalised, `logits = logit_scale * img @ rep^T`, and the loss
    is the mean of the image-to-report and report-to-image cross-entropies against [`study_targets`].

    Args:
        image_embeddings (`torch.Tensor` of shape `(batch_size, dim)`): E.g. [`pooled_image_embedding`].
        report_embeddings (`torch.Tensor` of shape `(batch_size, dim)`): PriorRG: the projected `[CLS]` state of the
            report through the text encoder.
        study_ids (`torch.Tensor` of shape `(batch_size,)` or a sequence of ids): Images with equal ids are positives.
        logit_scale (`torch.Tensor` or `float`): The multiplier of the cosine similarities, i.e. the inverse
            temperature, already exponentiated (see [`ContrastiveHead`]).

    Returns:
        `torch.Tensor`, a scalar.
    """
    image_embeddings = nn.functional.normalize(image_embeddings, dim=-1)
    report_embeddings = nn.functional.normalize(report_embeddings, dim=-1)
    targets = study_targets(study_ids, device=image_embeddings.device).to(image_embeddings.dtype)  # (B, B)
    logits_per_image = logit_scale * image_embeddings @ report_embeddings.t()  # (B, B)
    loss_image = nn.functional.cross_entropy(logits_per_image, targets)
    loss_report = nn.functional.cross_entropy(logits_per_image.t(), targets.t())
    return (loss_image + loss_report) / 2


def pooled_image_embedding(*latents: torch.Tensor) -> torch.Tensor:
    """PriorRG's image embedding for the contrastive loss: the mean over all tokens of `cat([ctx, st], dim=1)`."""
    return torch.cat(latents, dim=1).mean(dim=1)  # (B, C)


class ContrastiveHead(nn.Module):
    """
    Holds the learnable temperature of PriorRG's prior-guided contrastive loss: `logit_scale` is stored as a log,
    initialised at `log(1 / 0.07)`, and exponentiated and capped at `max_logit_scale` (100, as CLIP) when used.
    PriorRG itself does not cap it.

    Args:
        initial_temperature (`float`, *optional*, defaults to 0.07): The initial temperature.
        max_logit_scale (`float`, *optional*, defaults to 100.0): Cap of `exp(logit_scale)`.
    """

    def __init__(self, initial_temperature: float = 0.07, max_logit_scale: float = CLIP_MAX_LOGIT_SCALE):
        super().__init__()
        self.initial_temperature, self.max_logit_scale = initial_temperature, max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / initial_temperature)))

    def reset_parameters(self) -> None:
        """Reset `logit_scale` to `log(1 / initial_temperature)`; for a host model's `_init_weights`."""
        init.constant_(self.logit_scale, math.log(1 / self.initial_temperature))

    def scale(self) -> torch.Tensor:
        """`exp(logit_scale)`, capped at `max_logit_scale`."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        report_embeddings: torch.Tensor,
        study_ids: torch.Tensor | Sequence[Hashable],
    ) -> torch.Tensor:
        """[`multi_positive_info_nce`] at the current temperature; see there for the arguments."""
        return multi_positive_info_nce(image_embeddings, report_embeddings, study_ids, self.scale())


__all__ = [
    "CONTEXT_SECTION_TAGS",
    "DEFAULT_VIEW_POSITIONS",
    "REPORT_SECTION_TAG",
    "ContextEncoder",
    "ContrastiveHead",
    "GegluFeedForward",
    "LayerwiseFusion",
    "PerceiverResampler",
    "PriorRGAttention",
    "TemporalFusion",
    "ViewTemporalEmbeddings",
    "format_clinical_context",
    "multi_positive_info_nce",
    "pooled_image_embedding",
    "scatter_rows",
    "study_id_codes",
    "study_targets",
]
