"""Procedural, clearly-marked SYNTHETIC chest radiographs rendered from CheXpert-style observation labels.

The demo's report text is real but its images may not be redistributed, so each demo study gets views drawn here from
its 14 CheXpert states (POSITIVE at full strength, UNCERTAIN at `UNCERTAIN_STRENGTH`, NEGATIVE / NOT_MENTIONED not
drawn), following the radiographic signs of the Fleischner Society glossary (Hansell et al., Radiology 246(3), 2008).
Every image carries "SYNTHETIC" in its top-left corner and `save_png` writes PNG text chunks saying so. Rendering is
deterministic for a seed, with one random stream per purpose (anatomy, each finding, each view). More: docs/data.md.

Each view's metadata also holds the true lesion boxes (`BOXED_OBSERVATIONS`), measured from what was drawn: while a
finding is drawn the canvas records how much it changes the density (through the lung air where it takes air away)
at every pixel of the posed view, and the box bounds the pixels where that change is at least `BOX_MASK_FRACTION` of
its peak (parts peaking below `BOX_MIN_CONTRAST` get none). Recording only reads the maps and draws no random number,
so the pixels are those of a renderer without boxes.
"""

from collections.abc import Mapping, Sequence
from functools import lru_cache
from os import PathLike
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from PIL.PngImagePlugin import PngInfo

from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN

from .boxes import LesionBox
from .synthetic_anatomy import (
    BOX_MASK_FRACTION,
    BOX_MIN_CONTRAST,
    OBSERVATION_INDEX,
    Anatomy,
    Canvas,
    add_blobs,
    add_lesion,
    bezier,
    compose_lungs,
    draw_box,
    draw_wire_loops,
    ellipse_radius,
    gaussian,
    inside_mask,
    lung_markings,
    part_boxes,
    patch_texture,
    ramp,
    sample_anatomy,
    sample_findings,
    side_range,
    soft_band,
    soft_ellipse,
)

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

BOXED_OBSERVATIONS = tuple(
    name for name in CHEXPERT_OBSERVATIONS if name not in ("No Finding", "Enlarged Cardiomediastinum")
)
"""
The observations that get boxes (labelled with the observation's name), in `CHEXPERT_OBSERVATIONS` order:
- one box per drawn part: Edema one per side on the frontal view (perihilar haze with the Kerley lines of that
  side) and one on the lateral, Pleural Effusion one per effusion side on the frontal view, Support Devices one per
  device (sternotomy wires, pacemaker with its lead, central line), every other finding one per view;
- Cardiomegaly boxes the heart shadow above the diaphragm (as VinDr-CXR boxes "Cardiomegaly"), also at UNCERTAIN;
- Fracture (a broken posterior rib: gap and callus; the shifted rib beyond it is not boxed) only on the frontal
  view, where it is drawn.
No box: No Finding, Enlarged Cardiomediastinum (a diffuse widening of the whole mediastinum, drawn as anatomy) and
Pleural Other on a view where the thickening lies outside the lung field.
"""

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
        unknown = set(labels) - set(OBSERVATION_INDEX)
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
# Frontal (PA) view
# --------------------------------------------------------------------------------------------------------------------


