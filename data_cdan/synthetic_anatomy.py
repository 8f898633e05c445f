"""Drawing primitives, study-level anatomy and finding parameters of the synthetic chest radiograph renderer.

Everything here works in normalised anatomical coordinates on a [`Canvas`]; `data_cdan.synthetic_cxr` draws the views.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import PIL.Image

from labeler_cdan import CHEXPERT_OBSERVATIONS

OBSERVATION_INDEX = {name: index for index, name in enumerate(CHEXPERT_OBSERVATIONS)}
"""Position of each observation in `CHEXPERT_OBSERVATIONS`."""

BOX_MIN_CONTRAST = 0.01
"""A drawn part gets a box only if it changes the density somewhere by at least this much (about 3.5 grey levels of
the exposed 8-bit image)."""

BOX_MASK_FRACTION = 0.3
"""A part's box bounds the pixels where its density change is at least this fraction of its largest change."""

# --------------------------------------------------------------------------------------------------------------------
# Drawing primitives on an anatomical coordinate grid
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised image coordinates, both of shape `(image_size, image_size)`, in [-1, 1]."""
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) * np.float32(2.0 / image_size) - 1.0
    return np.meshgrid(centres, centres)


@dataclass
class Canvas:
    """
    One view being drawn (or a rectangular window of it): the anatomical coordinates of every pixel, after the
    view's pose jitter, and the maps the view is composed from.

    `x` grows to the image right (the patient's left on the frontal view, posterior on the lateral view) and `y`
    downwards; the chest spans roughly [-1, 1] in both. `density` is the brightness before exposure (air ~0, soft
    tissue ~0.4, bone and metal higher); `air_loss` is the fraction of lung air replaced by fluid or tissue. `layers`
    are PIL drawings of thin lines and wires, blurred slightly and then added to `density` ("density") or taken off
    `air_loss` ("air", for air bronchograms). `crop` gives a window whose arrays are views into this canvas, so local
    shapes are computed on a few pixels only.

    `parts` records, for the lesion boxes, what each finding changed (see `drawing` and `add_part`); `lung_field` is
    the lung field `compose_lungs` took the air from. Neither changes a pixel.
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
    parts: list["DrawnPart"] = field(default_factory=list)
    lung_field: np.ndarray | None = None

    @classmethod
    def create(cls, image_size: int, rotation: float, scale: float, shift: tuple[float, float]) -> "Canvas":
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

    def crop(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> "Canvas":
        """The window of this (full) canvas covering an anatomical box; its arrays are views into this canvas."""
        corners = np.array(self.to_pixels([(x, y) for x in x_range for y in y_range]))
        left, top = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, self.image_size)
        right, bottom = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 3, 0, self.image_size)
        window = (slice(top, max(top, bottom)), slice(left, max(left, right)))
        return Canvas(
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
            self.parts,
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

    def _snapshot(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        copies = {"density": self.density.copy(), "air_loss": self.air_loss.copy()}
        copies.update({f"layer {name}": np.array(image, dtype=np.float32) for name, image in self.layers.items()})
        copies.update({name: array.copy() for name, array in arrays.items()})
        return copies

    @contextmanager
    def drawing(self, label: str, split_sides: bool = False, **lung_arrays: np.ndarray) -> Iterator[None]:
        """
        Records what the drawing inside the `with` block changes, as one part of the finding `label` (one box, or one
        per side with `split_sides`). Only reads the maps: the pixels are the same with and without it.

        Args:
            label (`str`): the observation drawn.
            split_sides (`bool`, *optional*, defaults to `False`): box each side of the midline (x = 0) separately.
            lung_arrays (`np.ndarray`): other full-view maps the drawing changes in place that scale the lung air
                (the lung field, for a pneumothorax's lucency).
        """
        before = self._snapshot(lung_arrays)
        yield
        after = self._snapshot(lung_arrays)
        direct = np.abs(after["density"] - before["density"])
        air = np.abs(after["air_loss"] - before["air_loss"])
        for name in self.layers:
            change = np.abs(_binomial_blur(after[f"layer {name}"] - before.get(f"layer {name}", 0.0)))
            if name == "air":
                air += change
            else:
                direct += change
        lung = sum((np.abs(after[name] - before[name]) for name in lung_arrays), np.zeros_like(direct))
        self.parts.append(DrawnPart(label, direct, air, lung, split_sides))

    def add_part(self, label: str, contrast: np.ndarray) -> None:
        """Records a part of the finding `label` from its density change on the full view (`(rows, columns)`)."""
        zeros = np.zeros_like(contrast)
        self.parts.append(DrawnPart(label, np.abs(contrast), zeros, zeros, False))


@dataclass
class DrawnPart:
    """
    What one part of a finding changed on a view, per pixel of the full view: `direct` in density, `air` in air loss
    (shown only inside the lung field), `lung` in the lung field itself (shown as lung air).
    """

    label: str
    direct: np.ndarray  # (rows, columns)
    air: np.ndarray  # (rows, columns)
    lung: np.ndarray  # (rows, columns)
    split_sides: bool

    def contrast(self, lung_field: np.ndarray, lung_air: float) -> np.ndarray:
        """The density change the part makes, about what the pixels show (before exposure)."""
        return self.direct + lung_air * (self.air * np.clip(lung_field, 0.0, 1.0) + self.lung)


def part_boxes(canvas: Canvas, lung_air: float) -> list[tuple[str, tuple[int, int, int, int]]]:
    """
    The box of each recorded part of a drawn view: the pixels where the part changes the density by at least
    `BOX_MASK_FRACTION` of its largest change, for parts whose largest change is at least `BOX_MIN_CONTRAST`.

    Args:
        canvas (`Canvas`): the full view, after `compose_lungs`.
        lung_air (`float`): the anatomy's lung air (what an air loss of 1 takes off the density).

    Returns:
        `list[tuple[str, tuple[int, int, int, int]]]`: `(label, (x_min, y_min, x_max, y_max))` per box, in pixels
        (pixel `(column, row)` covers `[column, column + 1) x [row, row + 1)`), in drawing order.
    """
    lung_field = canvas.lung_field if canvas.lung_field is not None else np.zeros_like(canvas.density)
    boxes = []
    for part in canvas.parts:
        contrast = part.contrast(lung_field, lung_air)  # (rows, columns)
        regions = [canvas.x < 0, canvas.x >= 0] if part.split_sides else [np.ones(contrast.shape, dtype=bool)]
        for region in regions:
            peak = float(contrast.max(initial=0.0, where=region))
            if peak < BOX_MIN_CONTRAST:
                continue
            rows, columns = np.nonzero((contrast >= BOX_MASK_FRACTION * peak) & region)
            box = (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
            boxes.append((part.label, box))
    return boxes


# The primitives work in place on one fresh array each: at 256 px, memory traffic is most of the rendering time.


def ramp(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """Soft step: 0 below `-softness / 2`, 1 above `softness / 2`, linear between."""
    step = signed_distance * (1.0 / softness)
    step += 0.5
    return np.clip(step, 0.0, 1.0, out=step)


def _squared_radius(canvas: Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
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


def ellipse_radius(canvas: Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (< 1 inside) of an ellipse turned clockwise by `angle` radians."""
    squared = _squared_radius(canvas, cx, cy, rx, ry, angle)
    return np.sqrt(squared, out=squared)


def inside_mask(radius: np.ndarray, size: float, softness: float) -> np.ndarray:
    """Soft inside-mask of an ellipse from its normalised radius; `size` converts radius units to distance."""
    return ramp((1.0 - radius) * size, softness)


def soft_ellipse(canvas: Canvas, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1]."""
    return inside_mask(ellipse_radius(canvas, cx, cy, rx, ry, angle), min(rx, ry), canvas.edge)


def gaussian(canvas: Canvas, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    exponent = _squared_radius(canvas, cx, cy, sx, sy)
    exponent *= -0.5
    return np.exp(exponent, out=exponent)


def soft_band(distance: np.ndarray, half_width: float) -> np.ndarray:
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


def bezier(start: tuple[float, float], control: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Quadratic Bezier curve, shape `(24, 2)`."""
    t = np.linspace(0.0, 1.0, 24)[:, None]
    return (1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * np.array(control) + t**2 * np.array(end)


def side_range(side: int, near: float, far: float) -> tuple[float, float]:
    """The x range from `near` to `far` from the midline on one side."""
    return (near, far) if side > 0 else (-far, -near)


# --------------------------------------------------------------------------------------------------------------------
# Study-level anatomy and findings (shared by the views of a study)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Anatomy:
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

    def lung_radius(self, canvas: Canvas, side: int) -> np.ndarray:
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


def sample_anatomy(rng: np.random.Generator, strengths: np.ndarray, findings: dict[str, dict]) -> Anatomy:
    """Draws the patient; the cardiac sizes follow the Cardiomegaly and Enlarged Cardiomediastinum strengths."""
    draws = rng.random(15).tolist()
    cardiomegaly = float(strengths[OBSERVATION_INDEX["Cardiomegaly"]])
    wide_mediastinum = float(strengths[OBSERVATION_INDEX["Enlarged Cardiomediastinum"]])
    normal_ratio, enlarged_ratio = 0.42 + 0.06 * draws[0], 0.58 + 0.08 * draws[0]
    normal_mediastinum, enlarged_mediastinum = 0.1 + 0.025 * draws[1], 0.19 + 0.04 * draws[1]
    dome_right = 0.34 + 0.08 * draws[2]
    dome_top = [dome_right, dome_right + 0.02 + 0.05 * draws[3]]
    if "Atelectasis" in findings:  # volume loss: the hemidiaphragm under the collapsed lung rises
        atelectasis = findings["Atelectasis"]
        dome_top[0 if atelectasis["side"] < 0 else 1] -= atelectasis["strength"] * atelectasis["elevation"]
    return Anatomy(
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


def sample_findings(seed: int, strengths: np.ndarray) -> dict[str, dict]:
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


def patch_texture(params: dict, canvas: Canvas, cells: int) -> np.ndarray:
    """The finding's own smooth texture in [0.2, 1.3] (the same on every view of a study), in the canvas window."""
    noise = _smooth_noise(np.random.default_rng(params["texture_seed"]), canvas.image_size, cells)[canvas.window]
    return np.clip(0.8 + 0.4 * noise, 0.2, 1.3)


def add_lesion(canvas: Canvas, x: float, y: float, params: dict) -> None:
    """A round nodule, or a lobulated mass, slightly denser than soft tissue."""
    reach = params["radius"] * 1.3
    window = canvas.crop((x - reach, x + reach), (y - reach, y + reach))
    dx, dy = window.x - x, window.y - y
    distance = np.sqrt(dx * dx + dy * dy) + 1e-6
    cos_angle = dx / distance  # cos(3 t) = 4 cos^3 t - 3 cos t gives a three-lobed outline
    outline = params["radius"] * (1.0 + (0.12 if params["mass"] else 0.03) * (4 * cos_angle**3 - 3 * cos_angle))
    lesion = ramp(outline - distance, max(0.012, canvas.pixel)) * params["strength"]
    window.air_loss += lesion
    window.density += params["extra_density"] * lesion


def add_blobs(canvas: Canvas, blobs: list[tuple[float, float, float]], params: dict, cells: int) -> None:
    """Patchy airspace opacity: overlapping Gaussian blobs broken up by the finding's texture."""
    xs = [bx for bx, _, _ in blobs]
    ys = [by for _, by, _ in blobs]
    reach = 3.0 * max(radius for _, _, radius in blobs)
    window = canvas.crop((min(xs) - reach, max(xs) + reach), (min(ys) - reach, max(ys) + reach))
    opacity = sum(gaussian(window, bx, by, radius, radius * 1.15) for bx, by, radius in blobs)
    np.clip(opacity, 0.0, 1.0, out=opacity)
    window.air_loss += (params["strength"] * params["air_loss"]) * opacity * patch_texture(params, window, cells)


def draw_wire_loops(canvas: Canvas, centres: np.ndarray, value: float, size: float) -> None:
    draw = canvas.draw()
    half_width, half_height = max(1.5, size / canvas.pixel), max(1.0, 0.55 * size / canvas.pixel)
    for column, row in canvas.to_pixels(centres):
        box = [column - half_width, row - half_height, column + half_width, row + half_height]
        draw.ellipse(box, outline=value, width=canvas.line_width(0.01))


def draw_box(canvas: Canvas, centre: tuple[float, float], half_size: tuple[float, float], value: float) -> None:
    (cx, cy), (half_width, half_height) = centre, half_size
    corners = [
        (cx - half_width, cy - half_height),
        (cx + half_width, cy - half_height),
        (cx + half_width, cy + half_height),
        (cx - half_width, cy + half_height),
    ]
    canvas.draw().polygon(canvas.to_pixels(corners), fill=value)


def lung_markings(
    canvas: Canvas, rng: np.random.Generator, hilar_distance: np.ndarray
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


def compose_lungs(
    canvas: Canvas,
    lung_air: float,
    lung_field: np.ndarray,
    markings: np.ndarray,
    marking_weight: float,
    texture: np.ndarray,
) -> None:
    """Takes the remaining lung air off the density map and adds the vessel markings it shows."""
    canvas.lung_field = lung_field
    air_layer = canvas.layer("air")
    air_loss = canvas.air_loss if air_layer is None else canvas.air_loss - air_layer
    aeration = 1.0 - np.clip(air_loss, 0.0, 1.0)
    aeration *= lung_field
    basal_overlap = 1.0 - 0.25 * ramp(canvas.y - 0.15, 0.7)  # more soft tissue in front of the lung bases
    canvas.density += aeration * (marking_weight * markings + 0.02 * texture - lung_air * basal_overlap)


__all__ = [
    "BOX_MASK_FRACTION",
    "BOX_MIN_CONTRAST",
    "OBSERVATION_INDEX",
    "Anatomy",
    "Canvas",
    "DrawnPart",
    "add_blobs",
    "add_lesion",
    "bezier",
    "compose_lungs",
    "draw_box",
    "draw_wire_loops",
    "ellipse_radius",
    "gaussian",
    "inside_mask",
    "lung_markings",
    "part_boxes",
    "patch_texture",
    "ramp",
    "sample_anatomy",
    "sample_findings",
    "side_range",
    "soft_band",
    "soft_ellipse",
]
