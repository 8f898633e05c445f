"""Procedural, clearly-marked SYNTHETIC chest radiographs rendered from CheXpert-style observation labels.

The demo dataset ships real IU X-Ray (Open-I) report text but no IU X-Ray image (the images may not be
redistributed with this project). Each demo study therefore gets images drawn here from the 14 CheXpert observation
states extracted from its report, so that an image model has something to learn that matches the text. The pictures
are cartoons of a chest radiograph, not simulations of X-ray physics: a density map (air dark, soft tissue grey, bone
and metal bright) is built from analytic shapes in anatomical coordinates, then windowed, gamma-corrected and given
noise. Every image carries the word "SYNTHETIC" burned into its top-left corner (the same pixels in every image, so
it tells nothing about the labels), and `save_png` adds PNG text chunks saying the same.

Label states follow the CheXpert convention (Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with
Uncertainty Labels and Expert Comparison", AAAI 2019): POSITIVE = 1, NEGATIVE = 0, UNCERTAIN = -1 and
NOT_MENTIONED = -2, one state per observation of `configuration_cdan.CHEXPERT_OBSERVATIONS`. A POSITIVE observation
is drawn at full strength; an UNCERTAIN one is always drawn (never at random), at `UNCERTAIN_STRENGTH` = 0.5: at half
the intensity, an effusion at 3/4 of its height, a pneumothorax with ~0.7 of its collapse, and the cardiac silhouette
half way between its normal and its enlarged size; NEGATIVE and NOT_MENTIONED are not drawn, nor is "No Finding"
(it is the absence of the others).

The findings follow the radiographic signs of the Fleischner Society glossary (Hansell et al., "Fleischner Society:
Glossary of Terms for Thoracic Imaging", Radiology 246(3), 2008): the cardiothoracic ratio for cardiomegaly (normal
below ~0.5; Danzer, Am J Med Sci 1919), a widened upper mediastinum, the meniscus of a pleural effusion blunting the
costophrenic angle, the visceral pleural line with no lung markings beyond it for pneumothorax, nodule (< 3 cm)
versus mass, ill-defined airspace opacity, lobar consolidation with air bronchograms, multifocal patchy pneumonia,
plate-like atelectasis with elevation of the hemidiaphragm, perihilar haze with Kerley B lines for interstitial
edema (Kerley, 1933), sternotomy wires / pacemaker / central venous catheter for support devices, a posterior rib
with a cortical gap, a step and a healing callus for a fracture, and pleural thickening along the chest wall. The
fracture is drawn on the frontal view only. Positions, sizes, sides and intensities of the findings vary per study.

Rendering is deterministic for a seed, and the random streams are split by purpose: the anatomy, each observation's
finding and each view's pose / exposure / noise draw from their own streams, so the same seed with and without one
finding gives the same patient, pose and noise with and without that finding.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from os import PathLike
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from PIL.PngImagePlugin import PngInfo

try:
    from .labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN
except ImportError:
    from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN


"""CheXpert label states, as produced by the report labeler."""

UNCERTAIN_STRENGTH = 0.5
"""Strength (0 = absent, 1 = POSITIVE) at which an UNCERTAIN observation is drawn."""

VIEWS = ("frontal", "lateral")
"""Views the renderer draws; the position of a view here also names its random stream."""

SYNTHETIC_MARK_TEXT = "SYNTHETIC"
"""Text burned into the top-left corner of every rendered image."""

PNG_TEXT_CHUNKS = {
    "Synthetic": "true",
    "Description": (
        "SYNTHETIC chest radiograph rendered procedurally by synthetic_cxr.py from labels extracted from report "
        "text. Not a real patient image and not derived from any real radiograph."
    ),
    "Software": "CDAN synthetic_cxr",
}
"""Text chunks written into every PNG saved with `save_png`."""

MIN_IMAGE_SIZE = 64
"""Smallest image side the renderer accepts (the marker needs 56 pixels)."""

_OBSERVATION_INDEX = {name: index for index, name in enumerate(CHEXPERT_OBSERVATIONS)}
_LABEL_STATES = (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED)

# 5 x 7 pixel glyphs of the letters of "SYNTHETIC", so the marker does not depend on the installed fonts.
_GLYPHS = {
    "S": (".###.", "#...#", "#....", ".###.", "....#", "#...#", ".###."),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "N": ("#...#", "##..#", "#.#.#", "#.#.#", "#..##", "#...#", "#...#"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
}


# --------------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------------


def label_strengths(labels: Sequence[int] | Mapping[str, int]) -> np.ndarray:
    """
    Converts CheXpert label states into drawing strengths.

    Args:
        labels (`Sequence[int]` or `Mapping[str, int]`):
            Either one state per observation in `CHEXPERT_OBSERVATIONS` order, or a mapping from observation name to
            state (missing observations are NOT_MENTIONED).

    Returns:
        `np.ndarray` of shape `(len(CHEXPERT_OBSERVATIONS),)`: 1.0 for POSITIVE, `UNCERTAIN_STRENGTH` for UNCERTAIN,
        0.0 for NEGATIVE and NOT_MENTIONED.
    """
    if isinstance(labels, Mapping):
        unknown = set(labels) - set(_OBSERVATION_INDEX)
        if unknown:
            raise ValueError(f"Unknown observations {sorted(unknown)}; expected names from CHEXPERT_OBSERVATIONS.")
        states = [int(labels.get(name, NOT_MENTIONED)) for name in CHEXPERT_OBSERVATIONS]
    else:
        states = [int(state) for state in labels]
        if len(states) != len(CHEXPERT_OBSERVATIONS):
            raise ValueError(f"Expected {len(CHEXPERT_OBSERVATIONS)} label states, got {len(states)}.")
    invalid = [state for state in states if state not in _LABEL_STATES]
    if invalid:
        raise ValueError(f"Label states must be in {_LABEL_STATES}, got {invalid}.")
    state_array = np.asarray(states)
    return np.where(state_array == POSITIVE, 1.0, np.where(state_array == UNCERTAIN, UNCERTAIN_STRENGTH, 0.0))


# --------------------------------------------------------------------------------------------------------------------
# Drawing primitives on an anatomical coordinate grid
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised image coordinates, both of shape `(image_size, image_size)`, in [-1, 1]."""
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) * np.float32(2.0 / image_size) - 1.0
    return np.meshgrid(centres, centres)


