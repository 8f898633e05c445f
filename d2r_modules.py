"""Building blocks of D2R-Net: the global image branch (CPCA on the backbone map), the lesion branch (RoIAlign or
crop-and-encode, lesion-area enhancement, a small CNN), the text encoder of the alignment, and the image-text matching
of the global and local alignment blocks (GAB, LAB) with the sentence-to-box grounding scores they imply.

The modules take plain sizes rather than a configuration class, like `priorrg_modules`, and reuse its CBAM channel
and spatial attention.

References:
1) Tang et al., "From Detection to Radiology Report Generation: Fine-Grained Multi-Modal Alignment with
   Semi-Supervised Learning", J Imaging Inform Med 2025, doi:10.1007/s10278-025-01650-z, and its partial public code
   (github.com/cloneiq/D2R-Net: `modulesS/visual_extractor.py`, `modulesS/CPCA.py`, `modulesS/text_extractor.py`).
   The lesion-area enhancement (LERA) and the alignment blocks are not public; what is reconstructed here is said
   beside the code that does it.
2) Huang et al., "Channel prior convolutional attention for medical image segmentation", Computers in Biology and
   Medicine 2024, arXiv:2306.05196 (CPCA).
3) Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018: the channel and spatial gates of
   `LesionAreaEnhancement` and the channel attention of CPCA (`priorrg_modules.ChannelAttention`, `SpatialAttention`).
4) He et al., "Mask R-CNN", ICCV 2017: RoIAlign (`torchvision.ops.roi_align`, `aligned=True` for the half-pixel
   correction of Detectron2).
5) He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, and Goyal et al., "Accurate, Large Minibatch
   SGD", 2017: the bottleneck residual branch whose last BatchNorm starts at zero (timm's `zero_init_last`).
6) Lee et al., "Stacked Cross Attention for Image-Text Matching" (SCAN), ECCV 2018: text-to-image attention with
   inverse temperature `smoothing` (their lambda_1 = 9) and average pooling of word relevances.
7) Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018: the hinge triplet loss
   with the hardest in-batch negative (margin 0.2).
8) Devlin et al., "BERT", NAACL 2019: the text encoder (any `PreTrainedModel` returning `last_hidden_state`).

Shapes: `B` studies, `K` box slots per study (padded), `R` valid boxes of a batch, `C` channels, `h x w` the backbone
map, `H x W` the pixel values, `S` sentences (padded) or pooled size, `L` tokens, `D` the joint embedding width.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init

try:
    from .configuration_cdan import LESION_FEATURE_MODES
    from .consistency_cdan import split_sentences
    from .priorrg_modules import ChannelAttention, SpatialAttention
except ImportError:
    from configuration_cdan import LESION_FEATURE_MODES
    from consistency_cdan import split_sentences
    from priorrg_modules import ChannelAttention, SpatialAttention


CROP_ENCODER_CHANNELS = (64, 128, 256, 512)
"""Widths of the first four convolutions of the crop encoder; the fifth gives the embedding (D2R-Net's
`SimpleConvNet`: 64, 128, 256, 512, 1024)."""

STRIP_KERNEL_SIZES = (7, 11, 21)
"""CPCA's strip-convolution branches: `1 x k` then `k x 1` depthwise convolutions."""

COSINE_EPS = 1e-8
"""Floor of a vector norm in the relevance cosine (as `torch.nn.functional.cosine_similarity`)."""

REDUCTIONS = ("sum", "mean")
"""Reductions of `hardest_negative_triplet_loss` over the valid studies."""


class ChannelPriorConvolutionalAttention(nn.Module):
    """
    Channel prior convolutional attention (CPCA, Huang et al. 2023) as D2R-Net's global branch applies it to the
    ResNet-101 map:

    1. a 1x1 convolution and GELU (CPCA's block input, present in the public module too);
    2. channel attention from average- and max-pooled descriptors through a shared MLP, multiplied onto the map:
       the channel prior `F_c`;
    3. spatial attention from multi-scale depthwise convolutions of `F_c`: a `5 x 5` convolution, whose output is
       summed with three strip branches on it (`1 x 7`/`7 x 1`, `1 x 11`/`11 x 1`, `1 x 21`/`21 x 1`), then a 1x1
       convolution that mixes channels; the result (no sigmoid, as in CPCA) multiplies `F_c`;
    4. a 1x1 output convolution.

    Differences from the public module (`modulesS/CPCA.py`): it applies one and the same 1x1 convolution at steps 1, 3
    and 4; here they are three convolutions, as the paper draws them. Its channel attention adds two sigmoids
    (`sigmoid(MLP(avg)) + sigmoid(MLP(max))`, with biases); here it is CBAM's `sigmoid(MLP(avg) + MLP(max))`, which
    the paper's text ("processed by a shared MLP and added") also describes, through the repository's
    `priorrg_modules.ChannelAttention`.

    Args:
        channels (`int`): Channels of the input and output map (2048 for ResNet-101).
        reduction (`int`, *optional*, defaults to 4): Reduction of the channel-attention MLP (CPCA's default).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.input_projection = nn.Conv2d(channels, channels, kernel_size=1)
        self.activation = nn.GELU()
        self.channel_attention = ChannelAttention(channels, reduction)
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size=5, padding=2, groups=channels)
        self.strip_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=(1, size), padding=(0, size // 2), groups=channels),
                nn.Conv2d(channels, channels, kernel_size=(size, 1), padding=(size // 2, 0), groups=channels),
            )
            for size in STRIP_KERNEL_SIZES
        )
        self.channel_mixing = nn.Conv2d(channels, channels, kernel_size=1)
        self.output_projection = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, channels, height, width)`): The backbone map.

        Returns:
            `torch.Tensor` of shape `(batch_size, channels, height, width)`.
        """
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.channels:
            raise ValueError(
                f"CPCA expects a map of shape (batch, {self.channels}, height, width); "
                f"got {tuple(hidden_states.shape)}."
            )
        hidden_states = self.activation(self.input_projection(hidden_states))  # (B, C, h, w)
        channel_prior = hidden_states * self.channel_attention(hidden_states)  # (B, C, h, w)
        local_context = self.depthwise_conv(channel_prior)  # (B, C, h, w)
        multi_scale = local_context + sum(strip_conv(local_context) for strip_conv in self.strip_convs)
        spatial_attention = self.channel_mixing(multi_scale)  # (B, C, h, w)
        return self.output_projection(spatial_attention * channel_prior)  # (B, C, h, w)


