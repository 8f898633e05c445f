"""Attention heatmaps of a CDAN study: the reverse-attention maps `u_p` / `u_n` and the decoder's cross-attention.

The visual extractor turns each view into an `h x w` feature map, flattened row-major and stacked view after view
along the token axis, so patch token `v * h * w + row * w + col` is cell `(row, col)` of view `v` (see
[`CdanVisualExtractor.forward`]). Every map here is reshaped back to that grid, `(num_views, h, w)`, and can be drawn
over the view with [`overlay_heatmap`]. Only numpy, torch and PIL are imported (no matplotlib).
"""

import numpy as np
import torch
from PIL import Image


def feature_grid(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """
    Run the visual extractor of `model` once and return its patch features with each view's feature-map size.

    Args:
        model (`CdanForConditionalGeneration`): the model.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`): processed studies.

    Returns:
        `(visual_features, (h, w))`: the features `(B, V*h*w, C)` the encoder reads, as `CdanVisualExtractor.forward`
        builds them, and the feature-map size of one view.
    """
    encoder = model.get_encoder()
    pixel_values = encoder.check_pixel_values(pixel_values)
    extractor = encoder.visual_extractor
    batch_size, num_views = pixel_values.shape[:2]
    pixel_values = pixel_values.to(encoder.visual_projection.weight.dtype)
    feature_maps = extractor.forward_features(pixel_values.flatten(0, 1))  # (B*V, C, h, w)
    height, width = feature_maps.shape[-2:]
    patches = feature_maps.flatten(2).transpose(1, 2)  # (B*V, h*w, C), row-major
    visual_features = patches.reshape(batch_size, num_views * height * width, patches.shape[-1])  # (B, V*h*w, C)
    return visual_features, (int(height), int(width))


def received_attention(weights: torch.Tensor) -> torch.Tensor:
    """
    The attention each key patch receives: `(B, H, N, N)` weights averaged over heads and over query patches.

    Args:
        weights (`torch.Tensor` of shape `(B, H, N, N)`): attention weights, queries on dim 2, keys on dim 3.

    Returns:
        `torch.Tensor` of shape `(B, N)`: `mean_h mean_i weights[b, h, i, j]` for key patch `j`. With row-stochastic
        weights (softmax, or the renormalised negative attention) each study's map sums to 1 over all its views.
    """
    return weights.float().mean(dim=1).mean(dim=1)  # (B, N)


@torch.no_grad()
def reverse_attention_maps(model, pixel_values: torch.Tensor, features: tuple | None = None) -> dict:
    """
    The positive and negative reverse-attention maps (the attention behind `u_p` and `u_n`) of each study and view.

    Each map is the attention a patch *receives*: the weights of `CdanEncoder(..., output_attentions=True)`
    (`positive_attentions`, `negative_attentions`, `(B, heads, N, N)`) averaged over heads and over the `N` query
    patches (see [`received_attention`]), reshaped to each view's `h x w` feature-map grid. A positive map sums to 1
    over all views of a study; so does a negative one when `renormalize_negative_attention` is on (the default).

    Args:
        model (`CdanForConditionalGeneration`): a model with reverse attention (`use_reverse_attention=True`).
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`): processed studies.
        features (`tuple`, *optional*): what [`feature_grid`] returned for `pixel_values`, to run the extractor once.

    Returns:
        `dict` with `"positive"` and `"negative"`, float32 arrays of shape `(batch_size, num_views, h, w)` (so
        `maps["positive"][study][view]` is an `(h, w)` array), and `"grid"`, the `(h, w)` of one view.
    """
    encoder = model.get_encoder()
    if encoder.reverse_attention is None:
        raise ValueError("This model has no reverse attention (`use_reverse_attention=False`): no u_p / u_n maps.")
    visual_features, (height, width) = features or feature_grid(model, pixel_values)
    outputs = encoder(visual_features=visual_features, output_attentions=True, return_dict=True)
    batch_size, num_views = pixel_values.shape[:2]
    maps = {}
    for name, weights in (("positive", outputs.positive_attentions), ("negative", outputs.negative_attentions)):
        received = received_attention(weights)  # (B, N)
        maps[name] = received.reshape(batch_size, num_views, height, width).cpu().numpy()  # (B, V, h, w)
    maps["grid"] = (height, width)
    return maps


@torch.no_grad()
def token_cross_attention(model, encoder_outputs, generated_ids: torch.LongTensor) -> torch.Tensor:
    """
    Re-run the decoder once, teacher-forced and without cache, on `generated_ids` and return its cross-attention.

    Row `t` of the result is the attention of decoder position `t`, the step that wrote token `t + 1` of
    `generated_ids`; it is averaged over all decoder layers and heads.

    Args:
        model (`CdanForConditionalGeneration`): the model that generated the ids.
        encoder_outputs (`CdanEncoderOutput`): the encoder output generation read, one row per study. Several rows of
            `generated_ids` per study (beams returned, samples) are allowed: their number must divide evenly.
        generated_ids (`torch.LongTensor` of shape `(num_sequences, T)`): output of `generate`, starting with the
            decoder start token.

    Returns:
        `torch.Tensor` of shape `(num_sequences, T, 2N + k)`: attention over the memory `u_s = [u_p, u_n, u_k]`.
    """
    memory = encoder_outputs.last_hidden_state  # (B, 2N + k, C)
    per_study = generated_ids.shape[0] // memory.shape[0]
    if per_study * memory.shape[0] != generated_ids.shape[0]:
        raise ValueError(f"{generated_ids.shape[0]} generated sequences for {memory.shape[0]} studies.")
    expanded = type(encoder_outputs)(
        last_hidden_state=memory.repeat_interleave(per_study, dim=0),
        disease_logits=None
        if encoder_outputs.disease_logits is None
        else encoder_outputs.disease_logits.repeat_interleave(per_study, dim=0),
    )
    outputs = model(
        encoder_outputs=expanded,
        decoder_input_ids=generated_ids.to(memory.device),
        use_cache=False,
        output_attentions=True,
        return_dict=True,
    )
    return torch.stack(outputs.cross_attentions).float().mean(dim=(0, 2))  # (L, S, H, T, 2N+k) -> (S, T, 2N+k)


def patch_maps_from_memory_weights(weights: torch.Tensor, num_views: int, grid: tuple[int, int]) -> torch.Tensor:
    """
    Fold attention over `u_s = [u_p (N), u_n (N), u_k (k)]` back to the patches: `u_p[j] + u_n[j]` per patch `j`.

    Args:
        weights (`torch.Tensor` of shape `(..., 2N + k)`): attention over the memory.
        num_views (`int`): views per study.
        grid (`tuple[int, int]`): `(h, w)` of one view's feature map.

    Returns:
        `torch.Tensor` of shape `(..., num_views, h, w)`.
    """
    height, width = grid
    num_patches = num_views * height * width
    patch_weights = weights[..., :num_patches] + weights[..., num_patches : 2 * num_patches]  # (..., N)
    return patch_weights.reshape(*weights.shape[:-1], num_views, height, width)


def group_sentences(token_maps: torch.Tensor, generated_ids: torch.LongTensor, processor) -> list[list[dict]]:
    """
    Average per-token maps over the tokens of each generated sentence.

    A sentence is a run of generated words ending with the `"."` token (a last run without one is a sentence too);
    special tokens (start, `eos`, padding) belong to none. Token `p` of `generated_ids` (`p >= 1`) was written by
    decoder position `p - 1`, so its map is `token_maps[:, p - 1]`.

    Args:
        token_maps (`torch.Tensor` of shape `(num_sequences, T, ...)`): one map per decoder position.
        generated_ids (`torch.LongTensor` of shape `(num_sequences, T)`): the generated ids.
        processor (`CdanProcessor`): decodes the sentences and gives the `"."` id.

    Returns:
        `list[list[dict]]`: per sequence, `[{"sentence": str, "maps": np.ndarray (...)}]` in report order.
    """
    tokenizer = processor.tokenizer
    period_id = tokenizer.convert_tokens_to_ids(".")
    special_ids = set(tokenizer.all_special_ids)
    results = []
    for row, ids in enumerate(generated_ids.tolist()):
        sentences, positions = [], []
        for position in range(1, len(ids)):
            if ids[position] in special_ids:
                continue
            positions.append(position)
            if ids[position] == period_id:
                sentences.append(positions)
                positions = []
        if positions:
            sentences.append(positions)
        row_results = []
        for positions in sentences:
            query_rows = torch.tensor(positions, device=token_maps.device) - 1
            row_results.append(
                {
                    "sentence": processor.decode([ids[p] for p in positions], skip_special_tokens=True),
                    "maps": token_maps[row, query_rows].mean(dim=0).cpu().numpy(),
                }
            )
        results.append(row_results)
    return results


@torch.no_grad()
def sentence_cross_attention_maps(
    model,
    pixel_values: torch.Tensor,
    generated_ids: torch.LongTensor,
    processor,
    encoder_outputs=None,
    features: tuple | None = None,
) -> list[list[dict]]:
    """
    The decoder's cross-attention over each view, per generated sentence.

    The decoder is re-run once, teacher-forced and without cache, on `generated_ids` (see [`token_cross_attention`]);
    its cross-attention weights are averaged over layers and heads, then over the tokens of each sentence (see
    [`group_sentences`]). The weight on patch `j` is the sum of the weights on its `u_p` and `u_n` tokens; the weight
    left on the disease words `u_k` is not drawn, so a sentence's maps sum to `1 - weight(u_k)` over all views.

    Args:
        model (`CdanForConditionalGeneration`): a model with reverse attention.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`): processed studies.
        generated_ids (`torch.LongTensor` of shape `(num_sequences, T)`): what `generate` returned for them.
        processor (`CdanProcessor`): the model's processor.
        encoder_outputs (`CdanEncoderOutput`, *optional*): the encoder output generation read; computed when omitted.
        features (`tuple`, *optional*): what [`feature_grid`] returned for `pixel_values`, to run the extractor once.

    Returns:
        `list[list[dict]]`: per sequence, `[{"sentence": str, "maps": np.ndarray (num_views, h, w)}]`.
    """
    if model.get_encoder().reverse_attention is None:
        raise ValueError("This model has no reverse attention (`use_reverse_attention=False`): no u_p / u_n tokens.")
    visual_features, grid = features or feature_grid(model, pixel_values)
    if encoder_outputs is None:
        encoder_outputs = model.get_encoder()(visual_features=visual_features, return_dict=True)
    weights = token_cross_attention(model, encoder_outputs, generated_ids)  # (S, T, 2N + k)
    token_maps = patch_maps_from_memory_weights(weights, pixel_values.shape[1], grid)  # (S, T, V, h, w)
    return group_sentences(token_maps, generated_ids, processor)


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap without matplotlib: values in `[0, 1]` `(H, W)` -> uint8 RGB `(H, W, 3)`."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green and blue peak at these values
    rgb = np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """
    Draw a feature-map heatmap over an image.

    Args:
        image (`PIL.Image.Image`): the view (any mode; converted to RGB).
        heatmap (`np.ndarray` of shape `(h, w)`): one view's map, e.g. `reverse_attention_maps(...)["positive"][0][1]`.
        alpha (`float`, *optional*, defaults to 0.5): opacity of the heatmap.

    Returns:
        `PIL.Image.Image`: an RGB image of the input's size; the map is min-max scaled and upsampled bilinearly.
    """
    image = image.convert("RGB")
    heatmap = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    if heatmap.ndim != 2:
        raise ValueError(f"`heatmap` must have shape (h, w); got {tuple(heatmap.shape)}.")
    upsampled = torch.nn.functional.interpolate(
        heatmap[None, None], size=(image.height, image.width), mode="bilinear", align_corners=False
    )[0, 0]  # (H, W)
    low, high = upsampled.min(), upsampled.max()
    scaled = ((upsampled - low) / (high - low)).numpy() if high > low else np.zeros(upsampled.shape, np.float32)
    colored = Image.fromarray(heatmap_colors(scaled), mode="RGB")
    return Image.blend(image, colored, alpha)


__all__ = [
    "feature_grid",
    "group_sentences",
    "overlay_heatmap",
    "patch_maps_from_memory_weights",
    "received_attention",
    "reverse_attention_maps",
    "sentence_cross_attention_maps",
    "token_cross_attention",
]
