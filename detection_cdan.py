"""
Semi-supervised lesion detection for D2R-Net-style reports: a Faster R-CNN with an FPN, trained Unbiased-Teacher
style on a few images with boxes and many without, and the boxes it writes for the report model.

References:
- D2R-Net (J Imaging Inform Med 2025): boxes from a Faster R-CNN R50-FPN trained with Unbiased Teacher v2 on
  VinDr-CXR's lesion classes (labelled) and MIMIC-CXR images (unlabelled); EMA 0.9996, pseudo-box score >= 0.89.
- Unbiased Teacher (Liu et al., ICLR 2021) and v2 (CVPR 2022): burn-in on the labelled images, then a teacher copied
  from the student and updated as its exponential moving average; the teacher's confident boxes on weakly augmented
  unlabelled images supervise the student on strongly augmented versions; a focal classification loss against the
  class imbalance of pseudo-labels; only the classification losses (RPN objectness, ROI classifier) learn from
  pseudo-boxes, whose coordinates are not trusted for regression.
- Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN (Lin et al., CVPR 2017); focal loss (Lin et al., ICCV 2017).

Why torchvision and not transformers' `AutoModelForObjectDetection`: D2R-Net's detector is a Faster R-CNN R50-FPN,
which torchvision implements (`torchvision.models.detection.FasterRCNN`), while the object detectors of transformers
are DETR-family set-prediction models (DETR, Deformable DETR, RT-DETR, ...), a different detector with a different
training recipe. torchvision's model also takes variable box counts and images with no box.

Boxes are `x_min, y_min, x_max, y_max` in pixels of the image given to the detector; class indices are 1-based
(0 is torchvision's background) into a label vocabulary. A trained detector is saved as its state dict beside a small
JSON of its build arguments and labels ([`save_detector`], [`load_detector`]), and [`predict_box_file`] streams a data
set's images through it into the box file the IU X-Ray and MIMIC-CXR builders read (`boxes_file`).
"""

import copy
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm.auto import tqdm

from data_cdan.boxes import PSEUDO, LesionBox

BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50")
"""Detector backbones: `tiny` (a small FPN built here, for CPU demos and tests) and ResNet FPNs (`resnet50` is
D2R-Net's)."""

SUPERVISED, SEMI_SUPERVISED = "supervised", "semi_supervised"
TRAINING_MODES = (SUPERVISED, SEMI_SUPERVISED)

UNSUPERVISED_LOSSES = ("loss_objectness", "loss_classifier")
"""The losses learnt from pseudo-boxes (Unbiased Teacher: classification only, no box regression)."""

DETECTOR_WEIGHTS_NAME = "detector.pt"
DETECTOR_CONFIG_NAME = "detector_config.json"
"""The files [`save_detector`] writes: the state dict, and the build arguments with the labels in class order."""


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