class LesionAreaEnhancement(nn.Module):
    """
    Lesion-area enhancement (LERA) of pooled box regions. D2R-Net's module is not public (its code imports
    `modulesS/LERA.py`, which the repository lacks, as `LERA(in_features=3, filters=3)` on RGB crops); this is a
    reconstruction from its description, "enhance the lesion area of each region before encoding it":

    `x + BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(g))))))))`, with `g = SA(CA(x) x) CA(x) x` gated by CBAM's
    channel attention (`CA`) and then spatial attention (`SA`), so the branch works on the channels and pixels that
    look like lesion. Assumptions, each a choice of ours:

    - the enhancement is residual and the branch is a ResNet bottleneck (`1x1`, `3x3`, `1x1`; the width is
      `channels // reduction`, at least `min(channels, 64)`, so three RGB channels keep three);
    - its last BatchNorm starts at zero weight, so the block is exactly the identity at initialisation and learns
      an enhancement from there (its weight gets a gradient from the first step). A host `_init_weights` that resets
      BatchNorm weights to 1 must call [`~LesionAreaEnhancement.reset_parameters`] afterwards to keep this;
    - BatchNorm, as in D2R-Net's region CNN: while training, its statistics run over the valid boxes of the batch.

    Args:
        channels (`int`): Channels of the regions (the backbone's, or 3 for RGB crops).
        reduction (`int`, *optional*, defaults to 4): Reduction of the channel-attention MLP and the bottleneck.
        kernel_size (`int`, *optional*, defaults to 7): Kernel of the spatial attention (CBAM's).
    """

    def __init__(self, channels: int, reduction: int = 4, kernel_size: int = 7):
        super().__init__()
        self.channels = channels
        bottleneck_channels = max(channels // reduction, min(channels, 64))
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)
        self.reduce = nn.Conv2d(channels, bottleneck_channels, kernel_size=1, bias=False)
        self.reduce_norm = nn.BatchNorm2d(bottleneck_channels)
        self.conv = nn.Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, padding=1, bias=False)
        self.conv_norm = nn.BatchNorm2d(bottleneck_channels)
        self.expand = nn.Conv2d(bottleneck_channels, channels, kernel_size=1, bias=False)
        self.expand_norm = nn.BatchNorm2d(channels)
        self.activation = nn.ReLU()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the last BatchNorm's weight so that the block is the identity (for a host `_init_weights`)."""
        init.zeros_(self.expand_norm.weight)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """
        Args:
            regions (`torch.Tensor` of shape `(num_regions, channels, size, size)`): Pooled box regions.

        Returns:
            `torch.Tensor` of shape `(num_regions, channels, size, size)`: the enhanced regions.
        """
        if regions.ndim != 4 or regions.shape[1] != self.channels:
            raise ValueError(
                f"LERA expects regions of shape (regions, {self.channels}, size, size); got {tuple(regions.shape)}."
            )
        gated = regions * self.channel_attention(regions)  # (R, C, S, S)
        gated = gated * self.spatial_attention(gated)  # (R, C, S, S)
        enhancement = self.activation(self.reduce_norm(self.reduce(gated)))  # (R, C', S, S)
        enhancement = self.activation(self.conv_norm(self.conv(enhancement)))  # (R, C', S, S)
        enhancement = self.expand_norm(self.expand(enhancement))  # (R, C, S, S)
        return regions + enhancement