@dataclass
class _Canvas:
    """
    One view being drawn (or a rectangular window of it): the anatomical coordinates of every pixel, after the
    view's pose jitter, and the maps the view is composed from.

    `x` grows to the image right (the patient's left on the frontal view, posterior on the lateral view) and `y`
    downwards; the chest spans roughly [-1, 1] in both. `density` is the brightness before exposure (air ~0, soft
    tissue ~0.4, bone and metal higher); `air_loss` is the fraction of lung air replaced by fluid or tissue. `layers`
    are PIL drawings of thin lines and wires, blurred slightly and then added to `density` ("density") or taken off
    `air_loss` ("air", for air bronchograms). `crop` gives a window whose arrays are views into this canvas, so local
    shapes are computed on a few pixels only.
    """

    x: np.ndarray  # (rows, columns)
    y: np.ndarray  # (rows, columns)
    density: np.ndarray  # (rows, columns)
    air_loss: np.ndarray  # (rows, columns)
    image_size: int
    rotation: float
    scale: float
    shift: tuple[float, float]
    window: tuple[slice, slice] = (slice(None), slice(None))
    layers: dict[str, PIL.Image.Image] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, image_size: int, rotation: float, scale: float, shift: tuple[float, float]) -> "_Canvas":
        u, v = _pixel_grid(image_size)
        cosine, sine = float(np.cos(rotation)), float(np.sin(rotation))
        du, dv = u - shift[0], v - shift[1]
        x = (cosine * du + sine * dv) * (1.0 / scale)
        y = (cosine * dv - sine * du) * (1.0 / scale)
        blank = np.zeros((image_size, image_size), dtype=np.float32)
        return cls(x, y, blank, blank.copy(), image_size, rotation, scale, shift)

    @property
    def pixel(self) -> float:
        """Side of one pixel in anatomical units."""
        return 2.0 / (self.image_size * self.scale)

    @property
    def edge(self) -> float:
        """Softness of organ borders: about 1.5 pixels, at least 0.02."""
        return max(0.02, 1.5 * self.pixel)

    def to_pixels(self, points: np.ndarray) -> list[tuple[float, float]]:
        """Maps anatomical points of shape `(n, 2)` to `n` pixel coordinates `(column, row)` of the full view."""
        points = np.asarray(points, dtype=np.float64)
        cosine, sine = np.cos(self.rotation), np.sin(self.rotation)
        u = self.scale * (cosine * points[:, 0] - sine * points[:, 1]) + self.shift[0]
        v = self.scale * (sine * points[:, 0] + cosine * points[:, 1]) + self.shift[1]
        columns, rows = (u + 1.0) / 2.0 * self.image_size - 0.5, (v + 1.0) / 2.0 * self.image_size - 0.5
        return list(zip(columns.tolist(), rows.tolist()))

    def crop(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> "_Canvas":
        """The window of this (full) canvas covering an anatomical box; its arrays are views into this canvas."""
        corners = np.array(self.to_pixels([(x, y) for x in x_range for y in y_range]))
        left, top = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, self.image_size)
        right, bottom = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 3, 0, self.image_size)
        window = (slice(top, max(top, bottom)), slice(left, max(left, right)))
        return _Canvas(
            self.x[window],
            self.y[window],
            self.density[window],
            self.air_loss[window],
            self.image_size,
            self.rotation,
            self.scale,
            self.shift,
            window,
            self.layers,
            self.metadata,
        )

    def draw(self, layer: str = "density") -> PIL.ImageDraw.ImageDraw:
        """A drawing context, in full-view pixel coordinates, on one of the float layers ("density" or "air")."""
        if layer not in self.layers:
            self.layers[layer] = PIL.Image.new("F", (self.image_size, self.image_size), 0.0)
        return PIL.ImageDraw.Draw(self.layers[layer])

    def line_width(self, anatomical_width: float) -> int:
        return max(1, round(anatomical_width / self.pixel))

    def polyline(self, points: np.ndarray, value: float, width: float, layer: str = "density") -> None:
        self.draw(layer).line(self.to_pixels(points), fill=value, width=self.line_width(width), joint="curve")

    def layer(self, name: str) -> np.ndarray | None:
        """The blurred drawing of one layer, or `None` if nothing was drawn on it."""
        if name not in self.layers:
            return None
        return _binomial_blur(np.asarray(self.layers[name], dtype=np.float32))


# The primitives work in place on one fresh array each: at 256 px, memory traffic is most of the rendering time.