def _draw_frontal(canvas: Canvas, anatomy: Anatomy, findings: dict[str, dict], rng: np.random.Generator) -> None:
    x, y, edge = canvas.x, canvas.y, canvas.edge
    lateral = np.abs(x)
    density = canvas.density
    # Soft tissue: neck, sloping shoulders, chest wall, arms at the edges; the abdomen is a little denser.
    shoulder = -0.84 + 0.5 * np.square(np.maximum(lateral - 0.2, 0.0))
    torso = ramp(anatomy.body_half_width + 0.06 * y - lateral, 0.06) * ramp(y - shoulder, 0.08)
    arms = ramp(0.13 - np.abs(lateral - 0.92), 0.06) * ramp(y + 0.75, 0.1)
    body = np.maximum(np.maximum(torso, ramp(0.19 - lateral, 0.05)), arms)
    density += anatomy.soft_tissue * body + 0.05 * ramp(y - 0.45, 0.3) * torso + 0.03
    # Cardiomediastinal silhouette: heart (tilted half-ellipse on the diaphragm), upper mediastinum, aortic knob.
    heart_right, heart_left = anatomy.heart_span
    heart_height = 0.38 + 0.3 * (anatomy.cardiothoracic_ratio - 0.45)
    heart = soft_ellipse(
        canvas,
        (heart_right + heart_left) / 2,
        anatomy.heart_base_y,
        (heart_left - heart_right) / 2,
        heart_height,
        -anatomy.heart_tilt,
    )
    silhouette = np.maximum(
        heart, ramp(anatomy.mediastinum_half_width - np.abs(x - 0.01), edge) * ramp(0.3 - y, 0.1)
    )
    knob_x = anatomy.mediastinum_half_width + 0.02
    knob = canvas.crop((knob_x - 0.08, knob_x + 0.08), (-0.41, -0.25))
    np.maximum(silhouette[knob.window], soft_ellipse(knob, knob_x, -0.33, 0.065, 0.06), out=silhouette[knob.window])
    above_diaphragm = ramp(min(anatomy.dome_top) + 0.03 - y, 0.06)
    density += 0.04 * heart * above_diaphragm
    canvas.add_part("Cardiomegaly", anatomy.lung_air * heart * above_diaphragm)  # kept only when enlarged
    # Lungs: tapered ellipses cut by the hemidiaphragm domes and the silhouette, each on its own half of the view.
    lung_field = np.zeros_like(x)
    lung_radii = {}
    for side in (-1, 1):
        half = canvas.crop(side_range(side, 0.0, 0.75), (-0.85, 1.0))
        lung_radii[side] = anatomy.lung_radius(half, side)
        lung = inside_mask(lung_radii[side], anatomy.lung_radius_x, edge) * ramp(
            anatomy.dome(half.x, side) - half.y, edge
        )
        np.maximum(lung_field[half.window], lung, out=lung_field[half.window])
    lung_field *= 1.0 - silhouette
    texture, markings = lung_markings(
        canvas, rng, np.sqrt(np.square(lateral - 0.17) + np.square(y - anatomy.hilum_y))
    )
    if (params := findings.get("Pneumothorax")) is not None:
        with canvas.drawing("Pneumothorax", lung_field=lung_field):
            _frontal_pneumothorax(canvas, anatomy, params, lung_field, lung_radii[params["side"]], markings)
    # Bones: spine, clavicles, humeral heads, ribs.
    vertebrae = 0.75 + 0.25 * np.square(np.cos(y * (np.pi / 0.115)))
    density += 0.12 * soft_band(x, 0.065) * vertebrae
    for side in (-1, 1):
        shoulder_girdle = canvas.crop(side_range(side, 0.04, 0.96), (-0.9, -0.45))
        along = shoulder_girdle.x * side
        clavicle_y = -0.66 - 0.25 * (along - 0.08) + 0.3 * np.square(along - 0.36)
        clavicle = soft_band(shoulder_girdle.y - clavicle_y, 0.03)
        clavicle = clavicle * ramp(along - 0.07, 0.03) * ramp(0.66 - along, 0.05)
        humeral_head = soft_ellipse(shoulder_girdle, side * 0.83, -0.72, 0.11, 0.12) * ramp(along - 0.72, 0.04)
        shoulder_girdle.density += 0.19 * clavicle + 0.14 * humeral_head
    density += _ribs(canvas, anatomy, findings.get("Fracture"), lateral)
    # Gastric air bubble under the left hemidiaphragm.
    bubble_x, bubble_y = anatomy.lung_center_x + 0.03, anatomy.dome_top[1] + 0.12
    bubble = canvas.crop((bubble_x - 0.1, bubble_x + 0.1), (bubble_y - 0.06, bubble_y + 0.06))
    bubble.density -= 0.1 * soft_ellipse(bubble, bubble_x, bubble_y, 0.08, 0.045)
    _draw_frontal_findings(canvas, anatomy, findings, lung_radii)
    compose_lungs(canvas, anatomy.lung_air, lung_field, markings, 0.13, texture)
    to_pixels = canvas.image_size / 2 * canvas.scale
    canvas.metadata.update(
        cardiothoracic_ratio=anatomy.cardiothoracic_ratio,
        mediastinum_half_width=anatomy.mediastinum_half_width,
        heart_width_px=anatomy.heart_width * to_pixels,
        thorax_width_px=anatomy.thoracic_width * to_pixels,
    )