class GlobalImageEmbedding(nn.Module):
    """
    D2R-Net's global branch after the backbone: CPCA on the map, a 1x1 convolution (no bias) to the joint width, and
    the map flattened to patch features, row-major (`modulesS/visual_extractor.py`). The patch mean is D2R-Net's
    average feature: `patch_features.mean(dim=1)`.

    Args:
        in_channels (`int`): Channels of the backbone map (2048 for ResNet-101).
        embed_size (`int`): Width of the joint embedding (D2R-Net: 1024).
        reduction (`int`, *optional*, defaults to 4): CPCA's channel-attention reduction.
    """

    def __init__(self, in_channels: int, embed_size: int, reduction: int = 4):
        super().__init__()
        self.attention = ChannelPriorConvolutionalAttention(in_channels, reduction)
        self.embedding = nn.Conv2d(in_channels, embed_size, kernel_size=1, bias=False)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """
        Args:
            feature_map (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): The backbone map.

        Returns:
            `torch.Tensor` of shape `(batch_size, height * width, embed_size)`: patch features, row-major.
        """
        patch_features = self.embedding(self.attention(feature_map))  # (B, D, h, w)
        return patch_features.flatten(2).transpose(1, 2)  # (B, h*w, D)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A convolution (no bias, "same" padding for odd kernels), BatchNorm and ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class LesionEncoder(nn.Module):
    """
    D2R-Net's lesion branch: each box of a study becomes one lesion feature, pooled from the box, enhanced by
    [`LesionAreaEnhancement`] and encoded by a small CNN with global average pooling and a linear projection.

    Two ways to pool a box, both bilinear (`torchvision.ops.roi_align`, `aligned=True`, adaptive sampling):

    - `"roi_align"` (default, ours): the box is pooled from the backbone map to `roi_size x roi_size`; the CNN is a
      `1x1` convolution to `embed_size` and a `3x3` convolution, each with BatchNorm and ReLU. The box is mapped
      to the map per axis, `x * w / W` and `y * h / H` (`spatial_scale = h / H` when the two agree).
    - `"crop"` (D2R-Net's): the box is cut from the pixel values and resized to `crop_size x crop_size`, then
      D2R-Net's five convolutions (`3x3`, widths 64, 128, 256, 512, `embed_size`, strides 1, 2, 2, 2, 2, BatchNorm
      and ReLU) encode it. The public code crops the original image with boxes scaled to the resized one; here the
      crop is taken in the frame of the tensor it reads, so boxes and pixels always agree. Its convolutions have no
      padding; here they pad by one, so that crops smaller than 64 pixels still encode.

    Boxes are `x_min, y_min, x_max, y_max` in pixels of an image of size `image_size` (the pixel values' size as a
    rule; a box in the original image's pixels with `image_size` the original size works too). Only the valid boxes
    are pooled and encoded; padded slots are exact zeros and cost nothing. The final linear layer (ours) lets the
    features take any sign before they are L2-normalised for the alignment, like the `1x1` embedding of the global
    branch (D2R-Net's region CNN ends at the ReLU and the pooling).

    Args:
        in_channels (`int`): Channels read per box: the backbone map's in `"roi_align"` mode, the pixel values' (3)
            in `"crop"` mode.
        embed_size (`int`): Width of a lesion feature (D2R-Net: 1024).
        mode (`str`, *optional*, defaults to `"roi_align"`): `"roi_align"` or `"crop"`.
        roi_size (`int`, *optional*, defaults to 7): Pooled size in `"roi_align"` mode (Faster R-CNN's 7).
        crop_size (`int`, *optional*, defaults to 64): Crop size in `"crop"` mode.
    """

    def __init__(
        self, in_channels: int, embed_size: int, mode: str = "roi_align", roi_size: int = 7, crop_size: int = 64
    ):
        super().__init__()
        if mode not in LESION_FEATURE_MODES:
            raise ValueError(f"`mode` must be one of {LESION_FEATURE_MODES}; got {mode!r}.")
        if roi_size < 1 or crop_size < 1:
            raise ValueError(f"`roi_size` and `crop_size` must be positive; got {roi_size} and {crop_size}.")
        self.in_channels, self.embed_size, self.mode = in_channels, embed_size, mode
        self.output_size = roi_size if mode == "roi_align" else crop_size
        self.enhancement = LesionAreaEnhancement(in_channels)
        if mode == "roi_align":
            layers = conv_bn_relu(in_channels, embed_size, kernel_size=1) + conv_bn_relu(embed_size, embed_size, 3)
        else:
            widths = (in_channels, *CROP_ENCODER_CHANNELS, embed_size)
            strides = (1,) + (2,) * len(CROP_ENCODER_CHANNELS)
            layers = [
                layer
                for in_width, out_width, stride in zip(widths[:-1], widths[1:], strides)
                for layer in conv_bn_relu(in_width, out_width, kernel_size=3, stride=stride)
            ]
        self.encoder = nn.Sequential(*layers)
        self.projection = nn.Linear(embed_size, embed_size)

    def pool_regions(
        self, boxes: torch.Tensor, box_mask: torch.Tensor, image_size: tuple[int, int], source: torch.Tensor
    ) -> torch.Tensor:
        """
        Bilinear RoIAlign of the valid boxes from `source` (the backbone map or the pixel values).

        Args:
            boxes (`torch.Tensor` of shape `(batch_size, num_boxes, 4)`): `x_min, y_min, x_max, y_max` in pixels of
                an image of size `image_size`, in the dtype of `source`.
            box_mask (`torch.Tensor` of shape `(batch_size, num_boxes)`, bool): True for real boxes.
            image_size (`tuple[int, int]`): `(height, width)` of the boxes' frame.
            source (`torch.Tensor` of shape `(batch_size, channels, height, width)`): What to pool from.

        Returns:
            `torch.Tensor` of shape `(num_valid_boxes, channels, output_size, output_size)`, in the row-major order
            of `box_mask`.
        """
        image_height, image_width = image_size
        source_height, source_width = source.shape[-2:]
        scale = boxes.new_tensor([source_width / image_width, source_height / image_height]).repeat(2)  # (4,)
        study_index = box_mask.nonzero()[:, 0]  # (R,)
        rois = torch.cat([study_index[:, None].to(boxes.dtype), boxes[box_mask] * scale], dim=1)  # (R, 5)
        return roi_align(source, rois, output_size=self.output_size, spatial_scale=1.0, aligned=True)  # (R, C, S, S)

    def _check_inputs(
        self,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        image_size: tuple[int, int],
        source: torch.Tensor | None,
    ) -> None:
        source_name = "feature_map" if self.mode == "roi_align" else "pixel_values"
        if source is None:
            raise ValueError(f"`LesionEncoder(mode={self.mode!r})` pools boxes from `{source_name}`; pass it.")
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"`boxes` must have shape (batch, num_boxes, 4); got {tuple(boxes.shape)}.")
        if box_mask.shape != boxes.shape[:2]:
            raise ValueError(f"`box_mask` must have shape {tuple(boxes.shape[:2])}; got {tuple(box_mask.shape)}.")
        if source.ndim != 4 or source.shape[0] != boxes.shape[0] or source.shape[1] != self.in_channels:
            raise ValueError(
                f"`{source_name}` must have shape ({boxes.shape[0]}, {self.in_channels}, height, width) to match the "
                f"boxes and `in_channels`; got {tuple(source.shape)}."
            )
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"`image_size` must be a positive (height, width); got {image_size}.")
        valid_boxes = boxes[box_mask]  # (R, 4)
        if not torch.isfinite(valid_boxes).all():
            raise ValueError("`boxes` has a non-finite coordinate in a slot that `box_mask` marks as a real box.")
        if (valid_boxes[:, 2:] < valid_boxes[:, :2]).any():
            raise ValueError("`boxes` must be x_min, y_min, x_max, y_max with x_max >= x_min and y_max >= y_min.")

    def forward(
        self,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        image_size: tuple[int, int],
        feature_map: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            boxes (`torch.Tensor` of shape `(batch_size, num_boxes, 4)`): `x_min, y_min, x_max, y_max` in pixels of
                the image (of size `image_size`); any values in padded slots.
            box_mask (`torch.Tensor` of shape `(batch_size, num_boxes)`): True (or 1) for real boxes.
            image_size (`tuple[int, int]`): `(height, width)` of the image the boxes are given in, normally
                `pixel_values.shape[-2:]`.
            feature_map (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`, *optional*): The backbone
                map; needed in `"roi_align"` mode.
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`, *optional*): The
                images; needed in `"crop"` mode.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_boxes, embed_size)`: one feature per box, exact zeros in padded
            slots.
        """
        source = feature_map if self.mode == "roi_align" else pixel_values
        box_mask = box_mask.bool()
        self._check_inputs(boxes, box_mask, image_size, source)
        boxes = boxes.to(source.dtype)
        batch_size, num_boxes = box_mask.shape
        lesion_features = source.new_zeros(batch_size, num_boxes, self.embed_size)  # (B, K, D)
        if not box_mask.any():
            return lesion_features
        regions = self.pool_regions(boxes, box_mask, image_size, source)  # (R, C, S, S)
        regions = self.encoder(self.enhancement(regions))  # (R, D, S', S')
        lesion_features[box_mask] = self.projection(regions.mean(dim=(2, 3)))  # (R, D) into the valid slots
        return lesion_features


class TextAlignmentEncoder(nn.Module):
    """
    The text side of D2R-Net's alignment (`modulesS/text_extractor.py`): a BERT-family encoder's token states, a
    linear projection to the joint width and L2 normalisation (SCAN's `no_txtnorm=False`). D2R-Net tokenises reports
    with `bert-base-uncased`; any `PreTrainedModel` returning `last_hidden_state` fits. The public code takes the
    valid lengths from the padding; here `attention_mask` gives them, and padded positions are exact zeros.

    With `freeze_text_model` (the default; D2R-Net does not say whether it fine-tunes BERT), the text model gets no
    gradient, runs without autograd and stays in eval mode (no dropout) when the host trains; the projection trains.

    Args:
        text_model (`PreTrainedModel`): The text encoder, e.g. `AutoModel.from_pretrained(...)`.
        embed_size (`int`): Width of the joint embedding (D2R-Net: 1024).
        freeze_text_model (`bool`, *optional*, defaults to `True`): Keep the text model's weights fixed.
    """

    def __init__(self, text_model: PreTrainedModel, embed_size: int, freeze_text_model: bool = True):
        super().__init__()
        self.text_model = text_model
        self.freeze_text_model = freeze_text_model
        self.projection = nn.Linear(text_model.config.hidden_size, embed_size)
        if freeze_text_model:
            self.text_model.requires_grad_(False)
            self.text_model.eval()

    def train(self, mode: bool = True) -> "TextAlignmentEncoder":
        super().train(mode)
        if self.freeze_text_model:
            self.text_model.eval()
        return self

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, **text_model_kwargs) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(num_texts, num_tokens)`): Tokenised texts (reports or sentences).
            attention_mask (`torch.Tensor` of shape `(num_texts, num_tokens)`): The tokenizer's mask.
            text_model_kwargs: Passed to the text model (e.g. `token_type_ids`).

        Returns:
            `torch.Tensor` of shape `(num_texts, num_tokens, embed_size)`: unit-norm token states, zeros at padding.
        """
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids`, {tuple(input_ids.shape)}; got "
                f"{tuple(attention_mask.shape)}."
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text_model):
            outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **text_model_kwargs)
        token_states = F.normalize(self.projection(outputs.last_hidden_state), dim=-1)  # (N, L, D)
        return token_states * attention_mask[..., None].to(token_states.dtype)


def _check_text_and_regions(
    text_states: torch.Tensor, text_mask: torch.Tensor, region_states: torch.Tensor, region_mask: torch.Tensor
) -> None:
    if text_states.ndim != 3 or text_mask.shape != text_states.shape[:2]:
        raise ValueError(
            "`text_states` must be (texts, tokens, dim) with `text_mask` (texts, tokens); got "
            f"{tuple(text_states.shape)} and {tuple(text_mask.shape)}."
        )
    if region_states.ndim != 3 or region_mask.shape != region_states.shape[:2]:
        raise ValueError(
            "`region_states` must be (images, regions, dim) with `region_mask` (images, regions); got "
            f"{tuple(region_states.shape)} and {tuple(region_mask.shape)}."
        )
    if text_states.shape[-1] != region_states.shape[-1]:
        raise ValueError(
            f"Text and regions must share the embedding width; got {text_states.shape[-1]} and "
            f"{region_states.shape[-1]}."
        )


def _unit_rows(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of `states` `(N, T, D)` where `mask` `(N, T)` is True; exact zeros elsewhere, whatever
    was there (NaN included), with a norm floor that float16 can hold."""
    states = states.masked_fill(~mask[..., None], 0.0)
    return F.normalize(states, dim=-1, eps=max(1e-12, torch.finfo(states.dtype).tiny))