def _ramp(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Soft step: 0 below `-softness / 2`, 1 above `softness / 2`, linear between."""
    step = signed_distance * (1.0 / softness)
    step += 0.5
    return np.clip(step, 0.0, 1.0, out=step)


def _squared_radius(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Squared normalised elliptical radius (< 1 inside) of an ellipse turned clockwise by `angle` radians."""
    dx, dy = canvas.x - cx, canvas.y - cy
    if angle:
        cosine, sine = float(np.cos(angle)), float(np.sin(angle))
        dx, dy = cosine * dx + sine * dy, cosine * dy - sine * dx
    dx *= 1.0 / rx
    dy *= 1.0 / ry
    np.square(dx, out=dx)
    dx += np.square(dy, out=dy)
    return dx


def _ellipse_radius(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (< 1 inside) of an ellipse turned clockwise by `angle` radians."""
    squared = _squared_radius(canvas, cx, cy, rx, ry, angle)
    return np.sqrt(squared, out=squared)


def _inside(radius: np.ndarray, size: float, softness: float) -> np.ndarray:
    """Soft inside-mask of an ellipse from its normalised radius; `size` converts radius units to distance."""
    return _ramp((1.0 - radius) * size, softness)


def _ellipse(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1]."""
    return _inside(_ellipse_radius(canvas, cx, cy, rx, ry, angle), min(rx, ry), canvas.edge)


def _gaussian(canvas: _Canvas, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    exponent = _squared_radius(canvas, cx, cy, sx, sy)
    exponent *= -0.5
    return np.exp(exponent, out=exponent)


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Profile of a rod of radius `half_width` seen side-on, from the distance to its axis."""
    profile = distance * (1.0 / half_width)
    np.square(profile, out=profile)
    np.subtract(1.0, profile, out=profile)
    np.clip(profile, 0.0, 1.0, out=profile)
    return np.sqrt(profile, out=profile)


def _smooth_noise(rng: np.random.Generator, image_size: int, cells: int) -> np.ndarray:
    """Band-limited noise of shape `(image_size, image_size)`, zero mean and about unit scale, `cells` blobs a side."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    image = PIL.Image.fromarray(coarse).resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _binomial_blur(array: np.ndarray) -> np.ndarray:
    """3 x 3 binomial smoothing (anti-aliases the drawn lines)."""
    padded = np.pad(array, 1, mode="edge")
    rows = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return 0.25 * rows[:, :-2] + 0.5 * rows[:, 1:-1] + 0.25 * rows[:, 2:]


def _bezier(start: tuple[float, float], control: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Quadratic Bezier curve, shape `(24, 2)`."""
    t = np.linspace(0.0, 1.0, 24)[:, None]
    return (1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * np.array(control) + t**2 * np.array(end)


def _side_range(side: int, near: float, far: float) -> tuple[float, float]:
    """The x range from `near` to `far` from the midline on one side."""
    return (near, far) if side > 0 else (-far, -near)


# --------------------------------------------------------------------------------------------------------------------
# Study-level anatomy and findings (shared by the views of a study)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """Patient geometry in anatomical units; on the frontal view the lungs are centred at x = -+lung_center_x."""

    lung_center_x: float
    lung_center_y: float
    lung_radius_x: float
    lung_radius_y: float
    dome_top: tuple[float, float]  # hemidiaphragm heights under the image-left (patient right) and image-right lung
    cardiothoracic_ratio: float
    heart_base_y: float  # the heart's widest level, on the diaphragm
    heart_tilt: float
    mediastinum_half_width: float
    rib_spacing: float
    rib_shift: float
    body_half_width: float
    soft_tissue: float
    lung_air: float

    hilum_y = -0.02

    @property
    def thoracic_width(self) -> float:
        return 2.0 * (self.lung_center_x + self.lung_radius_x)

    @property
    def heart_width(self) -> float:
        return self.cardiothoracic_ratio * self.thoracic_width

    @property
    def heart_span(self) -> tuple[float, float]:
        """Frontal x of the right and left heart borders: a third right of the midline, two thirds left."""
        return -0.34 * self.heart_width, 0.66 * self.heart_width

    def lung_radius(self, canvas: _Canvas, side: int) -> np.ndarray:
        """Normalised radius (< 1 inside) of the frontal lung outline of `side`, an ellipse narrowed at the apex."""
        taper = np.clip((canvas.y + 0.76) * (0.22 / 0.7), 0.0, 0.22)
        taper += 0.78
        taper *= self.lung_radius_x
        dx = canvas.x - side * self.lung_center_x
        dx /= taper
        np.square(dx, out=dx)
        dx += np.square((canvas.y - self.lung_center_y) * (1.0 / self.lung_radius_y))
        return np.sqrt(dx, out=dx)

    def costophrenic_angle(self, side: int) -> tuple[float, float]:
        """Frontal (x, y) where the lateral lung outline meets the hemidiaphragm of `side`."""
        lateral = np.linspace(0.0, 0.999, 400)
        outline_y = self.lung_center_y + self.lung_radius_y * np.sqrt(1.0 - lateral**2)
        x = side * (self.lung_center_x + lateral * self.lung_radius_x)
        angle = int(np.argmin(np.abs(outline_y - self.dome(x, side))))
        return float(x[angle]), float(outline_y[angle])

    def dome(self, x: np.ndarray | float, side: int) -> np.ndarray | float:
        """Height of the hemidiaphragm under the lung of `side` (-1 image left, +1 image right) at frontal `x`:
        steep towards the costophrenic angle, shallow towards the heart."""
        top = self.dome_top[0 if side < 0 else 1]
        lateral = (x - side * self.lung_center_x) * (side / self.lung_radius_x) - 0.1
        return top + 0.07 * lateral * lateral + 0.19 * np.square(np.maximum(lateral, 0.0))


def _sample_anatomy(rng: np.random.Generator, strengths: np.ndarray, findings: dict[str, dict]) -> _Anatomy:
    """Draws the patient; the cardiac sizes follow the Cardiomegaly and Enlarged Cardiomediastinum strengths."""
    draws = rng.random(15).tolist()
    cardiomegaly = float(strengths[_OBSERVATION_INDEX["Cardiomegaly"]])
    wide_mediastinum = float(strengths[_OBSERVATION_INDEX["Enlarged Cardiomediastinum"]])
    normal_ratio, enlarged_ratio = 0.42 + 0.06 * draws[0], 0.58 + 0.08 * draws[0]
    normal_mediastinum, enlarged_mediastinum = 0.1 + 0.025 * draws[1], 0.19 + 0.04 * draws[1]
    dome_right = 0.34 + 0.08 * draws[2]
    dome_top = [dome_right, dome_right + 0.02 + 0.05 * draws[3]]
    if "Atelectasis" in findings:  # volume loss: the hemidiaphragm under the collapsed lung rises
        atelectasis = findings["Atelectasis"]
        dome_top[0 if atelectasis["side"] < 0 else 1] -= atelectasis["strength"] * atelectasis["elevation"]
    return _Anatomy(
        lung_center_x=0.36 + 0.03 * (draws[4] - 0.5),
        lung_center_y=0.08 + 0.06 * (draws[5] - 0.5),
        lung_radius_x=0.31 + 0.04 * (draws[6] - 0.5),
        lung_radius_y=0.84 + 0.06 * (draws[7] - 0.5),
        dome_top=(dome_top[0], dome_top[1]),
        cardiothoracic_ratio=normal_ratio + cardiomegaly * (enlarged_ratio - normal_ratio),
        heart_base_y=dome_right + 0.04 + 0.04 * (draws[8] - 0.5),
        heart_tilt=0.1 + 0.12 * draws[14],
        mediastinum_half_width=normal_mediastinum + wide_mediastinum * (enlarged_mediastinum - normal_mediastinum),
        rib_spacing=0.13 + 0.014 * (draws[9] - 0.5),
        rib_shift=0.03 * (draws[10] - 0.5),
        body_half_width=0.82 + 0.08 * (draws[11] - 0.5),
        soft_tissue=0.40 + 0.05 * (draws[12] - 0.5),
        lung_air=0.2 + 0.04 * (draws[13] - 0.5),
    )


def _point_in_lung(rng: np.random.Generator, side: int, zone: tuple[float, float]) -> tuple[float, float]:
    """A frontal point (x, y) well inside the lung of `side` of a nominal patient, with y in `zone`."""
    y = float(rng.uniform(*zone))
    half_width = 0.27 * np.sqrt(max(0.0, 1.0 - ((y + 0.05) / 0.72) ** 2))
    return side * (0.38 + float(rng.uniform(-0.3, 0.75)) * half_width), y


def _sample_findings(seed: int, strengths: np.ndarray) -> dict[str, dict]:
    """Study-level parameters of every drawn finding, each from its own random stream."""
    findings: dict[str, dict] = {}
    for index, name in enumerate(CHEXPERT_OBSERVATIONS):
        if strengths[index] > 0 and name in _FINDING_SAMPLERS:
            rng = np.random.default_rng([seed, 1, index])
            findings[name] = {"strength": float(strengths[index]), **_FINDING_SAMPLERS[name](rng)}
    return findings


def _side(rng: np.random.Generator) -> int:
    return -1 if rng.random() < 0.5 else 1


def _sample_lung_opacity(rng: np.random.Generator) -> dict:
    side = _side(rng)
    x, y = _point_in_lung(rng, side, (-0.4, 0.2))
    return {
        "side": side,
        "x": x,
        "y": y,
        "depth": float(rng.uniform(-0.25, 0.25)),
        "sigma": rng.uniform([0.08, 0.09], [0.13, 0.16]).tolist(),
        "air_loss": float(rng.uniform(0.6, 0.8)),
        "texture_seed": int(rng.integers(2**31)),
    }


def _sample_consolidation(rng: np.random.Generator) -> dict:
    side, lower = _side(rng), bool(rng.random() < 0.7)
    return {
        "side": side,
        "lower": lower,
        "fissure_y": float(rng.uniform(0.0, 0.12) if lower else rng.uniform(-0.3, -0.18)),
        "fissure_slope": float(rng.uniform(-0.2, 0.2)),
        "air_loss": float(rng.uniform(0.8, 0.95)),
        "depth": float(rng.uniform(-0.2, 0.25)),
        "bronchogram_angles": rng.uniform(-0.45, 0.45, size=3).tolist(),
        "texture_seed": int(rng.integers(2**31)),
    }


def _sample_pneumonia(rng: np.random.Generator) -> dict:
    side = _side(rng)
    x, y = _point_in_lung(rng, side, (-0.2, 0.2))
    offsets = rng.uniform([-0.08, -0.12, 0.035], [0.08, 0.12, 0.065], size=(int(rng.integers(3, 6)), 3)).tolist()
    return {
        "side": side,
        "blobs": [(x + dx, y + dy, radius) for dx, dy, radius in offsets],
        "depth": float(rng.uniform(-0.25, 0.25)),
        "air_loss": float(rng.uniform(0.6, 0.8)),
        "texture_seed": int(rng.integers(2**31)),
    }


def _sample_lung_lesion(rng: np.random.Generator) -> dict:
    side = _side(rng)
    x, y = _point_in_lung(rng, side, (-0.5, 0.15))
    is_mass = bool(rng.random() < 0.3)
    return {
        "side": side,
        "x": x,
        "y": y,
        "mass": is_mass,
        "depth": float(rng.uniform(-0.3, 0.3)),
        "radius": float(rng.uniform(0.08, 0.12) if is_mass else rng.uniform(0.04, 0.065)),
        "extra_density": float(rng.uniform(0.05, 0.1)),
    }


def _sample_edema(rng: np.random.Generator) -> dict:
    kerley_lines = [
        (side, float(rng.uniform(0.04, 0.3)), float(rng.uniform(0.04, 0.07))) for side in (-1, 1) for _ in range(5)
    ]
    return {
        "air_loss": float(rng.uniform(0.5, 0.65)),
        "spread": float(rng.uniform(0.16, 0.22)),
        "kerley_lines": kerley_lines,
    }


def _sample_atelectasis(rng: np.random.Generator) -> dict:
    return {
        "side": _side(rng),
        "height": float(rng.uniform(0.1, 0.25)),
        "angle": float(rng.uniform(-0.3, 0.3)),
        "length": float(rng.uniform(0.22, 0.34)),
        "thickness": float(rng.uniform(0.02, 0.03)),
        "elevation": float(rng.uniform(0.06, 0.11)),
        "x_offset": float(rng.uniform(-0.06, 0.04)),
    }


def _sample_pneumothorax(rng: np.random.Generator) -> dict:
    return {"side": _side(rng), "collapse": float(rng.uniform(0.2, 0.32)), "lucency": float(rng.uniform(0.05, 0.08))}


def _sample_pleural_effusion(rng: np.random.Generator) -> dict:
    sides = [-1, 1] if rng.random() < 0.25 else [_side(rng)]
    return {"sides": sides, "heights": rng.uniform(0.22, 0.45, size=len(sides)).tolist()}


def _sample_pleural_other(rng: np.random.Generator) -> dict:
    return {
        "side": _side(rng),
        "top": float(rng.uniform(-0.5, -0.15)),
        "length": float(rng.uniform(0.4, 0.6)),
        "thickness": float(rng.uniform(0.035, 0.05)),
        "phase": float(rng.uniform(0, 2 * np.pi)),
    }


def _sample_fracture(rng: np.random.Generator) -> dict:
    return {
        "side": _side(rng),
        "rib": int(rng.integers(2, 6)),
        "lateral": float(rng.uniform(0.38, 0.55)),
        "step": float(rng.uniform(0.35, 0.5)) * _side(rng),
        "gap": float(rng.uniform(0.035, 0.05)),
    }


def _sample_support_devices(rng: np.random.Generator) -> dict:
    kinds = [kind for kind in ("sternotomy", "pacemaker", "central_line") if rng.random() < 0.45]
    if not kinds:
        kinds = [("sternotomy", "pacemaker", "central_line")[int(rng.integers(3))]]
    return {
        "kinds": kinds,
        "wire_count": int(rng.integers(4, 7)),
        "wire_top": float(rng.uniform(-0.5, -0.4)),
        "wire_bottom": float(rng.uniform(0.05, 0.2)),
        "pacemaker_side": 1 if rng.random() < 0.8 else -1,
        "pacemaker_xy": rng.uniform([0.42, -0.72], [0.56, -0.6]).tolist(),
        "line_side": _side(rng),
        "line_tip_y": float(rng.uniform(-0.22, -0.08)),
    }


_FINDING_SAMPLERS = {
    "Lung Opacity": _sample_lung_opacity,
    "Lung Lesion": _sample_lung_lesion,
    "Edema": _sample_edema,
    "Consolidation": _sample_consolidation,
    "Pneumonia": _sample_pneumonia,
    "Atelectasis": _sample_atelectasis,
    "Pneumothorax": _sample_pneumothorax,
    "Pleural Effusion": _sample_pleural_effusion,
    "Pleural Other": _sample_pleural_other,
    "Fracture": _sample_fracture,
    "Support Devices": _sample_support_devices,
}
"""Observations drawn as findings. Cardiomegaly and Enlarged Cardiomediastinum resize the anatomy instead."""


def _patch_texture(params: dict, canvas: _Canvas, cells: int) -> np.ndarray:
    """The finding's own smooth texture in [0.2, 1.3] (the same on every view of a study), in the canvas window."""
    noise = _smooth_noise(np.random.default_rng(params["texture_seed"]), canvas.image_size, cells)[canvas.window]
    return np.clip(0.8 + 0.4 * noise, 0.2, 1.3)


def _add_lesion(canvas: _Canvas, x: float, y: float, params: dict) -> None:
    """A round nodule, or a lobulated mass, slightly denser than soft tissue."""
    reach = params["radius"] * 1.3
    window = canvas.crop((x - reach, x + reach), (y - reach, y + reach))
    dx, dy = window.x - x, window.y - y
    distance = np.sqrt(dx * dx + dy * dy) + 1e-6
    cos_angle = dx / distance  # cos(3 t) = 4 cos^3 t - 3 cos t gives a three-lobed outline
    outline = params["radius"] * (1.0 + (0.12 if params["mass"] else 0.03) * (4 * cos_angle**3 - 3 * cos_angle))
    lesion = _ramp(outline - distance, max(0.012, canvas.pixel)) * params["strength"]
    window.air_loss += lesion
    window.density += params["extra_density"] * lesion


def _add_blobs(canvas: _Canvas, blobs: list[tuple[float, float, float]], params: dict, cells: int) -> None:
    """Patchy airspace opacity: overlapping Gaussian blobs broken up by the finding's texture."""
    xs = [bx for bx, _, _ in blobs]
    ys = [by for _, by, _ in blobs]
    reach = 3.0 * max(radius for _, _, radius in blobs)
    window = canvas.crop((min(xs) - reach, max(xs) + reach), (min(ys) - reach, max(ys) + reach))
    opacity = sum(_gaussian(window, bx, by, radius, radius * 1.15) for bx, by, radius in blobs)
    np.clip(opacity, 0.0, 1.0, out=opacity)
    window.air_loss += (params["strength"] * params["air_loss"]) * opacity * _patch_texture(params, window, cells)


def _draw_wire_loops(canvas: _Canvas, centres: np.ndarray, value: float, size: float) -> None:
    draw = canvas.draw()
    half_width, half_height = max(1.5, size / canvas.pixel), max(1.0, 0.55 * size / canvas.pixel)
    for column, row in canvas.to_pixels(centres):
        box = [column - half_width, row - half_height, column + half_width, row + half_height]
        draw.ellipse(box, outline=value, width=canvas.line_width(0.01))


def _draw_box(canvas: _Canvas, centre: tuple[float, float], half_size: tuple[float, float], value: float) -> None:
    (cx, cy), (half_width, half_height) = centre, half_size
    corners = [
        (cx - half_width, cy - half_height),
        (cx + half_width, cy - half_height),
        (cx + half_width, cy + half_height),
        (cx - half_width, cy + half_height),
    ]
    canvas.draw().polygon(canvas.to_pixels(corners), fill=value)


def _lung_markings(
    canvas: _Canvas, rng: np.random.Generator, hilar_distance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Parenchymal texture and vessel markings: the ridges of smooth noise (curvy branching lines), strongest near
    the hila and fading to the periphery, plus the hilar shadows."""
    texture = _smooth_noise(rng, canvas.image_size, 12)
    ridges = np.abs(_smooth_noise(rng, canvas.image_size, 26))
    np.subtract(1.0, ridges, out=ridges)
    np.clip(ridges, 0.0, 1.0, out=ridges)
    np.square(ridges, out=ridges)
    np.square(ridges, out=ridges)
    fading = np.exp(hilar_distance * (-1.0 / 0.35))
    hilum = np.square(hilar_distance * (1.0 / 0.08))
    markings = (0.8 * ridges + 0.25) * fading + 0.9 * np.exp(np.negative(hilum, out=hilum), out=hilum)
    return texture, markings


def _compose_lungs(
    canvas: _Canvas,
    lung_air: float,
    lung_field: np.ndarray,
    markings: np.ndarray,
    marking_weight: float,
    texture: np.ndarray,
) -> None:
    """Takes the remaining lung air off the density map and adds the vessel markings it shows."""
    air_layer = canvas.layer("air")
    air_loss = canvas.air_loss if air_layer is None else canvas.air_loss - air_layer
    aeration = 1.0 - np.clip(air_loss, 0.0, 1.0)
    aeration *= lung_field
    basal_overlap = 1.0 - 0.25 * _ramp(canvas.y - 0.15, 0.7)  # more soft tissue in front of the lung bases
    canvas.density += aeration * (marking_weight * markings + 0.02 * texture - lung_air * basal_overlap)


# --------------------------------------------------------------------------------------------------------------------
# Frontal (PA) view
# --------------------------------------------------------------------------------------------------------------------


def _draw_frontal(canvas: _Canvas, anatomy: _Anatomy, findings: dict[str, dict], rng: np.random.Generator) -> None:
    x, y, edge = canvas.x, canvas.y, canvas.edge
    lateral = np.abs(x)
    density = canvas.density
    # Soft tissue: neck, sloping shoulders, chest wall, arms at the edges; the abdomen is a little denser.
    shoulder = -0.84 + 0.5 * np.square(np.maximum(lateral - 0.2, 0.0))
    torso = _ramp(anatomy.body_half_width + 0.06 * y - lateral, 0.06) * _ramp(y - shoulder, 0.08)
    arms = _ramp(0.13 - np.abs(lateral - 0.92), 0.06) * _ramp(y + 0.75, 0.1)
    body = np.maximum(np.maximum(torso, _ramp(0.19 - lateral, 0.05)), arms)
    density += anatomy.soft_tissue * body + 0.05 * _ramp(y - 0.45, 0.3) * torso + 0.03
    # Cardiomediastinal silhouette: heart (tilted half-ellipse on the diaphragm), upper mediastinum, aortic knob.
    heart_right, heart_left = anatomy.heart_span
    heart_height = 0.38 + 0.3 * (anatomy.cardiothoracic_ratio - 0.45)
    heart = _ellipse(
        canvas,
        (heart_right + heart_left) / 2,
        anatomy.heart_base_y,
        (heart_left - heart_right) / 2,
        heart_height,
        -anatomy.heart_tilt,
    )
    silhouette = np.maximum(
        heart, _ramp(anatomy.mediastinum_half_width - np.abs(x - 0.01), edge) * _ramp(0.3 - y, 0.1)
    )
    knob_x = anatomy.mediastinum_half_width + 0.02
    knob = canvas.crop((knob_x - 0.08, knob_x + 0.08), (-0.41, -0.25))
    np.maximum(silhouette[knob.window], _ellipse(knob, knob_x, -0.33, 0.065, 0.06), out=silhouette[knob.window])
    density += 0.04 * heart * _ramp(min(anatomy.dome_top) + 0.03 - y, 0.06)
    # Lungs: tapered ellipses cut by the hemidiaphragm domes and the silhouette, each on its own half of the view.
    lung_field = np.zeros_like(x)
    lung_radii = {}
    for side in (-1, 1):
        half = canvas.crop(_side_range(side, 0.0, 0.75), (-0.85, 1.0))
        lung_radii[side] = anatomy.lung_radius(half, side)
        lung = _inside(lung_radii[side], anatomy.lung_radius_x, edge) * _ramp(
            anatomy.dome(half.x, side) - half.y, edge
        )
        np.maximum(lung_field[half.window], lung, out=lung_field[half.window])
    lung_field *= 1.0 - silhouette
    texture, markings = _lung_markings(
        canvas, rng, np.sqrt(np.square(lateral - 0.17) + np.square(y - anatomy.hilum_y))
    )
    if (params := findings.get("Pneumothorax")) is not None:
        _frontal_pneumothorax(canvas, anatomy, params, lung_field, lung_radii[params["side"]], markings)
    # Bones: spine, clavicles, humeral heads, ribs.
    vertebrae = 0.75 + 0.25 * np.square(np.cos(y * (np.pi / 0.115)))
    density += 0.12 * _band(x, 0.065) * vertebrae
    for side in (-1, 1):
        shoulder_girdle = canvas.crop(_side_range(side, 0.04, 0.96), (-0.9, -0.45))
        along = shoulder_girdle.x * side
        clavicle_y = -0.66 - 0.25 * (along - 0.08) + 0.3 * np.square(along - 0.36)
        clavicle = _band(shoulder_girdle.y - clavicle_y, 0.03) * _ramp(along - 0.07, 0.03) * _ramp(0.66 - along, 0.05)
        humeral_head = _ellipse(shoulder_girdle, side * 0.83, -0.72, 0.11, 0.12) * _ramp(along - 0.72, 0.04)
        shoulder_girdle.density += 0.19 * clavicle + 0.14 * humeral_head
    density += _ribs(canvas, anatomy, findings.get("Fracture"), lateral)
    # Gastric air bubble under the left hemidiaphragm.
    bubble_x, bubble_y = anatomy.lung_center_x + 0.03, anatomy.dome_top[1] + 0.12
    bubble = canvas.crop((bubble_x - 0.1, bubble_x + 0.1), (bubble_y - 0.06, bubble_y + 0.06))
    bubble.density -= 0.1 * _ellipse(bubble, bubble_x, bubble_y, 0.08, 0.045)
    _draw_frontal_findings(canvas, anatomy, findings, lung_radii)
    _compose_lungs(canvas, anatomy.lung_air, lung_field, markings, 0.13, texture)
    to_pixels = canvas.image_size / 2 * canvas.scale
    canvas.metadata.update(
        cardiothoracic_ratio=anatomy.cardiothoracic_ratio,
        mediastinum_half_width=anatomy.mediastinum_half_width,
        heart_width_px=anatomy.heart_width * to_pixels,
        thorax_width_px=anatomy.thoracic_width * to_pixels,
    )


def _ribs(canvas: _Canvas, anatomy: _Anatomy, fracture: dict | None, lateral: np.ndarray) -> np.ndarray:
    """Posterior ribs (arcs bowing down laterally) and fainter anterior ribs inside the rib cage. A fracture breaks
    one posterior rib: a gap, a step beyond it, and a little callus."""
    y = canvas.y
    arc = y + (0.8 + anatomy.rib_shift) - 0.1 * lateral - 0.5 * np.square(lateral)
    phase = np.maximum(arc, 0.0, out=arc) ** 0.9
    phase *= 1.0 / anatomy.rib_spacing
    if fracture is not None:
        on_side = (canvas.x * fracture["side"]) > 0
        near_rib = _ramp(0.6 - np.abs(phase - fracture["rib"]), 0.2) * on_side
        phase += (fracture["strength"] * fracture["step"]) * near_rib * _ramp(lateral - fracture["lateral"], 0.01)
    cage = _ramp(0.74 - lateral, 0.05) * _ramp(lateral - 0.06, 0.04) * _ramp(0.5 - y, 0.2) * _ramp(phase - 0.5, 0.3)
    rib_offset = np.abs(phase - np.round(phase))
    posterior = (0.55 * _band(rib_offset, 0.2) + 0.45 * _band(rib_offset - 0.16, 0.05)) * cage * (phase < 10.5)
    if fracture is not None:
        gap = np.exp(-np.square((lateral - fracture["lateral"]) * (1.0 / fracture["gap"])))
        posterior *= 1.0 - fracture["strength"] * gap * near_rib
        callus = np.exp(-np.square((lateral - fracture["lateral"]) * (1.0 / (4.5 * fracture["gap"]))))
        callus *= np.exp(-np.square((phase - fracture["rib"]) * 1.8)) * on_side * (1.0 - 0.6 * gap)
        canvas.density += (0.24 * fracture["strength"]) * callus
        canvas.metadata["fracture"] = {"side": fracture["side"], "rib": fracture["rib"]}
    anterior_phase = (y + 0.6 * lateral + 0.55 + anatomy.rib_shift) * (1.0 / (anatomy.rib_spacing * 1.15))
    anterior = _band(anterior_phase - np.round(anterior_phase), 0.2) * cage * _ramp(lateral - 0.22, 0.12)
    return 0.07 * posterior + 0.025 * anterior * (anterior_phase < 7.5)


def _frontal_pneumothorax(
    canvas: _Canvas,
    anatomy: _Anatomy,
    params: dict,
    lung_field: np.ndarray,
    lung_radius: np.ndarray,
    markings: np.ndarray,
) -> None:
    """Collapses one lung towards its hilum: the pleural space around it is lucent, has no markings, and is bounded by
    the thin visceral pleural line. Updates `lung_field` and `markings` in place."""
    side, strength = params["side"], params["strength"]
    collapse = params["collapse"] * strength**0.5
    rx, ry = anatomy.lung_radius_x, anatomy.lung_radius_y
    half = canvas.crop(_side_range(side, 0.0, 0.75), (-0.85, 1.0))
    collapsed = _ellipse_radius(
        half,
        side * (anatomy.lung_center_x - rx * collapse * 0.5),
        anatomy.lung_center_y + ry * collapse * 0.7,
        rx * (1.0 - collapse),
        ry * (1.0 - collapse * 0.5),
    )
    collapsed -= 1.0
    collapsed *= rx  # distance outside the collapsed lung
    within = (lung_radius < 1.0) * ((half.x * side) > 0.05) * _ramp(anatomy.dome(half.x, side) - 0.12 - half.y, 0.1)
    pleural_space = _ramp(collapsed, canvas.edge) * within
    half.density += (
        (0.12 * strength) * _band(collapsed, max(0.008, 0.6 * canvas.pixel)) * within * (lung_radius < 0.97)
    )
    markings[half.window] *= 1.0 - strength * pleural_space
    lung_field[half.window] += (params["lucency"] * strength / anatomy.lung_air) * pleural_space
    canvas.metadata["pneumothorax_side"] = side


def _draw_frontal_findings(
    canvas: _Canvas, anatomy: _Anatomy, findings: dict[str, dict], lung_radii: dict[int, np.ndarray]
) -> None:
    if (params := findings.get("Lung Opacity")) is not None:
        (sx, sy), cx, cy = params["sigma"], params["x"], params["y"]
        patch = canvas.crop((cx - 3 * sx, cx + 3 * sx), (cy - 3 * sy, cy + 3 * sy))
        opacity = _gaussian(patch, cx, cy, sx, sy) * _patch_texture(params, patch, 10)
        patch.air_loss += (params["strength"] * params["air_loss"]) * opacity
    if (params := findings.get("Consolidation")) is not None:
        side, direction = params["side"], 1.0 if params["lower"] else -1.0
        lung = canvas.crop(_side_range(side, 0.0, 0.75), (0.0 - 0.2, 1.0) if params["lower"] else (-0.85, 0.0))
        boundary = params["fissure_y"] + params["fissure_slope"] * (lung.x * side - 0.3)
        lobe = _ramp((lung.y - boundary) * direction, 0.05) * ((lung.x * side) > 0.0)
        lung.air_loss += (params["strength"] * params["air_loss"]) * lobe * _patch_texture(params, lung, 14)
        start = np.array([side * 0.2, params["fissure_y"] - 0.1 * params["fissure_slope"] + direction * 0.04])
        for angle in params["bronchogram_angles"]:
            heading = np.array([side * np.cos(angle + 0.7), direction * np.sin(angle + 0.7)])
            canvas.polyline(np.stack([start, start + 0.28 * heading]), 0.6 * params["strength"], 0.014, "air")
    if (params := findings.get("Pneumonia")) is not None:
        _add_blobs(canvas, params["blobs"], params, 24)
    if (params := findings.get("Lung Lesion")) is not None:
        _add_lesion(canvas, params["x"], params["y"], params)
    if (params := findings.get("Edema")) is not None:
        spread = params["spread"]
        hilum_y = anatomy.hilum_y + 0.05
        hila = canvas.crop((-0.2 - 3 * spread, 0.2 + 3 * spread), (hilum_y - 3.9 * spread, hilum_y + 3.9 * spread))
        haze = sum(_gaussian(hila, side * 0.2, hilum_y, spread, spread * 1.3) for side in (-1, 1))
        hila.air_loss += (params["strength"] * params["air_loss"]) * haze
        for side, height, length in params["kerley_lines"]:
            outer = side * (anatomy.lung_center_x + anatomy.lung_radius_x * 0.93)
            line_y = float(anatomy.dome(outer, side)) - 0.07 - height
            line = np.array([[outer, line_y], [outer - side * length, line_y]])
            canvas.polyline(line, 0.15 * params["strength"], 0.01)
    if (params := findings.get("Atelectasis")) is not None:
        side = params["side"]
        cx = side * (anatomy.lung_center_x + params["x_offset"])
        cy = float(anatomy.dome(cx, side)) - params["height"]
        reach = params["length"]
        plate = canvas.crop((cx - reach, cx + reach), (cy - reach, cy + reach))
        cosine, sine = float(np.cos(params["angle"])), float(np.sin(params["angle"]))
        dx, dy = plate.x - cx, plate.y - cy
        band = _band(dy * cosine - dx * sine, max(params["thickness"], canvas.pixel))
        band *= _ramp(params["length"] / 2 - np.abs(dx * cosine + dy * sine), 0.05)
        plate.air_loss += (0.85 * params["strength"]) * band
    if (params := findings.get("Pleural Effusion")) is not None:
        for side, height in zip(params["sides"], params["heights"]):
            height *= 0.5 + 0.5 * params["strength"]
            angle_x, angle_y = anatomy.costophrenic_angle(side)
            base = canvas.crop(_side_range(side, 0.0, 0.8), (angle_y - height - 0.05, 1.0))
            medial = anatomy.lung_center_x - 0.6 * anatomy.lung_radius_x
            lateral = np.clip((base.x * side - medial) * (1.0 / (abs(angle_x) - medial)), 0.0, 1.0)
            meniscus = angle_y - height * (0.35 + 0.65 * np.square(lateral))
            base.air_loss += params["strength"] * _ramp(base.y - meniscus, 0.04) * ((base.x * side) > 0.0)
    if (params := findings.get("Pleural Other")) is not None:
        side, top, bottom = params["side"], params["top"], params["top"] + params["length"]
        wall = canvas.crop(_side_range(side, 0.0, 0.75), (-0.85, 1.0))
        depth_inside = (1.0 - lung_radii[side]) * anatomy.lung_radius_x
        thickness = params["thickness"] * (1.0 + 0.35 * np.cos(wall.y * 14.0 + params["phase"]))
        rind = _ramp(thickness - depth_inside, 0.012) * _ramp(wall.y - top, 0.05) * _ramp(bottom - wall.y, 0.05)
        wall.air_loss += params["strength"] * rind * ((wall.x * side) > 0.2)
    if (params := findings.get("Support Devices")) is not None:
        _draw_frontal_devices(canvas, anatomy, params)


def _draw_frontal_devices(canvas: _Canvas, anatomy: _Anatomy, params: dict) -> None:
    strength = params["strength"]
    if "sternotomy" in params["kinds"]:
        wire_y = np.linspace(params["wire_top"], params["wire_bottom"], params["wire_count"])
        _draw_wire_loops(canvas, np.stack([np.full_like(wire_y, 0.01), wire_y], axis=1), 0.6 * strength, 0.028)
    if "pacemaker" in params["kinds"]:
        side = params["pacemaker_side"]
        box_x, box_y = side * params["pacemaker_xy"][0], params["pacemaker_xy"][1]
        _draw_box(canvas, (box_x, box_y), (0.07, 0.05), 0.6 * strength)
        tip = (0.3 * anatomy.heart_span[1], anatomy.heart_base_y - 0.08)
        lead = _bezier((box_x - side * 0.05, box_y + 0.03), (side * 0.03, -0.55), tip)
        canvas.polyline(lead, 0.45 * strength, 0.012)
    if "central_line" in params["kinds"]:
        side = params["line_side"]
        line = _bezier((side * 0.4, -0.98), (side * 0.1, -0.72), (0.04 * side - 0.02, params["line_tip_y"]))
        canvas.polyline(line, 0.35 * strength, 0.014)


# --------------------------------------------------------------------------------------------------------------------
# Lateral view (patient facing image left: x < 0 anterior, x > 0 posterior)
# --------------------------------------------------------------------------------------------------------------------

_LATERAL_LUNG = (0.06, -0.04, 0.56, 0.74)
"""Centre x, centre y, half depth and half height of the lung field on the lateral view."""


def _lateral_dome(anatomy: _Anatomy, x: np.ndarray | float) -> np.ndarray | float:
    """Hemidiaphragm on the lateral view: highest just anterior of centre, deepest in the posterior sulcus."""
    offset = x + 0.15
    return min(anatomy.dome_top) + 0.02 + 0.15 * offset * offset + 0.27 * np.square(np.maximum(offset, 0.0))


def _lateral_x(depth: float) -> float:
    """Lateral-view x of a finding from its study-level depth in [-0.3, 0.3] (anterior negative)."""
    return _LATERAL_LUNG[0] + depth * _LATERAL_LUNG[2] * 1.3


def _draw_lateral(canvas: _Canvas, anatomy: _Anatomy, findings: dict[str, dict], rng: np.random.Generator) -> None:
    x, y, edge = canvas.x, canvas.y, canvas.edge
    density = canvas.density
    cx, cy, rx, ry = _LATERAL_LUNG
    # Soft tissue: chest between the anterior and posterior skin, raised arms over the upper anterior chest.
    anterior_skin, posterior_skin = -0.72 + 0.06 * np.square(y + 0.2), 0.86 - 0.05 * np.square(y)
    torso = _ramp(x - anterior_skin, 0.05) * _ramp(posterior_skin - x, 0.05) * _ramp(y + 1.1, 0.1)
    arms = _inside(_ellipse_radius(canvas, -0.1, -0.88, 0.42, 0.3, 0.3), 0.3, 0.1)
    density += anatomy.soft_tissue * np.maximum(torso, arms) + 0.06 * arms + 0.05 * _ramp(y - 0.45, 0.3) * torso
    density += 0.03
    # Lung field (narrower at the apex), cut by the diaphragm; heart anterior and inferior; anterior mediastinum.
    taper = 1.0 / (0.8 + 0.2 * np.clip((y + 0.8) * (1.0 / 0.9), 0.0, 1.0))
    lung_radius = np.sqrt(np.square((x - cx) * taper * (1.0 / rx)) + np.square((y - cy) * (1.0 / ry)))
    below_dome = y - _lateral_dome(anatomy, x)  # > 0 under the diaphragm
    lung_field = _inside(lung_radius, rx, edge) * _ramp(-below_dome, edge)
    heart_depth = 0.42 * anatomy.cardiothoracic_ratio / 0.45
    heart_y = float(_lateral_dome(anatomy, -0.2)) + 0.04
    heart = _ellipse(canvas, -0.5 + heart_depth / 2, heart_y, heart_depth / 2, 0.38, 0.15)
    widening = float(np.clip((anatomy.mediastinum_half_width - 0.08) / 0.09, 0.0, 1.0))
    silhouette = heart.copy()
    if widening > 0:
        front = canvas.crop((-0.6, -0.1), (-0.6, 0.0))
        anterior_mediastinum = _ellipse(front, -0.38, -0.3, 0.06 + 0.08 * widening, 0.22) * widening
        np.maximum(silhouette[front.window], anterior_mediastinum, out=silhouette[front.window])
    lung_field *= 1.0 - silhouette
    density += 0.04 * heart * _ramp(0.03 - below_dome, 0.06)
    hilar_distance = np.sqrt(np.square(x - 0.06) + np.square(y - anatomy.hilum_y - 0.04))
    texture, markings = _lung_markings(canvas, rng, hilar_distance)
    if (params := findings.get("Pneumothorax")) is not None:
        strength = params["strength"]
        apex_gap = params["collapse"] * strength**0.5 * 0.6
        apex = canvas.crop((cx - rx, cx + rx), (cy - ry, -0.2))
        collapsed = _ellipse_radius(
            apex, cx, cy + ry * apex_gap * 0.6, rx * (1.0 - apex_gap * 0.3), ry * (1.0 - apex_gap * 0.5)
        )
        collapsed -= 1.0
        collapsed *= rx
        apex_radius = lung_radius[apex.window]
        within = (apex_radius < 1.0) * _ramp(-0.25 - apex.y, 0.1)
        pleural_space = _ramp(collapsed, edge) * within
        line = _band(collapsed, max(0.008, 0.6 * canvas.pixel)) * within * (apex_radius < 0.97)
        apex.density += (0.1 * strength) * line
        markings[apex.window] *= 1.0 - strength * pleural_space
        lung_field[apex.window] += (params["lucency"] * strength / anatomy.lung_air) * pleural_space
    # Bones and airway: trachea, vertebral bodies with disc spaces, posterior elements, sternum, posterior ribs.
    density -= 0.05 * _band(x - (-0.02 + 0.12 * (y + 1.0)), 0.045) * _ramp(-0.2 - y, 0.08)
    spine_x = 0.4 + 0.06 * y - 0.08 * np.square(y)
    discs = 0.65 + 0.35 * _ramp(np.abs(np.cos(y * (np.pi / 0.125))) - 0.25, 0.3)
    density += 0.09 * _ramp(0.08 - np.abs(x - spine_x), 0.025) * discs + 0.05 * _band(x - spine_x - 0.17, 0.035)
    front = canvas.crop((-0.75, -0.45), (-0.7, 0.4))
    sternum = _band(front.x - (-0.62 + 0.08 * (front.y + 0.6)), 0.025)
    front.density += 0.08 * sternum * _ramp(front.y + 0.62, 0.04) * _ramp(0.3 - front.y, 0.04)
    rib_phase = (y - 0.5 * x + anatomy.rib_shift) * (1.0 / (anatomy.rib_spacing * 1.1))
    ribs = _band(rib_phase - np.round(rib_phase), 0.22) * _ramp(x - 0.05, 0.15) * _ramp(0.55 - y, 0.1) * torso
    density += 0.035 * ribs
    # The second hemidiaphragm a little higher, and the gastric bubble under the anterior dome.
    second_dome = _band(below_dome + 0.05, 0.012) * _ramp(x + 0.5 - heart_depth, 0.05)
    density += 0.05 * second_dome * _ramp(0.6 - x, 0.05)
    bubble_y = float(_lateral_dome(anatomy, -0.15)) + 0.1
    bubble = canvas.crop((-0.28, -0.02), (bubble_y - 0.07, bubble_y + 0.07))
    bubble.density -= 0.09 * _ellipse(bubble, -0.15, bubble_y, 0.11, 0.05)
    _draw_lateral_findings(canvas, anatomy, findings, lung_radius)
    _compose_lungs(canvas, anatomy.lung_air, lung_field, markings, 0.06, texture)
    canvas.metadata.update(cardiothoracic_ratio=anatomy.cardiothoracic_ratio, heart_depth=heart_depth)


def _draw_lateral_findings(
    canvas: _Canvas, anatomy: _Anatomy, findings: dict[str, dict], lung_radius: np.ndarray
) -> None:
    cx, _, rx, _ = _LATERAL_LUNG
    if (params := findings.get("Lung Opacity")) is not None:
        sigma, px, py = params["sigma"][1], _lateral_x(params["depth"]), params["y"]
        patch = canvas.crop((px - 3 * sigma, px + 3 * sigma), (py - 3 * sigma, py + 3 * sigma))
        opacity = _gaussian(patch, px, py, sigma, sigma) * _patch_texture(params, patch, 10)
        patch.air_loss += (params["strength"] * params["air_loss"] * 0.8) * opacity
    if (params := findings.get("Consolidation")) is not None:
        px, py = _lateral_x(params["depth"]), params["fissure_y"] + (0.2 if params["lower"] else -0.2)
        patch = canvas.crop((px - 0.6, px + 0.6), (py - 0.45, py + 0.45))
        opacity = np.clip(1.4 * _gaussian(patch, px, py, 0.2, 0.15), 0.0, 1.0) * _patch_texture(params, patch, 14)
        patch.air_loss += (params["strength"] * params["air_loss"]) * opacity
    if (params := findings.get("Pneumonia")) is not None:
        origin_x, depth_x = params["blobs"][0][0], _lateral_x(params["depth"])
        blobs = [(depth_x + 0.8 * (bx - origin_x), by, radius) for bx, by, radius in params["blobs"]]
        _add_blobs(canvas, blobs, params, 24)
    if (params := findings.get("Lung Lesion")) is not None:
        _add_lesion(canvas, _lateral_x(params["depth"]), params["y"], params)
    if (params := findings.get("Edema")) is not None:
        spread, hilum_y = params["spread"] * 1.4, anatomy.hilum_y + 0.05
        hila = canvas.crop((0.04 - 3 * spread, 0.04 + 3 * spread), (hilum_y - 3 * spread, hilum_y + 3 * spread))
        hila.air_loss += (params["strength"] * params["air_loss"]) * _gaussian(hila, 0.04, hilum_y, spread, spread)
    if (params := findings.get("Atelectasis")) is not None:
        plate_y = float(_lateral_dome(anatomy, 0.0)) - params["height"]
        plate = canvas.crop((-0.5, 0.6), (plate_y - 0.3, plate_y + 0.3))
        band = _band((plate.y - plate_y) - 0.4 * params["angle"] * plate.x, max(params["thickness"], canvas.pixel))
        band *= _ramp(params["length"] * 0.9 - np.abs(plate.x - 0.05), 0.05)
        plate.air_loss += (0.6 * params["strength"]) * band
    if (params := findings.get("Pleural Effusion")) is not None:
        height = max(params["heights"]) * (0.5 + 0.5 * params["strength"])
        sulcus_y = float(_lateral_dome(anatomy, 0.5))
        base = canvas.crop((-0.3, 0.8), (sulcus_y - 1.2 * height - 0.05, 1.0))
        posterior = np.clip((base.x + 0.2) * (1.0 / 0.75), 0.0, 1.1)
        meniscus = sulcus_y - height * (0.2 + 0.9 * np.square(posterior))
        base.air_loss += params["strength"] * _ramp(base.y - meniscus, 0.04)
    if (params := findings.get("Pleural Other")) is not None:
        top, bottom = params["top"], params["top"] + params["length"]
        wall = canvas.crop((0.2, cx + rx + 0.05), (top - 0.05, bottom + 0.05))
        depth_inside = (1.0 - lung_radius[wall.window]) * rx
        rind = (
            _ramp(params["thickness"] - depth_inside, 0.012) * _ramp(wall.y - top, 0.05) * _ramp(bottom - wall.y, 0.05)
        )
        wall.air_loss += params["strength"] * rind * (wall.x > 0.2)
    if (params := findings.get("Support Devices")) is not None:
        strength = params["strength"]
        if "sternotomy" in params["kinds"]:
            wire_y = np.linspace(params["wire_top"], params["wire_bottom"], params["wire_count"])
            _draw_wire_loops(canvas, np.stack([-0.6 + 0.08 * (wire_y + 0.6), wire_y], axis=1), 0.6 * strength, 0.02)
        if "pacemaker" in params["kinds"]:
            box_y = params["pacemaker_xy"][1]
            _draw_box(canvas, (-0.6, box_y), (0.045, 0.065), 0.6 * strength)
            lead = _bezier((-0.56, box_y), (-0.1, -0.45), (-0.35, anatomy.heart_base_y - 0.04))
            canvas.polyline(lead, 0.4 * strength, 0.012)
        if "central_line" in params["kinds"]:
            line = _bezier((-0.2, -1.0), (-0.08, -0.6), (-0.16, params["line_tip_y"]))
            canvas.polyline(line, 0.3 * strength, 0.014)


# --------------------------------------------------------------------------------------------------------------------
# Exposure, marker and the public API
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _synthetic_mark(image_size: int) -> np.ndarray:
    """Boolean mask (True = white) of the "SYNTHETIC" text with a one-glyph-pixel black frame."""
    glyph_pixel = max(1, image_size // 256)
    rows = [".".join(_GLYPHS[letter][row] for letter in SYNTHETIC_MARK_TEXT) for row in range(7)]
    text = np.array([[character == "#" for character in row] for row in rows])
    return np.pad(np.kron(text, np.ones((glyph_pixel, glyph_pixel), dtype=bool)), glyph_pixel)


def synthetic_mark_box(image_size: int) -> tuple[int, int, int, int]:
    """
    Pixel box `(left, top, right, bottom)` of the "SYNTHETIC" marker; its pixels are the same in every image.

    Args:
        image_size (`int`): Side of the square image.
    """
    height, width = _synthetic_mark(image_size).shape
    return 1, 1, 1 + width, 1 + height


def _expose(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Density map to 8-bit pixels: window, gamma, exposure gradient, quantum noise, then the marker."""
    density = canvas.density
    metal = canvas.layer("density")
    if metal is not None:
        density += metal
    low, high, gamma, tilt_x, tilt_y, noise_level, brightness = rng.random(7).tolist()
    low, high = 0.02 + 0.05 * low, 0.68 + 0.12 * high
    image = np.clip((density - low) * (1.0 / (high - low)), 0.0, 1.0) ** (0.8 + 0.4 * gamma)
    image *= 1.0 + 0.1 * (tilt_x - 0.5) * canvas.x + 0.08 * (tilt_y - 0.5) * canvas.y
    image += rng.standard_normal(image.shape, dtype=np.float32) * (0.01 + 0.02 * noise_level)
    pixels = np.clip(image * 255.0 + 12.0 * (brightness - 0.5), 0.0, 255.0).astype(np.uint8)
    mark = _synthetic_mark(canvas.image_size)
    left, top, right, bottom = synthetic_mark_box(canvas.image_size)
    pixels[top:bottom, left:right] = np.where(mark, 255, 0)
    return pixels


def render_view(
    view: str, labels: Sequence[int] | Mapping[str, int], seed: int, image_size: int = 256
) -> tuple[PIL.Image.Image, dict[str, Any]]:
    """
    Renders one view of a synthetic study.

    Args:
        view (`str`): `"frontal"` or `"lateral"`.
        labels (`Sequence[int]` or `Mapping[str, int]`): CheXpert label states, as for `render_study`.
        seed (`int`): Non-negative study seed.
        image_size (`int`, *optional*, defaults to 256): Side of the square image in pixels (at least 64).

    Returns:
        `(image, metadata)`: an 8-bit greyscale ("L") image, and a dict describing what was drawn: the view, the
        drawn findings, the cardiothoracic ratio (and on the frontal view the heart and thorax widths in pixels),
        and the pose jitter.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    strengths = label_strengths(labels)
    findings = _sample_findings(seed, strengths)
    anatomy = _sample_anatomy(np.random.default_rng([seed, 0]), strengths, findings)
    view_rng = np.random.default_rng([seed, 2, VIEWS.index(view)])
    rotation, scale, shift_x, shift_y = view_rng.random(4).tolist()
    canvas = _Canvas.create(
        image_size,
        rotation=np.deg2rad(8.0 * (rotation - 0.5)),
        scale=0.9 + 0.14 * scale,
        shift=(0.1 * (shift_x - 0.5), 0.08 * (shift_y - 0.5)),
    )
    draw_view = _draw_frontal if view == "frontal" else _draw_lateral
    draw_view(canvas, anatomy, findings, view_rng)
    pixels = _expose(canvas, view_rng)
    metadata = {
        "view": view,
        "findings": {name: params["strength"] for name, params in findings.items()},
        "rotation": canvas.rotation,
        "scale": canvas.scale,
        "shift": canvas.shift,
        **canvas.metadata,
    }
    return PIL.Image.fromarray(pixels), metadata


def render_study(
    labels: Sequence[int] | Mapping[str, int],
    seed: int,
    image_size: int = 256,
    views: Sequence[str] = VIEWS,
    return_metadata: bool = False,
) -> list[PIL.Image.Image] | tuple[list[PIL.Image.Image], list[dict[str, Any]]]:
    """
    Renders the views of one synthetic study from its CheXpert label states.

    Args:
        labels (`Sequence[int]` or `Mapping[str, int]`):
            One state per observation of `CHEXPERT_OBSERVATIONS` (POSITIVE=1, NEGATIVE=0, UNCERTAIN=-1,
            NOT_MENTIONED=-2), or a mapping from observation name to state.
        seed (`int`):
            Non-negative seed. The same labels and seed give the same pixels; the same seed with other labels gives
            the same patient, pose and noise.
        image_size (`int`, *optional*, defaults to 256):
            Side of the square images in pixels (at least 64).
        views (`Sequence[str]`, *optional*, defaults to `("frontal", "lateral")`):
            Views to render, in order.
        return_metadata (`bool`, *optional*, defaults to `False`):
            Also return one metadata dict per view (see `render_view`).

    Returns:
        A list of 8-bit greyscale ("L") `PIL.Image.Image`, one per view; with `return_metadata`, the tuple
        `(images, metadata)`.
    """
    rendered = [render_view(view, labels, seed, image_size) for view in views]
    images = [image for image, _ in rendered]
    return (images, [metadata for _, metadata in rendered]) if return_metadata else images


def save_png(
    image: PIL.Image.Image,
    path: str | PathLike,
    extra_text: Mapping[str, str] | None = None,
    compress_level: int = 6,
) -> None:
    """
    Saves a rendered image as PNG with text chunks marking it SYNTHETIC (`PNG_TEXT_CHUNKS`).

    Args:
        image (`PIL.Image.Image`): A rendered image.
        path (`str` or `os.PathLike`): Destination file.
        extra_text (`Mapping[str, str]`, *optional*): More text chunks, for example the study id.
        compress_level (`int`, *optional*, defaults to 6): zlib level, 0 (fastest) to 9 (smallest).
    """
    info = PngInfo()
    for key, value in {**PNG_TEXT_CHUNKS, **(extra_text or {})}.items():
        info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info, compress_level=compress_level)


__all__ = [
    "MIN_IMAGE_SIZE",
    "NEGATIVE",
    "NOT_MENTIONED",
    "PNG_TEXT_CHUNKS",
    "POSITIVE",
    "SYNTHETIC_MARK_TEXT",
    "UNCERTAIN",
    "UNCERTAIN_STRENGTH",
    "VIEWS",
    "label_strengths",
    "render_study",
    "render_view",
    "save_png",
    "synthetic_mark_box",
]