class TinyFpnBackbone(nn.Module):
    """
    A small convolutional backbone with an FPN, randomly initialised, for CPU demos and tests.

    Args:
        channels (`Sequence[int]`, *optional*, defaults to `(16, 32, 64, 96)`): widths of the stages; each stage
            halves the resolution (the first by 4), and the last three feed the FPN (strides 8, 16, 32).
        out_channels (`int`, *optional*, defaults to 64): FPN width.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 96), out_channels: int = 64):
        super().__init__()
        stages, in_channels = [], 3
        for index, width in enumerate(channels):
            stride = 4 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(list(channels[1:]), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, pixel_values: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        hidden_states = pixel_values  # (B, 3, H, W)
        features = OrderedDict()
        for index, stage in enumerate(self.stages):
            hidden_states = stage(hidden_states)
            if index > 0:
                features[str(index - 1)] = hidden_states
        return self.fpn(features)  # "0".."2" and "pool", each (B, out_channels, h, w)


class FocalRoIHeads(RoIHeads):
    """
    torchvision's `RoIHeads` whose training classification loss is the softmax focal loss
    `mean((1 - p_t) ** gamma * cross_entropy)` over the sampled proposals (`gamma=0` is torchvision's cross-entropy);
    the box regression loss and inference are unchanged. Only the box branch is handled (no masks, no keypoints).

    Args:
        gamma (`float`): the focusing parameter.
        **kwargs: `RoIHeads` arguments.
    """

    def __init__(self, gamma: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.gamma = gamma

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, gamma: float) -> "FocalRoIHeads":
        """The same heads (modules shared, settings copied) with the focal classification loss."""
        return cls(
            gamma=gamma,
            box_roi_pool=heads.box_roi_pool,
            box_head=heads.box_head,
            box_predictor=heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
        )

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)  # (R, C), (R, 4 C)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        loss_classifier = focal_loss(class_logits, torch.cat(labels), self.gamma)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """
    Softmax focal loss, averaged over the rows.

    Args:
        logits (`torch.Tensor` of shape `(N, C)`): class scores.
        labels (`torch.LongTensor` of shape `(N,)`): the true class of each row.
        gamma (`float`): the focusing parameter; 0 gives the cross-entropy.
    """
    cross_entropy = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    true_probability = torch.exp(-cross_entropy)
    return ((1.0 - true_probability) ** gamma * cross_entropy).mean()


def _resnet_fpn_backbone(name: str, pretrained: bool) -> nn.Module:
    from torchvision.models import get_model_weights
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    weights = get_model_weights(name).IMAGENET1K_V1 if pretrained else None
    try:
        return resnet_fpn_backbone(backbone_name=name, weights=weights, trainable_layers=5 if weights is None else 3)
    except OSError as error:  # urllib's URLError is an OSError
        raise OSError(
            f"Could not load the ImageNet weights of {name} ({error}). They are downloaded once by torchvision into "
            f"{torch.hub.get_dir()}/checkpoints; offline, copy the file there, or pass pretrained_backbone=False to "
            "train from a random initialisation."
        ) from error


def build_detector(
    num_classes: int,
    backbone: str = "tiny",
    pretrained_backbone: bool = False,
    image_size: int = 256,
    focal_gamma: float | None = None,
) -> FasterRCNN:
    """
    A Faster R-CNN with an FPN for `num_classes` lesion classes.

    Args:
        num_classes (`int`): lesion classes (the model adds the background class 0).
        backbone (`str`, *optional*, defaults to `"tiny"`): one of `BACKBONES`; `"resnet50"` is D2R-Net's R50-FPN.
        pretrained_backbone (`bool`, *optional*, defaults to `False`): start a ResNet from its ImageNet weights
            (downloaded by torchvision; a clear error offline).
        image_size (`int`, *optional*, defaults to 256): the side the detector resizes images to (and maps its boxes
            back from).
        focal_gamma (`float`, *optional*): use the focal classification loss ([`FocalRoIHeads`]) with this gamma.

    Returns:
        `FasterRCNN`: in training mode it takes images and targets and returns losses; in eval mode it returns
        `boxes` (in pixels of the given images), `labels` and `scores` per image.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    if backbone == "tiny":
        if pretrained_backbone:
            raise ValueError("The tiny backbone has no pretrained weights; pass pretrained_backbone=False.")
        features = TinyFpnBackbone()
        anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
        model = FasterRCNN(
            features,
            min_size=image_size,
            max_size=image_size,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(features.out_channels * 7 * 7, 256),
            box_predictor=FastRCNNPredictor(256, num_classes + 1),
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=200,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100,
            box_batch_size_per_image=64,
        )
    else:
        anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
        model = FasterRCNN(
            _resnet_fpn_backbone(backbone, pretrained_backbone),
            num_classes=num_classes + 1,
            min_size=image_size,
            max_size=image_size,
            rpn_anchor_generator=anchors,
        )
    if focal_gamma is not None:
        model.roi_heads = FocalRoIHeads.from_roi_heads(model.roi_heads, focal_gamma)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Samples and augmentation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionSample:
    """
    One image for the detector.

    Args:
        image (`torch.ByteTensor` of shape `(H, W)`): the greyscale image.
        boxes (`torch.Tensor` of shape `(N, 4)`): `xyxy` in pixels of `image` (empty for none / unlabelled).
        labels (`torch.LongTensor` of shape `(N,)`): 1-based class indices.
        key (`dict`): where the image comes from (e.g. study id, image index, view), copied into the box file.
    """

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    key: dict[str, Any]


def sample_from_boxes(
    image: Any, boxes: Iterable[LesionBox], vocabulary: Sequence[str], key: Mapping[str, Any]
) -> DetectionSample:
    """
    A [`DetectionSample`] from a greyscale image and its boxes.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`): the image (PIL images are converted to "L").
        boxes (`Iterable[LesionBox]`): its boxes, in its pixels.
        vocabulary (`Sequence[str]`): the labels in class order (class `i + 1` is `vocabulary[i]`); a box label
            outside it is an error.
        key (`Mapping[str, Any]`): where the image comes from (see [`DetectionSample`]).
    """
    pixels = torch.from_numpy(np.array(image.convert("L") if hasattr(image, "convert") else image, dtype=np.uint8))
    index = {label: position + 1 for position, label in enumerate(vocabulary)}
    boxes = list(boxes)
    unknown = sorted({box.label for box in boxes} - set(index))
    if unknown:
        raise ValueError(f"Box labels {unknown} are not in the vocabulary {list(vocabulary)}.")
    return DetectionSample(
        image=pixels,
        boxes=torch.tensor([box.xyxy for box in boxes], dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor([index[box.label] for box in boxes], dtype=torch.int64),
        key=dict(key),
    )


def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """A `(H, W)` uint8 image as the detector's `(3, H, W)` float input in [0, 1]."""
    return (image.float() / 255.0).unsqueeze(0).expand(3, -1, -1).contiguous()


def weak_augment(
    image: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Random horizontal flip (probability 0.5), boxes flipped with the image.

    Args:
        image (`torch.Tensor` of shape `(C, H, W)`): the image.
        boxes (`torch.Tensor` of shape `(N, 4)`): its boxes, `xyxy` in pixels.
        generator (`torch.Generator`): the random stream.
    """
    if torch.rand((), generator=generator) < 0.5:
        return image, boxes
    width = image.shape[-1]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), flipped


def strong_augment(image: torch.Tensor, generator: torch.Generator, cutouts: int = 3) -> torch.Tensor:
    """
    Photometric strong augmentation that moves no box: brightness and contrast jitter, Gaussian blur (half of the
    time), then `cutouts` erased rectangles (5-15 % of each side, filled with noise).

    Args:
        image (`torch.Tensor` of shape `(C, H, W)`): the image in [0, 1].
        generator (`torch.Generator`): the random stream.
        cutouts (`int`, *optional*, defaults to 3): how many rectangles to erase.

    Returns:
        `torch.Tensor` of shape `(C, H, W)`: a new image.
    """
    brightness, contrast, blur, sigma = torch.rand(4, generator=generator).tolist()
    mean = image.mean()
    image = ((image - mean) * (0.6 + 0.8 * contrast) + mean + 0.4 * (brightness - 0.5)).clamp(0.0, 1.0)
    if blur < 0.5:
        sigma = 0.3 + 1.2 * sigma
        radius = max(1, math.ceil(2 * sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=image.dtype) / sigma) ** 2)
        taps /= taps.sum()
        channels = image.shape[0]
        padded = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="replicate")
        padded = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        image = F.conv2d(padded, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]
    image = image.clone()
    height, width = image.shape[-2:]
    for _ in range(cutouts):
        size_x, size_y, left, top = torch.rand(4, generator=generator).tolist()
        cut_width, cut_height = max(1, int(width * (0.05 + 0.1 * size_x))), max(1, int(height * (0.05 + 0.1 * size_y)))
        column, row = int(left * (width - cut_width)), int(top * (height - cut_height))
        noise = torch.rand((1, cut_height, cut_width), generator=generator, dtype=image.dtype)
        image[:, row : row + cut_height, column : column + cut_width] = noise
    return image


# --------------------------------------------------------------------------------------------------------------------
# Teacher-student
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """
    `teacher = decay * teacher + (1 - decay) * student` for every floating-point parameter and buffer (BatchNorm
    statistics included); integer buffers (e.g. `num_batches_tracked`) are copied from the student.

    Args:
        teacher (`nn.Module`): updated in place.
        student (`nn.Module`): the same architecture.
        decay (`float`): in [0, 1]; 0.9996 in Unbiased Teacher and D2R-Net.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(student_state[name].detach(), alpha=1.0 - decay)
        else:
            value.copy_(student_state[name])


def pseudo_targets(
    predictions: Sequence[Mapping[str, torch.Tensor]], threshold: float
) -> list[dict[str, torch.Tensor]]:
    """
    The teacher's detections kept as pseudo-boxes: those scoring at least `threshold` (0.89 in D2R-Net).

    Args:
        predictions (`Sequence[Mapping[str, torch.Tensor]]`): per image `boxes (N, 4)`, `labels (N,)`, `scores (N,)`.
        threshold (`float`): the score threshold.

    Returns:
        `list[dict[str, torch.Tensor]]`: per image `boxes` and `labels`, possibly empty.
    """
    targets = []
    for prediction in predictions:
        keep = prediction["scores"] >= threshold
        targets.append({"boxes": prediction["boxes"][keep].detach(), "labels": prediction["labels"][keep].detach()})
    return targets


@dataclass
class TeacherStudentConfig:
    """
    Training settings.

    Args:
        mode (`str`): `"supervised"` (labelled images only) or `"semi_supervised"` (Unbiased Teacher).
        iterations (`int`): optimiser steps in all.
        burn_in (`int`): supervised steps before the teacher is made (semi-supervised mode).
        batch_size (`int`): labelled images per step (and as many unlabelled ones after burn-in).
        learning_rate (`float`), weight_decay (`float`): SGD with momentum 0.9.
        ema_decay (`float`): the teacher's EMA decay (0.9996 in D2R-Net; smaller for short runs).
        pseudo_threshold (`float`): pseudo-box score threshold (0.89 in D2R-Net).
        unsupervised_weight (`float`): weight of the pseudo-box losses.
        seed (`int`): seed of the batches and augmentations.
    """

    mode: str = SEMI_SUPERVISED
    iterations: int = 300
    burn_in: int = 100
    batch_size: int = 4
    learning_rate: float = 0.01
    weight_decay: float = 1e-4
    ema_decay: float = 0.9996
    pseudo_threshold: float = 0.89
    unsupervised_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in TRAINING_MODES:
            raise ValueError(f"mode must be one of {TRAINING_MODES}, got {self.mode!r}.")
        if not 0 <= self.burn_in <= self.iterations:
            raise ValueError(f"burn_in must be in [0, iterations={self.iterations}], got {self.burn_in}.")


def _batch(samples: Sequence[DetectionSample], generator: torch.Generator, size: int) -> list[DetectionSample]:
    picks = torch.randint(len(samples), (size,), generator=generator).tolist()
    return [samples[index] for index in picks]


def _weak_views(batch: Sequence[DetectionSample], generator: torch.Generator):
    images, targets = [], []
    for sample in batch:
        image, boxes = weak_augment(to_model_input(sample.image), sample.boxes, generator)
        images.append(image)
        targets.append({"boxes": boxes, "labels": sample.labels})
    return images, targets


def train_teacher_student(
    model: FasterRCNN,
    labelled: Sequence[DetectionSample],
    unlabelled: Sequence[DetectionSample],
    config: TeacherStudentConfig,
) -> tuple[FasterRCNN, list[dict[str, float]]]:
    """
    Trains `model` (the student) on `labelled` images, and in semi-supervised mode also on `unlabelled` images with
    the pseudo-boxes of an EMA teacher.

    Every step takes `batch_size` labelled images (weak augmentation, all four Faster R-CNN losses). From step
    `burn_in` on (semi-supervised mode), the teacher is a copy of the student, kept in eval mode and updated by
    [`ema_update`] after every step; each step also takes `batch_size` unlabelled images, weakly augmented, whose
    teacher detections scoring at least `pseudo_threshold` become targets for the student on a strong augmentation
    ([`strong_augment`]) of the same weak view, through the classification losses `UNSUPERVISED_LOSSES` only.

    Args:
        model (`FasterRCNN`): the student, trained in place.
        labelled (`Sequence[DetectionSample]`): images with their boxes (images without a box are negatives).
        unlabelled (`Sequence[DetectionSample]`): images whose boxes are ignored.
        config (`TeacherStudentConfig`): the settings.

    Returns:
        `(detector, history)`: the model to evaluate (the teacher in semi-supervised mode, as in Unbiased Teacher,
        else the student) in eval mode, and per step the losses and the number of pseudo-boxes.
    """
    if not labelled:
        raise ValueError("No labelled image to train on.")
    semi_supervised = config.mode == SEMI_SUPERVISED
    if semi_supervised and not unlabelled:
        raise ValueError("Semi-supervised training needs unlabelled images.")
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    warmup = max(1, min(50, config.iterations // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    teacher, history = None, []
    model.train()
    progress = tqdm(range(config.iterations), desc=f"detector ({config.mode})", unit="step")
    for step in progress:
        if semi_supervised and step == config.burn_in:
            teacher = copy.deepcopy(model).eval()
            teacher.requires_grad_(False)
        images, targets = _weak_views(_batch(labelled, generator, config.batch_size), generator)
        losses = model(images, targets)
        loss = sum(losses.values())
        record = {name: value.item() for name, value in losses.items()}
        if teacher is not None:
            weak_images, _ = _weak_views(_batch(unlabelled, generator, config.batch_size), generator)
            with torch.no_grad():
                pseudo = pseudo_targets(teacher(weak_images), config.pseudo_threshold)
            strong_images = [strong_augment(image, generator) for image in weak_images]
            unsupervised = model(strong_images, pseudo)
            loss = loss + config.unsupervised_weight * sum(unsupervised[name] for name in UNSUPERVISED_LOSSES)
            record.update({f"unsupervised_{name}": unsupervised[name].item() for name in UNSUPERVISED_LOSSES})
            record["pseudo_boxes"] = float(sum(len(target["boxes"]) for target in pseudo))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()
        schedule.step()
        if teacher is not None:
            ema_update(teacher, model, config.ema_decay)
        record["loss"] = loss.item()
        history.append(record)
        progress.set_postfix(loss=f"{record['loss']:.3f}")
    detector = teacher if teacher is not None else model
    return detector.eval(), history


# --------------------------------------------------------------------------------------------------------------------
# Prediction, evaluation and the box file
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: FasterRCNN, samples: Sequence[DetectionSample], batch_size: int = 8, description: str = "detecting"
) -> list[dict[str, torch.Tensor]]:
    """The detections (`boxes`, `labels`, `scores`) of `model` in eval mode on each sample, in order."""
    model.eval()
    predictions = []
    for start in tqdm(range(0, len(samples), batch_size), desc=description, unit="batch"):
        images = [to_model_input(sample.image) for sample in samples[start : start + batch_size]]
        predictions.extend(model(images))
    return predictions


def average_precision(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    ground_truths: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """
    PASCAL VOC-style average precision per class (all-point interpolation, VOC 2010 onwards).

    For each class, the detections of all images are ranked by score; each is a true positive if it overlaps a
    not-yet-matched ground-truth box of its class and image by IoU >= `iou_threshold` (the best-overlapping such
    box), else a false positive (a second detection of a matched box included). AP is the area under the
    precision-recall curve made monotone (precision at recall r = the best precision at any recall >= r).

    Args:
        predictions (`Sequence[Mapping[str, torch.Tensor]]`): per image `boxes (N, 4)`, `labels (N,)`, `scores (N,)`.
        ground_truths (`Sequence[Mapping[str, torch.Tensor]]`): per image `boxes (M, 4)`, `labels (M,)`.
        num_classes (`int`): classes are 1..`num_classes`.
        iou_threshold (`float`, *optional*, defaults to 0.5): the matching IoU.

    Returns:
        `dict[int, float]`: class -> AP, for the classes with at least one ground-truth box (AP is undefined
        without one); the mean of its values is the mAP.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} images.")
    results = {}
    for label in range(1, num_classes + 1):
        truths = [truth["boxes"][truth["labels"] == label] for truth in ground_truths]
        total = sum(len(boxes) for boxes in truths)
        if total == 0:
            continue
        detections = []  # (score, image, box)
        for image, prediction in enumerate(predictions):
            mask = prediction["labels"] == label
            for score, box in zip(prediction["scores"][mask].tolist(), prediction["boxes"][mask]):
                detections.append((score, image, box))
        detections.sort(key=lambda detection: -detection[0])
        matched = [torch.zeros(len(boxes), dtype=torch.bool) for boxes in truths]
        hits = []
        for _, image, box in detections:
            if len(truths[image]) == 0:
                hits.append(False)
                continue
            overlaps = box_iou(box.unsqueeze(0), truths[image])[0]  # (M,)
            overlaps[matched[image]] = -1.0
            best = int(overlaps.argmax())
            hit = bool(overlaps[best] >= iou_threshold)
            if hit:
                matched[image][best] = True
            hits.append(hit)
        true_positives = torch.tensor(hits, dtype=torch.float64).cumsum(0)
        recall = torch.cat([torch.zeros(1, dtype=torch.float64), true_positives / total])
        precision = true_positives / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        precision = torch.cat([torch.ones(1, dtype=torch.float64), precision])
        envelope = precision.flip(0).cummax(0).values.flip(0)
        results[label] = float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())
    return results


def write_box_file(
    path: str | os.PathLike,
    samples: Sequence[DetectionSample],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    vocabulary: Sequence[str],
) -> int:
    """
    Writes the detections as a JSON-lines box file: one line per image, its `key` fields (e.g. `study_id`,
    `split`, `image_index`, `view`), `image_size` `[width, height]`, and `boxes`, a list of [`BOX_FEATURES`] dicts
    (`x_min, y_min, x_max, y_max` in pixels of that image, `label`, `score`, `source="pseudo"`), best score first.

    Returns:
        `int`: the number of boxes written.
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} images.")
    count = 0
    with open(path, "w", encoding="utf-8") as file:
        for sample, prediction in zip(samples, predictions):
            record = box_file_record(sample, prediction, vocabulary)
            count += len(record["boxes"])
            file.write(json.dumps(record) + "\n")
    return count


def box_file_record(
    sample: DetectionSample, prediction: Mapping[str, torch.Tensor], vocabulary: Sequence[str]
) -> dict[str, Any]:
    """One line of the box file (see [`write_box_file`]): the sample's key, `image_size` and its boxes, best first."""
    order = prediction["scores"].argsort(descending=True)
    boxes = [
        LesionBox(
            *prediction["boxes"][index].tolist(),
            label=vocabulary[int(prediction["labels"][index]) - 1],
            score=float(prediction["scores"][index]),
            source=PSEUDO,
        ).to_row()
        for index in order.tolist()
    ]
    height, width = sample.image.shape
    return {**sample.key, "image_size": [width, height], "boxes": boxes}


@torch.no_grad()
def predict_box_file(
    model: FasterRCNN,
    samples: Iterable[DetectionSample],
    vocabulary: Sequence[str],
    path: str | os.PathLike,
    batch_size: int = 8,
    total: int | None = None,
) -> dict[str, int]:
    """
    Streams images through the detector into a box file (the format of [`write_box_file`]), `batch_size` at a time,
    so that a data set of any size never sits in memory. The file is written to `<path>.partial` and renamed when
    complete (and removed on an error), so an interrupted run leaves no truncated box file behind.

    Args:
        model (`FasterRCNN`): the detector (put in eval mode).
        samples (`Iterable[DetectionSample]`): the images (their boxes are ignored), e.g. a generator over a data set.
        vocabulary (`Sequence[str]`): the labels in class order.
        path (`str` or `os.PathLike`): the box file to write.
        batch_size (`int`, *optional*, defaults to 8): images per forward pass.
        total (`int`, *optional*): the number of images, for the progress bar.

    Returns:
        `dict[str, int]`: `images` and `boxes` written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    model.eval()
    counts = {"images": 0, "boxes": 0}
    try:
        with open(partial, "w", encoding="utf-8") as file, tqdm(total=total, desc="box file", unit="image") as bar:
            for batch in _chunks(samples, batch_size):
                predictions = model([to_model_input(sample.image) for sample in batch])
                for sample, prediction in zip(batch, predictions):
                    record = box_file_record(sample, prediction, vocabulary)
                    file.write(json.dumps(record) + "\n")
                    counts["boxes"] += len(record["boxes"])
                counts["images"] += len(batch)
                bar.update(len(batch))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return counts


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------


def save_detector(
    model: FasterRCNN,
    directory: str | os.PathLike,
    labels: Sequence[str],
    backbone: str = "tiny",
    image_size: int = 256,
    focal_gamma: float | None = None,
) -> Path:
    """
    Save a detector built by [`build_detector`]: its state dict (`DETECTOR_WEIGHTS_NAME`) and its build arguments
    with the labels in class order (`DETECTOR_CONFIG_NAME`), enough for [`load_detector`] to rebuild it offline.

    Args:
        model (`FasterRCNN`): the detector.
        directory (`str` or `os.PathLike`): the folder to write (created if needed).
        labels (`Sequence[str]`): the label vocabulary (class `i + 1` is `labels[i]`).
        backbone, image_size, focal_gamma: the arguments `model` was built with (see [`build_detector`]).

    Returns:
        `Path`: the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"labels": list(labels), "backbone": backbone, "image_size": image_size, "focal_gamma": focal_gamma}
    torch.save(model.state_dict(), directory / DETECTOR_WEIGHTS_NAME)
    (directory / DETECTOR_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return directory


def load_detector(directory: str | os.PathLike) -> tuple[FasterRCNN, list[str]]:
    """
    A detector saved by [`save_detector`], on the CPU in eval mode, with its labels.

    Args:
        directory (`str` or `os.PathLike`): the folder holding `DETECTOR_WEIGHTS_NAME` and `DETECTOR_CONFIG_NAME`.

    Returns:
        `(detector, labels)`: the model, and its labels in class order.

    Raises:
        `FileNotFoundError`: a file is missing (named). `ValueError`: the JSON lacks a setting, or the weights do not
            fit the model it describes.
    """
    directory = Path(directory)
    for name in (DETECTOR_CONFIG_NAME, DETECTOR_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} not found: a saved detector folder holds {DETECTOR_CONFIG_NAME} and "
                f"{DETECTOR_WEIGHTS_NAME} (written by save_detector, e.g. by scripts/train_detector.py)."
            )
    settings = json.loads((directory / DETECTOR_CONFIG_NAME).read_text(encoding="utf-8"))
    missing = [name for name in ("labels", "backbone", "image_size") if name not in settings]
    if missing:
        raise ValueError(f"{directory / DETECTOR_CONFIG_NAME} lacks {', '.join(map(repr, missing))}.")
    labels = list(settings["labels"])
    model = build_detector(
        len(labels),
        backbone=settings["backbone"],
        image_size=settings["image_size"],
        focal_gamma=settings.get("focal_gamma"),
    )
    state_dict = torch.load(directory / DETECTOR_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(
            f"The weights in {directory / DETECTOR_WEIGHTS_NAME} do not fit the detector {directory} describes: "
            f"{error}"
        ) from error
    return model.eval(), labels


__all__ = [
    "BACKBONES",
    "DETECTOR_CONFIG_NAME",
    "DETECTOR_WEIGHTS_NAME",
    "SEMI_SUPERVISED",
    "SUPERVISED",
    "TRAINING_MODES",
    "UNSUPERVISED_LOSSES",
    "DetectionSample",
    "FocalRoIHeads",
    "TeacherStudentConfig",
    "TinyFpnBackbone",
    "average_precision",
    "box_file_record",
    "build_detector",
    "ema_update",
    "focal_loss",
    "load_detector",
    "predict",
    "predict_box_file",
    "pseudo_targets",
    "sample_from_boxes",
    "save_detector",
    "strong_augment",
    "to_model_input",
    "train_teacher_student",
    "weak_augment",
    "write_box_file",
]