def stacked_cross_attention_similarity(
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    region_states: torch.Tensor,
    region_mask: torch.Tensor,
    smoothing: float = 9.0,
    return_attention: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    SCAN's text-to-image similarity of every text with every image (Lee et al. 2018, "t-i", average pooling):

    1. each word `e_l` attends to the image's regions `v_k`: `a_lk = softmax_k(smoothing * cos(e_l, v_k))` over the
       valid regions;
    2. its attended image vector is `a_l = sum_k a_lk v_k` and its relevance `cos(e_l, a_l)`;
    3. the similarity is the mean relevance over the text's valid words.

    Both sides are L2-normalised here (again). Masked words and regions are zeroed before anything else, so their
    values (even NaN) never reach the result; a text without valid words, or an image without valid regions, scores
    0. SCAN's extra normalisation of the cosines across words (leaky ReLU, then L2 over the words) is left out: the
    attention is the softmax of the scaled cosines, which also makes each word's weights the grounding scores of
    [`sentence_box_scores`]. The attended vectors are never built: `|a_l|^2 = a_l^T G a_l` with the regions' Gram
    matrix `G`, so memory is `texts x images x tokens x regions`, not `x dim`.

    Args:
        text_states (`torch.Tensor` of shape `(num_texts, num_tokens, dim)`): Token states.
        text_mask (`torch.Tensor` of shape `(num_texts, num_tokens)`): True (or 1) for valid tokens.
        region_states (`torch.Tensor` of shape `(num_images, num_regions, dim)`): Region (patch or lesion) features.
        region_mask (`torch.Tensor` of shape `(num_images, num_regions)`): True (or 1) for valid regions.
        smoothing (`float`, *optional*, defaults to 9.0): Inverse softmax temperature (SCAN's lambda_1 for t-i).
        return_attention (`bool`, *optional*, defaults to `False`): Also return the attention weights.

    Returns:
        `torch.Tensor` of shape `(num_texts, num_images)`: the similarities; with `return_attention`, also the
        weights `(num_texts, num_images, num_tokens, num_regions)`, zero at masked words and regions.
    """
    _check_text_and_regions(text_states, text_mask, region_states, region_mask)
    text_mask, region_mask = text_mask.bool(), region_mask.bool()
    text = _unit_rows(text_states, text_mask)  # (Nt, L, D)
    regions = _unit_rows(region_states, region_mask)  # (Nr, R, D)
    cosine = torch.einsum("tld,rkd->trlk", text, regions)  # (Nt, Nr, L, R)

    region_pair_mask = region_mask[None, :, None, :]  # (1, Nr, 1, R)
    logits = (smoothing * cosine).masked_fill(~region_pair_mask, torch.finfo(cosine.dtype).min)
    # An image without valid regions gets a uniform softmax over finite values, zeroed by the masks.
    attention = logits.softmax(dim=-1) * region_pair_mask * text_mask[:, None, :, None]  # (Nt, Nr, L, R)

    dot = (attention * cosine).sum(dim=-1)  # (Nt, Nr, L): e_l . a_l
    gram = regions @ regions.transpose(1, 2)  # (Nr, R, R)
    attended_sq_norm = (torch.einsum("trlk,rkm->trlm", attention, gram) * attention).sum(dim=-1)  # (Nt, Nr, L)
    sq_norm_floor = max(COSINE_EPS**2, torch.finfo(attended_sq_norm.dtype).tiny)  # 1e-16 underflows in float16
    relevance = dot / attended_sq_norm.clamp_min(sq_norm_floor).sqrt()  # (Nt, Nr, L): cos(e_l, a_l)

    word_counts = text_mask.sum(dim=-1).clamp_min(1).to(relevance.dtype)  # (Nt,)
    similarity = relevance.sum(dim=-1) / word_counts[:, None]  # (Nt, Nr); masked words have zero relevance
    if return_attention:
        return similarity, attention
    return similarity


def hardest_negative_triplet_loss(
    similarity: torch.Tensor, margin: float = 0.2, valid: torch.Tensor | None = None, reduction: str = "sum"
) -> torch.Tensor:
    """
    VSE++'s hinge triplet loss with the hardest in-batch negative (Faghri et al. 2018), in both directions: for each
    valid study `i`, `max_j [margin + s(i, j) - s(i, i)]_+` over the other valid columns plus
    `max_j [margin + s(j, i) - s(i, i)]_+` over the other valid rows.

    Args:
        similarity (`torch.Tensor` of shape `(batch_size, batch_size)`): `s(text_i, image_j)`, positives on the
            diagonal.
        margin (`float`, *optional*, defaults to 0.2): The hinge margin (VSE++, SCAN).
        valid (`torch.Tensor` of shape `(batch_size,)`, bool, *optional*): Studies that take part, as anchors and as
            negatives; all when `None`. Fewer than two valid studies give a zero loss (still part of the graph).
        reduction (`str`, *optional*, defaults to `"sum"`): `"sum"` over the valid studies (VSE++ and SCAN) or
            `"mean"`.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"`similarity` must be a square (batch, batch) matrix; got {tuple(similarity.shape)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}; got {reduction!r}.")
    batch_size = similarity.shape[0]
    if valid is None:
        valid = torch.ones(batch_size, dtype=torch.bool, device=similarity.device)
    elif valid.shape != (batch_size,):
        raise ValueError(f"`valid` must have shape ({batch_size},); got {tuple(valid.shape)}.")
    valid = valid.bool()
    if batch_size == 0:
        return similarity.sum()
    is_self = torch.eye(batch_size, dtype=torch.bool, device=similarity.device)
    negative_pairs = valid[:, None] & valid[None, :] & ~is_self  # (B, B)
    positives = similarity.diagonal()  # (B,)
    text_anchor_costs = (margin + similarity - positives[:, None]).clamp_min(0.0).masked_fill(~negative_pairs, 0.0)
    image_anchor_costs = (margin + similarity - positives[None, :]).clamp_min(0.0).masked_fill(~negative_pairs, 0.0)
    costs = text_anchor_costs.amax(dim=1) + image_anchor_costs.amax(dim=0)  # (B,), zero for invalid studies
    if reduction == "mean":
        return costs.sum() / valid.sum().clamp_min(1)
    return costs.sum()


def global_alignment_loss(
    report_states: torch.Tensor,
    report_mask: torch.Tensor,
    patch_states: torch.Tensor,
    margin: float = 0.2,
    smoothing: float = 9.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """
    D2R-Net's global alignment block (GAB), reconstructed: SCAN text-to-image similarity between each report's tokens
    and each study's global patch features, trained with VSE++'s hardest-negative triplet loss. Reports without a
    valid token are left out.

    Args:
        report_states (`torch.Tensor` of shape `(batch_size, num_tokens, dim)`): [`TextAlignmentEncoder`] states.
        report_mask (`torch.Tensor` of shape `(batch_size, num_tokens)`): The tokenizer's mask.
        patch_states (`torch.Tensor` of shape `(batch_size, num_patches, dim)`): [`GlobalImageEmbedding`] output.
        margin (`float`, *optional*, defaults to 0.2): The hinge margin.
        smoothing (`float`, *optional*, defaults to 9.0): SCAN's inverse temperature.
        reduction (`str`, *optional*, defaults to `"sum"`): See [`hardest_negative_triplet_loss`].

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    patch_mask = torch.ones(patch_states.shape[:2], dtype=torch.bool, device=patch_states.device)  # (B, P)
    similarity = stacked_cross_attention_similarity(
        report_states, report_mask, patch_states, patch_mask, smoothing
    )  # (B, B)
    return hardest_negative_triplet_loss(similarity, margin, report_mask.bool().any(dim=1), reduction)


def local_alignment_loss(
    sentence_states: torch.Tensor,
    sentence_mask: torch.Tensor,
    lesion_states: torch.Tensor,
    lesion_mask: torch.Tensor,
    margin: float = 0.2,
    smoothing: float = 9.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """
    D2R-Net's local alignment block (LAB), reconstructed: every sentence of a report is matched with every study's
    lesions by SCAN text-to-image similarity, and the study-level similarity `S(text_i, image_j)` is the mean over
    report `i`'s sentences of `SCAN(sentence, lesions_j)`; VSE++'s hardest-negative triplet loss trains it.

    Studies without a box or without a sentence (a sentence is a row of `sentence_mask` with a valid token) take no
    part, neither as anchors nor as negatives; with fewer than two valid studies the loss is zero, without NaN, and
    still part of the graph. Only the valid sentences are encoded against the lesions.

    Args:
        sentence_states (`torch.Tensor` of shape `(batch_size, num_sentences, num_tokens, dim)`): Token states of
            each report's sentences, padded.
        sentence_mask (`torch.Tensor` of shape `(batch_size, num_sentences, num_tokens)`): Valid tokens.
        lesion_states (`torch.Tensor` of shape `(batch_size, num_boxes, dim)`): [`LesionEncoder`] output.
        lesion_mask (`torch.Tensor` of shape `(batch_size, num_boxes)`): Real boxes.
        margin (`float`, *optional*, defaults to 0.2): The hinge margin.
        smoothing (`float`, *optional*, defaults to 9.0): SCAN's inverse temperature.
        reduction (`str`, *optional*, defaults to `"sum"`): See [`hardest_negative_triplet_loss`].

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if sentence_states.ndim != 4 or sentence_mask.shape != sentence_states.shape[:3]:
        raise ValueError(
            "`sentence_states` must be (batch, sentences, tokens, dim) with `sentence_mask` (batch, sentences, "
            f"tokens); got {tuple(sentence_states.shape)} and {tuple(sentence_mask.shape)}."
        )
    if lesion_states.shape[0] != sentence_states.shape[0]:
        raise ValueError(
            f"Sentences and lesions must come from the same studies; got batches {sentence_states.shape[0]} and "
            f"{lesion_states.shape[0]}."
        )
    batch_size = sentence_states.shape[0]
    sentence_mask, lesion_mask = sentence_mask.bool(), lesion_mask.bool()
    has_words = sentence_mask.any(dim=-1)  # (B, S)
    report_index = has_words.nonzero()[:, 0]  # (Ns,): the report of each valid sentence
    sentence_similarity = stacked_cross_attention_similarity(
        sentence_states[has_words], sentence_mask[has_words], lesion_states, lesion_mask, smoothing
    )  # (Ns, B)
    study_similarity = sentence_similarity.new_zeros(batch_size, batch_size).index_add(
        0, report_index, sentence_similarity
    )  # (B, B): sums over each report's sentences
    sentence_counts = has_words.sum(dim=1)  # (B,)
    study_similarity = study_similarity / sentence_counts.clamp_min(1)[:, None].to(study_similarity.dtype)
    valid = (sentence_counts > 0) & lesion_mask.any(dim=1)  # (B,)
    return hardest_negative_triplet_loss(study_similarity, margin, valid, reduction)


def sentence_box_scores(
    sentence_states: torch.Tensor,
    sentence_mask: torch.Tensor,
    lesion_states: torch.Tensor,
    lesion_mask: torch.Tensor,
    smoothing: float = 9.0,
) -> torch.Tensor:
    """
    Grounding of one study's sentences on its boxes, from the local alignment: a sentence's score for a box is the
    mean over the sentence's valid words of their text-to-region attention weight on it (the softmax over the valid
    boxes of `smoothing * cosine` in [`stacked_cross_attention_similarity`]). A sentence's scores sum to 1 over the
    valid boxes; padded boxes score exactly 0, and so does every box for a sentence without valid words or a study
    without boxes.

    Args:
        sentence_states (`torch.Tensor` of shape `(num_sentences, num_tokens, dim)`): Token states of the sentences.
        sentence_mask (`torch.Tensor` of shape `(num_sentences, num_tokens)`): Valid tokens.
        lesion_states (`torch.Tensor` of shape `(num_boxes, dim)`): The study's lesion features.
        lesion_mask (`torch.Tensor` of shape `(num_boxes,)`): Real boxes.
        smoothing (`float`, *optional*, defaults to 9.0): SCAN's inverse temperature.

    Returns:
        `torch.Tensor` of shape `(num_sentences, num_boxes)`.
    """
    if lesion_states.ndim != 2 or lesion_mask.shape != lesion_states.shape[:1]:
        raise ValueError(
            "`lesion_states` must be (boxes, dim) with `lesion_mask` (boxes,); got "
            f"{tuple(lesion_states.shape)} and {tuple(lesion_mask.shape)}."
        )
    _, attention = stacked_cross_attention_similarity(
        sentence_states, sentence_mask, lesion_states[None], lesion_mask[None], smoothing, return_attention=True
    )  # (S, 1, L, K)
    word_counts = sentence_mask.bool().sum(dim=-1).clamp_min(1).to(attention.dtype)  # (S,)
    return attention[:, 0].sum(dim=1) / word_counts[:, None]  # (S, K)


ALIGNMENT_TEXT_INPUTS = (
    "report_text_input_ids",
    "report_text_attention_mask",
    "sentence_input_ids",
    "sentence_attention_mask",
)
"""The training-only model inputs of the alignment blocks (see [`alignment_text_inputs`])."""


def alignment_text_inputs(
    tokenizer, reports: Sequence[str], max_sentences: int = 8, max_length: int = 64
) -> dict[str, torch.Tensor]:
    """
    The alignment blocks' text inputs for a batch of cleaned reference reports: the whole report for GAB and its
    sentences (`consistency_cdan.split_sentences`) for LAB, tokenised by the text encoder's tokenizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the alignment text encoder's tokenizer (the processor's
            `context_tokenizer`).
        reports (`Sequence[str]`): one cleaned report per study.
        max_sentences (`int`, *optional*, defaults to 8): sentences kept per report (the first ones); a report with
            none gets an all-zero mask row, which LAB leaves out.
        max_length (`int`, *optional*, defaults to 64): tokens per report or sentence (truncated).

    Returns:
        `dict` with `report_text_input_ids` / `report_text_attention_mask` `(B, L)` and `sentence_input_ids` /
        `sentence_attention_mask` `(B, S, L')`.
    """
    report_tokens = tokenizer(list(reports), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    sentences = [split_sentences(report)[:max_sentences] for report in reports]
    num_sentences = max(1, max(len(report_sentences) for report_sentences in sentences))
    flat = [sentence for report_sentences in sentences for sentence in report_sentences] or [""]
    sentence_tokens = tokenizer(flat, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    length = sentence_tokens["input_ids"].shape[1]
    sentence_input_ids = torch.zeros(len(reports), num_sentences, length, dtype=torch.long)
    sentence_attention_mask = torch.zeros(len(reports), num_sentences, length, dtype=torch.long)
    position = 0
    for study, report_sentences in enumerate(sentences):
        count = len(report_sentences)
        sentence_input_ids[study, :count] = sentence_tokens["input_ids"][position : position + count]
        sentence_attention_mask[study, :count] = sentence_tokens["attention_mask"][position : position + count]
        position += count
    return {
        "report_text_input_ids": report_tokens["input_ids"],
        "report_text_attention_mask": report_tokens["attention_mask"],
        "sentence_input_ids": sentence_input_ids,
        "sentence_attention_mask": sentence_attention_mask,
    }


class ImageTextAlignment(nn.Module):
    """
    D2R-Net's two alignment blocks around one text encoder: GAB (report <-> patch features) and LAB (sentences <->
    lesion features), and the grounding of sentences on boxes that LAB's attention gives. Used by
    `D2RNetForConditionalGeneration` and by CDAN with `use_lesion_alignment`.

    The losses are averaged over the valid studies (`reduction="mean"`), so their weight does not grow with the batch
    size; the public SCAN/VSE++ loss sums over the batch (multiply `lambda_alignment` by the batch size to match it).

    Args:
        text_model (`PreTrainedModel`): the BERT-family text encoder.
        embed_size (`int`): width of the image features it is matched with.
        freeze_text_model (`bool`, *optional*, defaults to `True`): see [`TextAlignmentEncoder`].
        margin (`float`, *optional*, defaults to 0.2): the triplet margin.
        smoothing (`float`, *optional*, defaults to 9.0): the word-to-region attention's inverse temperature.
    """

    def __init__(
        self,
        text_model: PreTrainedModel,
        embed_size: int,
        freeze_text_model: bool = True,
        margin: float = 0.2,
        smoothing: float = 9.0,
    ):
        super().__init__()
        self.text_encoder = TextAlignmentEncoder(text_model, embed_size, freeze_text_model=freeze_text_model)
        self.margin, self.smoothing = margin, smoothing

    @classmethod
    def from_text_config(cls, text_config: dict, embed_size: int, **kwargs) -> "ImageTextAlignment":
        """A randomly initialised text encoder of `text_config` (an `AutoConfig` dict with `model_type`)."""
        text_config = dict(text_config)
        text_model = AutoModel.from_config(AutoConfig.for_model(text_config.pop("model_type"), **text_config))
        return cls(text_model, embed_size, **kwargs)

    def load_text_model(self, name_or_path: str, num_tokens: int | None = None) -> None:
        """
        Load pre-trained weights into the text encoder (a local folder, or a Hub id when online), and resize its
        token embeddings to `num_tokens` (the tokenizer's length, when it has added tokens).
        """
        text_model = self.text_encoder.text_model
        try:  # the first `num_hidden_layers` layers, as many as this encoder has
            pretrained = AutoModel.from_pretrained(name_or_path, num_hidden_layers=text_model.config.num_hidden_layers)
        except OSError as error:
            raise OSError(
                f"Could not load the alignment text encoder from {name_or_path!r}: {error}\nOffline, pass a local "
                "folder (train.py: `--context_text_encoder offline-minilm` uses the packaged all-MiniLM-L6-v2)."
            ) from error
        text_model.load_state_dict(pretrained.state_dict())
        if num_tokens is not None and num_tokens != text_model.config.vocab_size:
            text_model.resize_token_embeddings(num_tokens)
        if self.text_encoder.freeze_text_model:
            text_model.requires_grad_(False)

    def losses(
        self,
        patch_embeddings: torch.Tensor | None,
        lesion_embeddings: torch.Tensor | None,
        lesion_mask: torch.Tensor | None,
        report_text_input_ids: torch.LongTensor | None = None,
        report_text_attention_mask: torch.LongTensor | None = None,
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """GAB's and LAB's losses, each `None` without its text inputs (or, for LAB, without lesion features)."""
        global_loss = local_loss = None
        if report_text_input_ids is not None:
            report_states = self.text_encoder(report_text_input_ids, report_text_attention_mask)  # (B, L, D)
            global_loss = global_alignment_loss(
                report_states, report_text_attention_mask.bool(), patch_embeddings, self.margin, self.smoothing,
                reduction="mean",
            )  # fmt: skip
        if sentence_input_ids is not None and lesion_embeddings is not None:
            batch_size, num_sentences = sentence_input_ids.shape[:2]
            sentence_states = self.text_encoder(
                sentence_input_ids.flatten(0, 1), sentence_attention_mask.flatten(0, 1)
            )
            local_loss = local_alignment_loss(
                sentence_states.unflatten(0, (batch_size, num_sentences)),  # (B, S, L, D)
                sentence_attention_mask.bool(), lesion_embeddings, lesion_mask, self.margin, self.smoothing,
                reduction="mean",
            )  # fmt: skip
        return global_loss, local_loss

    @torch.no_grad()
    def ground(
        self,
        lesion_embeddings: torch.Tensor,
        lesion_mask: torch.Tensor,
        sentence_input_ids: torch.LongTensor,
        sentence_attention_mask: torch.LongTensor,
    ) -> torch.Tensor:
        """
        Grounding scores of one study's sentences on its boxes (see [`sentence_box_scores`]).

        Args:
            lesion_embeddings (`torch.Tensor` of shape `(num_boxes, dim)`), lesion_mask (`(num_boxes,)`): the study's
                lesion features and which are real boxes.
            sentence_input_ids, sentence_attention_mask (`torch.LongTensor` of shape `(num_sentences, length)`).

        Returns:
            `torch.Tensor` of shape `(num_sentences, num_boxes)`: per sentence a distribution over the real boxes.
        """
        sentence_states = self.text_encoder(sentence_input_ids, sentence_attention_mask)  # (S, L, D)
        return sentence_box_scores(
            sentence_states, sentence_attention_mask.bool(), lesion_embeddings, lesion_mask.bool(), self.smoothing
        )


__all__ = [
    "ALIGNMENT_TEXT_INPUTS",
    "CROP_ENCODER_CHANNELS",
    "STRIP_KERNEL_SIZES",
    "ChannelPriorConvolutionalAttention",
    "GlobalImageEmbedding",
    "ImageTextAlignment",
    "LesionAreaEnhancement",
    "LesionEncoder",
    "TextAlignmentEncoder",
    "alignment_text_inputs",
    "global_alignment_loss",
    "hardest_negative_triplet_loss",
    "local_alignment_loss",
    "sentence_box_scores",
    "stacked_cross_attention_similarity",
]