def _ribs(canvas: Canvas, anatomy: Anatomy, fracture: dict | None, lateral: np.ndarray) -> np.ndarray:
    """Posterior ribs (arcs bowing down laterally) and fainter anterior ribs inside the rib cage. A fracture breaks
    one posterior rib: a gap, a step beyond it, and a little callus."""
    y = canvas.y
    arc = y + (0.8 + anatomy.rib_shift) - 0.1 * lateral - 0.5 * np.square(lateral)
    phase = np.maximum(arc, 0.0, out=arc) ** 0.9
    phase *= 1.0 / anatomy.rib_spacing
    if fracture is not None:
        on_side = (canvas.x * fracture["side"]) > 0
        near_rib = ramp(0.6 - np.abs(phase - fracture["rib"]), 0.2) * on_side
        phase += (fracture["strength"] * fracture["step"]) * near_rib * ramp(lateral - fracture["lateral"], 0.01)
    cage = ramp(0.74 - lateral, 0.05) * ramp(lateral - 0.06, 0.04) * ramp(0.5 - y, 0.2) * ramp(phase - 0.5, 0.3)
    rib_offset = np.abs(phase - np.round(phase))
    posterior = (0.55 * soft_band(rib_offset, 0.2) + 0.45 * soft_band(rib_offset - 0.16, 0.05)) * cage * (phase < 10.5)
    if fracture is not None:
        gap = np.exp(-np.square((lateral - fracture["lateral"]) * (1.0 / fracture["gap"])))
        broken = fracture["strength"] * gap * near_rib
        removed = 0.07 * posterior * broken  # the bone the gap takes off (for the box only)
        posterior *= 1.0 - broken
        callus = np.exp(-np.square((lateral - fracture["lateral"]) * (1.0 / (4.5 * fracture["gap"]))))
        callus *= np.exp(-np.square((phase - fracture["rib"]) * 1.8)) * on_side * (1.0 - 0.6 * gap)
        canvas.density += (0.24 * fracture["strength"]) * callus
        canvas.add_part("Fracture", removed + (0.24 * fracture["strength"]) * callus)
        canvas.metadata["fracture"] = {"side": fracture["side"], "rib": fracture["rib"]}
    anterior_phase = (y + 0.6 * lateral + 0.55 + anatomy.rib_shift) * (1.0 / (anatomy.rib_spacing * 1.15))
    anterior = soft_band(anterior_phase - np.round(anterior_phase), 0.2) * cage * ramp(lateral - 0.22, 0.12)
    return 0.07 * posterior + 0.025 * anterior * (anterior_phase < 7.5)


def _frontal_pneumothorax(
    canvas: Canvas,
    anatomy: Anatomy,
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
    half = canvas.crop(side_range(side, 0.0, 0.75), (-0.85, 1.0))
    collapsed = ellipse_radius(
        half,
        side * (anatomy.lung_center_x - rx * collapse * 0.5),
        anatomy.lung_center_y + ry * collapse * 0.7,
        rx * (1.0 - collapse),
        ry * (1.0 - collapse * 0.5),
    )
    collapsed -= 1.0
    collapsed *= rx  # distance outside the collapsed lung
    within = (lung_radius < 1.0) * ((half.x * side) > 0.05) * ramp(anatomy.dome(half.x, side) - 0.12 - half.y, 0.1)
    pleural_space = ramp(collapsed, canvas.edge) * within
    half.density += (
        (0.12 * strength) * soft_band(collapsed, max(0.008, 0.6 * canvas.pixel)) * within * (lung_radius < 0.97)
    )
    markings[half.window] *= 1.0 - strength * pleural_space
    lung_field[half.window] += (params["lucency"] * strength / anatomy.lung_air) * pleural_space
    canvas.metadata["pneumothorax_side"] = side


def _draw_frontal_findings(
    canvas: Canvas, anatomy: Anatomy, findings: dict[str, dict], lung_radii: dict[int, np.ndarray]
) -> None:
    if (params := findings.get("Lung Opacity")) is not None:
        with canvas.drawing("Lung Opacity"):
            (sx, sy), cx, cy = params["sigma"], params["x"], params["y"]
            patch = canvas.crop((cx - 3 * sx, cx + 3 * sx), (cy - 3 * sy, cy + 3 * sy))
            opacity = gaussian(patch, cx, cy, sx, sy) * patch_texture(params, patch, 10)
            patch.air_loss += (params["strength"] * params["air_loss"]) * opacity
    if (params := findings.get("Consolidation")) is not None:
        with canvas.drawing("Consolidation"):
            side, direction = params["side"], 1.0 if params["lower"] else -1.0
            lung = canvas.crop(side_range(side, 0.0, 0.75), (0.0 - 0.2, 1.0) if params["lower"] else (-0.85, 0.0))
            boundary = params["fissure_y"] + params["fissure_slope"] * (lung.x * side - 0.3)
            lobe = ramp((lung.y - boundary) * direction, 0.05) * ((lung.x * side) > 0.0)
            lung.air_loss += (params["strength"] * params["air_loss"]) * lobe * patch_texture(params, lung, 14)
            start = np.array([side * 0.2, params["fissure_y"] - 0.1 * params["fissure_slope"] + direction * 0.04])
            for angle in params["bronchogram_angles"]:
                heading = np.array([side * np.cos(angle + 0.7), direction * np.sin(angle + 0.7)])
                canvas.polyline(np.stack([start, start + 0.28 * heading]), 0.6 * params["strength"], 0.014, "air")
    if (params := findings.get("Pneumonia")) is not None:
        with canvas.drawing("Pneumonia"):
            add_blobs(canvas, params["blobs"], params, 24)
    if (params := findings.get("Lung Lesion")) is not None:
        with canvas.drawing("Lung Lesion"):
            add_lesion(canvas, params["x"], params["y"], params)
    if (params := findings.get("Edema")) is not None:
        with canvas.drawing("Edema", split_sides=True):
            spread = params["spread"]
            hilum_y = anatomy.hilum_y + 0.05
            hila = canvas.crop((-0.2 - 3 * spread, 0.2 + 3 * spread), (hilum_y - 3.9 * spread, hilum_y + 3.9 * spread))
            haze = sum(gaussian(hila, side * 0.2, hilum_y, spread, spread * 1.3) for side in (-1, 1))
            hila.air_loss += (params["strength"] * params["air_loss"]) * haze
            for side, height, length in params["kerley_lines"]:
                outer = side * (anatomy.lung_center_x + anatomy.lung_radius_x * 0.93)
                line_y = float(anatomy.dome(outer, side)) - 0.07 - height
                line = np.array([[outer, line_y], [outer - side * length, line_y]])
                canvas.polyline(line, 0.15 * params["strength"], 0.01)
    if (params := findings.get("Atelectasis")) is not None:
        with canvas.drawing("Atelectasis"):
            side = params["side"]
            cx = side * (anatomy.lung_center_x + params["x_offset"])
            cy = float(anatomy.dome(cx, side)) - params["height"]
            reach = params["length"]
            plate = canvas.crop((cx - reach, cx + reach), (cy - reach, cy + reach))
            cosine, sine = float(np.cos(params["angle"])), float(np.sin(params["angle"]))
            dx, dy = plate.x - cx, plate.y - cy
            band = soft_band(dy * cosine - dx * sine, max(params["thickness"], canvas.pixel))
            band *= ramp(params["length"] / 2 - np.abs(dx * cosine + dy * sine), 0.05)
            plate.air_loss += (0.85 * params["strength"]) * band
    if (params := findings.get("Pleural Effusion")) is not None:
        for side, height in zip(params["sides"], params["heights"]):
            with canvas.drawing("Pleural Effusion"):
                height *= 0.5 + 0.5 * params["strength"]
                angle_x, angle_y = anatomy.costophrenic_angle(side)
                base = canvas.crop(side_range(side, 0.0, 0.8), (angle_y - height - 0.05, 1.0))
                medial = anatomy.lung_center_x - 0.6 * anatomy.lung_radius_x
                lateral = np.clip((base.x * side - medial) * (1.0 / (abs(angle_x) - medial)), 0.0, 1.0)
                meniscus = angle_y - height * (0.35 + 0.65 * np.square(lateral))
                base.air_loss += params["strength"] * ramp(base.y - meniscus, 0.04) * ((base.x * side) > 0.0)
    if (params := findings.get("Pleural Other")) is not None:
        with canvas.drawing("Pleural Other"):
            side, top, bottom = params["side"], params["top"], params["top"] + params["length"]
            wall = canvas.crop(side_range(side, 0.0, 0.75), (-0.85, 1.0))
            depth_inside = (1.0 - lung_radii[side]) * anatomy.lung_radius_x
            thickness = params["thickness"] * (1.0 + 0.35 * np.cos(wall.y * 14.0 + params["phase"]))
            rind = ramp(thickness - depth_inside, 0.012) * ramp(wall.y - top, 0.05) * ramp(bottom - wall.y, 0.05)
            wall.air_loss += params["strength"] * rind * ((wall.x * side) > 0.2)
    if (params := findings.get("Support Devices")) is not None:
        _draw_frontal_devices(canvas, anatomy, params)


def _draw_frontal_devices(canvas: Canvas, anatomy: Anatomy, params: dict) -> None:
    strength = params["strength"]
    if "sternotomy" in params["kinds"]:
        with canvas.drawing("Support Devices"):
            wire_y = np.linspace(params["wire_top"], params["wire_bottom"], params["wire_count"])
            draw_wire_loops(canvas, np.stack([np.full_like(wire_y, 0.01), wire_y], axis=1), 0.6 * strength, 0.028)
    if "pacemaker" in params["kinds"]:
        with canvas.drawing("Support Devices"):
            side = params["pacemaker_side"]
            box_x, box_y = side * params["pacemaker_xy"][0], params["pacemaker_xy"][1]
            draw_box(canvas, (box_x, box_y), (0.07, 0.05), 0.6 * strength)
            tip = (0.3 * anatomy.heart_span[1], anatomy.heart_base_y - 0.08)
            lead = bezier((box_x - side * 0.05, box_y + 0.03), (side * 0.03, -0.55), tip)
            canvas.polyline(lead, 0.45 * strength, 0.012)
    if "central_line" in params["kinds"]:
        with canvas.drawing("Support Devices"):
            side = params["line_side"]
            line = bezier((side * 0.4, -0.98), (side * 0.1, -0.72), (0.04 * side - 0.02, params["line_tip_y"]))
            canvas.polyline(line, 0.35 * strength, 0.014)


# --------------------------------------------------------------------------------------------------------------------
# Lateral view (patient facing image left: x < 0 anterior, x > 0 posterior)
# --------------------------------------------------------------------------------------------------------------------

_LATERAL_LUNG = (0.06, -0.04, 0.56, 0.74)
"""Centre x, centre y, half depth and half height of the lung field on the lateral view."""


def _lateral_dome(anatomy: Anatomy, x: np.ndarray | float) -> np.ndarray | float:
    """Hemidiaphragm on the lateral view: highest just anterior of centre, deepest in the posterior sulcus."""
    offset = x + 0.15
    return min(anatomy.dome_top) + 0.02 + 0.15 * offset * offset + 0.27 * np.square(np.maximum(offset, 0.0))


def _lateral_x(depth: float) -> float:
    """Lateral-view x of a finding from its study-level depth in [-0.3, 0.3] (anterior negative)."""
    return _LATERAL_LUNG[0] + depth * _LATERAL_LUNG[2] * 1.3


def _draw_lateral(canvas: Canvas, anatomy: Anatomy, findings: dict[str, dict], rng: np.random.Generator) -> None:
    x, y, edge = canvas.x, canvas.y, canvas.edge
    density = canvas.density
    cx, cy, rx, ry = _LATERAL_LUNG
    # Soft tissue: chest between the anterior and posterior skin, raised arms over the upper anterior chest.
    anterior_skin, posterior_skin = -0.72 + 0.06 * np.square(y + 0.2), 0.86 - 0.05 * np.square(y)
    torso = ramp(x - anterior_skin, 0.05) * ramp(posterior_skin - x, 0.05) * ramp(y + 1.1, 0.1)
    arms = inside_mask(ellipse_radius(canvas, -0.1, -0.88, 0.42, 0.3, 0.3), 0.3, 0.1)
    density += anatomy.soft_tissue * np.maximum(torso, arms) + 0.06 * arms + 0.05 * ramp(y - 0.45, 0.3) * torso
    density += 0.03
    # Lung field (narrower at the apex), cut by the diaphragm; heart anterior and inferior; anterior mediastinum.
    taper = 1.0 / (0.8 + 0.2 * np.clip((y + 0.8) * (1.0 / 0.9), 0.0, 1.0))
    lung_radius = np.sqrt(np.square((x - cx) * taper * (1.0 / rx)) + np.square((y - cy) * (1.0 / ry)))
    below_dome = y - _lateral_dome(anatomy, x)  # > 0 under the diaphragm
    lung_field = inside_mask(lung_radius, rx, edge) * ramp(-below_dome, edge)
    heart_depth = 0.42 * anatomy.cardiothoracic_ratio / 0.45
    heart_y = float(_lateral_dome(anatomy, -0.2)) + 0.04
    heart = soft_ellipse(canvas, -0.5 + heart_depth / 2, heart_y, heart_depth / 2, 0.38, 0.15)
    widening = float(np.clip((anatomy.mediastinum_half_width - 0.08) / 0.09, 0.0, 1.0))
    silhouette = heart.copy()
    if widening > 0:
        front = canvas.crop((-0.6, -0.1), (-0.6, 0.0))
        anterior_mediastinum = soft_ellipse(front, -0.38, -0.3, 0.06 + 0.08 * widening, 0.22) * widening
        np.maximum(silhouette[front.window], anterior_mediastinum, out=silhouette[front.window])
    lung_field *= 1.0 - silhouette
    above_diaphragm = ramp(0.03 - below_dome, 0.06)
    density += 0.04 * heart * above_diaphragm
    canvas.add_part("Cardiomegaly", anatomy.lung_air * heart * above_diaphragm)  # kept only when enlarged
    hilar_distance = np.sqrt(np.square(x - 0.06) + np.square(y - anatomy.hilum_y - 0.04))
    texture, markings = lung_markings(canvas, rng, hilar_distance)
    if (params := findings.get("Pneumothorax")) is not None:
        with canvas.drawing("Pneumothorax", lung_field=lung_field):
            strength = params["strength"]
            apex_gap = params["collapse"] * strength**0.5 * 0.6
            apex = canvas.crop((cx - rx, cx + rx), (cy - ry, -0.2))
            collapsed = ellipse_radius(
                apex, cx, cy + ry * apex_gap * 0.6, rx * (1.0 - apex_gap * 0.3), ry * (1.0 - apex_gap * 0.5)
            )
            collapsed -= 1.0
            collapsed *= rx
            apex_radius = lung_radius[apex.window]
            within = (apex_radius < 1.0) * ramp(-0.25 - apex.y, 0.1)
            pleural_space = ramp(collapsed, edge) * within
            line = soft_band(collapsed, max(0.008, 0.6 * canvas.pixel)) * within * (apex_radius < 0.97)
            apex.density += (0.1 * strength) * line
            markings[apex.window] *= 1.0 - strength * pleural_space
            lung_field[apex.window] += (params["lucency"] * strength / anatomy.lung_air) * pleural_space
    # Bones and airway: trachea, vertebral bodies with disc spaces, posterior elements, sternum, posterior ribs.
    density -= 0.05 * soft_band(x - (-0.02 + 0.12 * (y + 1.0)), 0.045) * ramp(-0.2 - y, 0.08)
    spine_x = 0.4 + 0.06 * y - 0.08 * np.square(y)
    discs = 0.65 + 0.35 * ramp(np.abs(np.cos(y * (np.pi / 0.125))) - 0.25, 0.3)
    density += 0.09 * ramp(0.08 - np.abs(x - spine_x), 0.025) * discs + 0.05 * soft_band(x - spine_x - 0.17, 0.035)
    front = canvas.crop((-0.75, -0.45), (-0.7, 0.4))
    sternum = soft_band(front.x - (-0.62 + 0.08 * (front.y + 0.6)), 0.025)
    front.density += 0.08 * sternum * ramp(front.y + 0.62, 0.04) * ramp(0.3 - front.y, 0.04)
    rib_phase = (y - 0.5 * x + anatomy.rib_shift) * (1.0 / (anatomy.rib_spacing * 1.1))
    ribs = soft_band(rib_phase - np.round(rib_phase), 0.22) * ramp(x - 0.05, 0.15) * ramp(0.55 - y, 0.1) * torso
    density += 0.035 * ribs
    # The second hemidiaphragm a little higher, and the gastric bubble under the anterior dome.
    second_dome = soft_band(below_dome + 0.05, 0.012) * ramp(x + 0.5 - heart_depth, 0.05)
    density += 0.05 * second_dome * ramp(0.6 - x, 0.05)
    bubble_y = float(_lateral_dome(anatomy, -0.15)) + 0.1
    bubble = canvas.crop((-0.28, -0.02), (bubble_y - 0.07, bubble_y + 0.07))
    bubble.density -= 0.09 * soft_ellipse(bubble, -0.15, bubble_y, 0.11, 0.05)
    _draw_lateral_findings(canvas, anatomy, findings, lung_radius)
    compose_lungs(canvas, anatomy.lung_air, lung_field, markings, 0.06, texture)
    canvas.metadata.update(cardiothoracic_ratio=anatomy.cardiothoracic_ratio, heart_depth=heart_depth)


def _draw_lateral_findings(
    canvas: Canvas, anatomy: Anatomy, findings: dict[str, dict], lung_radius: np.ndarray
) -> None:
    cx, _, rx, _ = _LATERAL_LUNG
    if (params := findings.get("Lung Opacity")) is not None:
        with canvas.drawing("Lung Opacity"):
            sigma, px, py = params["sigma"][1], _lateral_x(params["depth"]), params["y"]
            patch = canvas.crop((px - 3 * sigma, px + 3 * sigma), (py - 3 * sigma, py + 3 * sigma))
            opacity = gaussian(patch, px, py, sigma, sigma) * patch_texture(params, patch, 10)
            patch.air_loss += (params["strength"] * params["air_loss"] * 0.8) * opacity
    if (params := findings.get("Consolidation")) is not None:
        with canvas.drawing("Consolidation"):
            px, py = _lateral_x(params["depth"]), params["fissure_y"] + (0.2 if params["lower"] else -0.2)
            patch = canvas.crop((px - 0.6, px + 0.6), (py - 0.45, py + 0.45))
            opacity = np.clip(1.4 * gaussian(patch, px, py, 0.2, 0.15), 0.0, 1.0) * patch_texture(params, patch, 14)
            patch.air_loss += (params["strength"] * params["air_loss"]) * opacity
    if (params := findings.get("Pneumonia")) is not None:
        with canvas.drawing("Pneumonia"):
            origin_x, depth_x = params["blobs"][0][0], _lateral_x(params["depth"])
            blobs = [(depth_x + 0.8 * (bx - origin_x), by, radius) for bx, by, radius in params["blobs"]]
            add_blobs(canvas, blobs, params, 24)
    if (params := findings.get("Lung Lesion")) is not None:
        with canvas.drawing("Lung Lesion"):
            add_lesion(canvas, _lateral_x(params["depth"]), params["y"], params)
    if (params := findings.get("Edema")) is not None:
        with canvas.drawing("Edema"):
            spread, hilum_y = params["spread"] * 1.4, anatomy.hilum_y + 0.05
            hila = canvas.crop((0.04 - 3 * spread, 0.04 + 3 * spread), (hilum_y - 3 * spread, hilum_y + 3 * spread))
            hila.air_loss += (params["strength"] * params["air_loss"]) * gaussian(hila, 0.04, hilum_y, spread, spread)
    if (params := findings.get("Atelectasis")) is not None:
        with canvas.drawing("Atelectasis"):
            plate_y = float(_lateral_dome(anatomy, 0.0)) - params["height"]
            plate = canvas.crop((-0.5, 0.6), (plate_y - 0.3, plate_y + 0.3))
            band = soft_band(
                (plate.y - plate_y) - 0.4 * params["angle"] * plate.x, max(params["thickness"], canvas.pixel)
            )
            band *= ramp(params["length"] * 0.9 - np.abs(plate.x - 0.05), 0.05)
            plate.air_loss += (0.6 * params["strength"]) * band
    if (params := findings.get("Pleural Effusion")) is not None:
        with canvas.drawing("Pleural Effusion"):
            height = max(params["heights"]) * (0.5 + 0.5 * params["strength"])
            sulcus_y = float(_lateral_dome(anatomy, 0.5))
            base = canvas.crop((-0.3, 0.8), (sulcus_y - 1.2 * height - 0.05, 1.0))
            posterior = np.clip((base.x + 0.2) * (1.0 / 0.75), 0.0, 1.1)
            meniscus = sulcus_y - height * (0.2 + 0.9 * np.square(posterior))
            base.air_loss += params["strength"] * ramp(base.y - meniscus, 0.04)
    if (params := findings.get("Pleural Other")) is not None:
        with canvas.drawing("Pleural Other"):
            top, bottom = params["top"], params["top"] + params["length"]
            wall = canvas.crop((0.2, cx + rx + 0.05), (top - 0.05, bottom + 0.05))
            depth_inside = (1.0 - lung_radius[wall.window]) * rx
            rind = (
                ramp(params["thickness"] - depth_inside, 0.012)
                * ramp(wall.y - top, 0.05)
                * ramp(bottom - wall.y, 0.05)
            )
            wall.air_loss += params["strength"] * rind * (wall.x > 0.2)
    if (params := findings.get("Support Devices")) is not None:
        strength = params["strength"]
        if "sternotomy" in params["kinds"]:
            with canvas.drawing("Support Devices"):
                wire_y = np.linspace(params["wire_top"], params["wire_bottom"], params["wire_count"])
                draw_wire_loops(canvas, np.stack([-0.6 + 0.08 * (wire_y + 0.6), wire_y], axis=1), 0.6 * strength, 0.02)
        if "pacemaker" in params["kinds"]:
            with canvas.drawing("Support Devices"):
                box_y = params["pacemaker_xy"][1]
                draw_box(canvas, (-0.6, box_y), (0.045, 0.065), 0.6 * strength)
                lead = bezier((-0.56, box_y), (-0.1, -0.45), (-0.35, anatomy.heart_base_y - 0.04))
                canvas.polyline(lead, 0.4 * strength, 0.012)
        if "central_line" in params["kinds"]:
            with canvas.drawing("Support Devices"):
                line = bezier((-0.2, -1.0), (-0.08, -0.6), (-0.16, params["line_tip_y"]))
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


def _expose(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
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
        the pose jitter, and `boxes`, a list of [`LesionBox`] (xyxy in pixels of this image, label an observation
        of `BOXED_OBSERVATIONS`, score 1, source "annotated"; see the module docstring).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    strengths = label_strengths(labels)
    findings = sample_findings(seed, strengths)
    anatomy = sample_anatomy(np.random.default_rng([seed, 0]), strengths, findings)
    view_rng = np.random.default_rng([seed, 2, VIEWS.index(view)])
    rotation, scale, shift_x, shift_y = view_rng.random(4).tolist()
    canvas = Canvas.create(
        image_size,
        rotation=np.deg2rad(8.0 * (rotation - 0.5)),
        scale=0.9 + 0.14 * scale,
        shift=(0.1 * (shift_x - 0.5), 0.08 * (shift_y - 0.5)),
    )
    draw_view = _draw_frontal if view == "frontal" else _draw_lateral
    draw_view(canvas, anatomy, findings, view_rng)
    pixels = _expose(canvas, view_rng)
    boxes = [
        LesionBox(*box, label=label)
        for label, box in part_boxes(canvas, anatomy.lung_air)
        if strengths[OBSERVATION_INDEX[label]] > 0
    ]
    metadata = {
        "view": view,
        "findings": {name: params["strength"] for name, params in findings.items()},
        "rotation": canvas.rotation,
        "scale": canvas.scale,
        "shift": canvas.shift,
        **canvas.metadata,
        "boxes": boxes,
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
    "BOXED_OBSERVATIONS",
    "BOX_MASK_FRACTION",
    "BOX_MIN_CONTRAST",
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
