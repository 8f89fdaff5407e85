"""Deterministic synthetic scenes with ground-truth instance masks.

A scene is a textured background with small clutter, on which shapes are painted back to
front. Some shapes carry parts and parts carry subparts, painted on top of and clipped to their
parent, so the whole / part / subpart ambiguity that SAM learns to resolve exists here too.

Ground truth comes from an owner map: every pixel remembers the last instance painted on it.
An instance's mask is then the pixels owned by it or by one of its descendants, which is
exactly its visible region, parts included.

Only numpy and pillow are used, and every random draw goes through one numpy Generator per
scene, so a seed fully determines a scene.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# Anchor colours for the colour words. Objects jitter around their anchor only a little, so
# the word in an instance's name stays true.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (45, 165, 60),
    "cyan": (40, 205, 215),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOURS = tuple(COLOUR_RGB)
FILLED_SHAPES = ("circle", "ellipse", "triangle", "square", "rectangle", "pentagon", "hexagon", "star", "blob")
THIN_SHAPES = ("line", "curve", "ring")
SHAPES = FILLED_SHAPES + THIN_SHAPES
TEXTURES = ("solid", "gradient", "striped", "checkered", "speckled")
# Stripes and checks on a stroke a few px wide would read as a dashed line, not one object.
THIN_TEXTURES = ("solid", "gradient", "speckled")

MIN_VISIBLE_AREA = 16  # px an instance must show of itself (parts excluded) to be kept
MIN_CONTRAST = 110.0  # RGB distance wanted between an object's colour and what it covers
MAX_DEPTH = 2  # whole (0) -> part (1) -> subpart (2)

_ANCHORS = np.array(list(COLOUR_RGB.values()), np.float32)


def _second_tone(rgb: np.ndarray) -> np.ndarray:
    """A darker (or, for dark colours, lighter) tone of the same hue, for two-tone textures."""
    return rgb * 0.5 if rgb.mean() > 90 else rgb * 0.5 + 110


_TONES = np.array([_second_tone(rgb) for rgb in _ANCHORS], np.float32)


@dataclass
class Scene:
    """One synthetic image and its instances.

    image:   H x W x 3 uint8 RGB.
    masks:   N x H x W bool, the visible region of each instance; a parent's mask includes its
             parts. Every mask has at least MIN_VISIBLE_AREA pixels.
    names:   N strings "<colour> <texture> <shape>", words from COLOURS, TEXTURES, SHAPES.
    parents: N int64, the index of the instance this one is a part of, or -1. A parent always
             comes before its parts.
    """

    image: np.ndarray
    masks: np.ndarray
    names: list[str]
    parents: np.ndarray


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene `index` in the stream `make_scenes(seed, ...)`."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, np.uint64)[0])


def make_scenes(seed: int, count: int, size: int | tuple[int, int] = 256) -> Iterator[Scene]:
    """`count` scenes; scene i is `make_scene(scene_seed(seed, i), size)`."""
    for index in range(count):
        yield make_scene(scene_seed(seed, index), size)


def make_scene(seed: int, size: int | tuple[int, int] = 256) -> Scene:
    """A scene of roughly 3 to 20 instances; `size` is (H, W) or the side of a square."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    rng = np.random.default_rng(seed)
    painter = _Painter(rng, _background(rng, height, width))

    count = int(rng.integers(3, 13))
    short_side = min(height, width)
    # Log-uniform radii: from ~8 px across up to ~90% of the short side, mostly small.
    radii = np.exp(rng.uniform(np.log(4.0), np.log(0.45 * short_side), count))
    # Roughly back to front by size, so a late large shape rarely buries everything.
    for radius in radii[np.argsort(-radii * rng.uniform(0.5, 1.5, count))]:
        kind = rng.choice(THIN_SHAPES) if rng.random() < 0.2 else rng.choice(FILLED_SHAPES)
        centre = rng.uniform((0, 0), (width, height))
        painter.paint(str(kind), centre, float(radius))

    # Mild sensor-like noise; uniform rather than normal because it is several times cheaper.
    image = painter.image
    image += (rng.random((height, width), np.float32) - 0.5) * np.float32(rng.uniform(4, 14))
    np.clip(image, 0, 255, out=image)
    masks, parents, keep = _visible_masks(painter.owner, np.array(painter.parents, np.int64))
    return Scene(
        image=image.transpose(1, 2, 0).astype(np.uint8, order="C"),
        masks=masks,
        names=[name for name, kept in zip(painter.names, keep) if kept],
        parents=parents,
    )


class _Painter:
    """Paints instances on a float image and records who owns each pixel.

    The image is kept channels-first (3 x H x W) while painting: numpy is much faster on long
    inner rows than on a trailing axis of 3.
    """

    def __init__(self, rng: np.random.Generator, image: np.ndarray) -> None:
        self.rng = rng
        self.image = image  # 3 x H x W float32
        self.owner = np.full(image.shape[1:], -1, np.int32)
        self.names: list[str] = []
        self.parents: list[int] = []

    def paint(
        self,
        kind: str,
        centre: np.ndarray,
        radius: float,
        parent: int = -1,
        box: tuple[int, int, int, int] | None = None,
        clip: np.ndarray | None = None,
        depth: int = 0,
    ) -> None:
        """Paint one instance and, sometimes, its parts.

        A whole shape is drawn in its own bounding box; a part is drawn in its parent's box
        (top, left, bottom, right) and clipped to the parent's shape (`clip`), so it always
        lies inside the parent.
        """
        rng = self.rng
        points, stroke = _outline(rng, kind, radius)
        points += centre
        if box is None:
            box = self._bounding_box(points, stroke)
            if box is None:
                return
        top, left, bottom, right = box
        shape = _rasterize(points - (left, top), stroke, (bottom - top, right - left))
        if clip is not None:
            shape &= clip
        if np.count_nonzero(shape) < MIN_VISIBLE_AREA:
            return
        # Shrink to the shape's own box: textures, compositing and parts then cost less.
        rows, cols = np.flatnonzero(shape.any(1)), np.flatnonzero(shape.any(0))
        shape = shape[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        top, left = top + rows[0], left + cols[0]
        bottom, right = top + shape.shape[0], left + shape.shape[1]

        region = self.image[:, top:bottom, left:right]
        texture = str(rng.choice(THIN_TEXTURES if kind in THIN_SHAPES else TEXTURES))
        colour, rgb = _pick_colour(rng, _mean_under(region, shape), two_tone=texture != "solid")
        np.copyto(region, _texture(rng, texture, rgb, *shape.shape), where=shape)
        index = len(self.names)
        np.copyto(self.owner[top:bottom, left:right], index, where=shape)
        self.names.append(f"{colour} {texture} {kind}")
        self.parents.append(parent)

        # Thin shapes have no room for parts; deeper levels get parts less often.
        if depth >= MAX_DEPTH or kind in THIN_SHAPES or radius < 14 or rng.random() > 0.5 - 0.1 * depth:
            return
        ys, xs = np.nonzero(shape)
        for _ in range(int(rng.integers(1, 4)) if depth == 0 else 1):
            pick = rng.integers(len(ys))
            part_kind = rng.choice(THIN_SHAPES) if rng.random() < 0.1 else rng.choice(FILLED_SHAPES)
            part_centre = np.array((left + xs[pick], top + ys[pick]), np.float64)
            part_radius = radius * rng.uniform(0.2, 0.5)
            self.paint(str(part_kind), part_centre, part_radius, index, (top, left, bottom, right), shape, depth + 1)

    def _bounding_box(self, points: np.ndarray, stroke: int) -> tuple[int, int, int, int] | None:
        """(top, left, bottom, right) of the points grown by the stroke, clipped to the image."""
        height, width = self.owner.shape
        left, top = np.floor(points.min(0) - stroke - 1).astype(int)
        right, bottom = np.ceil(points.max(0) + stroke + 2).astype(int)
        top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
        return (top, left, bottom, right) if bottom > top and right > left else None


def _outline(rng: np.random.Generator, kind: str, radius: float) -> tuple[np.ndarray, int]:
    """K x 2 (x, y) points of a shape centred on the origin, and its stroke width.

    A stroke width of 0 means a filled polygon; thin shapes are polylines of that width.
    Every filled shape, blobs included, is a polygon from a radius-per-angle profile.
    """
    stroke = int(rng.integers(2, 6)) if kind in THIN_SHAPES else 0
    stretch = rng.uniform(0.35, 0.8) if kind in ("ellipse", "rectangle", "ring") else 1.0
    if kind == "line":
        u, v = np.array([-radius, radius]), np.zeros(2)
    elif kind == "curve":
        t = np.linspace(-1.0, 1.0, 24)
        wave = np.sin(rng.uniform(0.5, 2.0) * np.pi * t + rng.uniform(0, 2 * np.pi))
        u, v = radius * t, radius * rng.uniform(0.15, 0.5) * wave
    else:
        sides = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6}.get(kind, 40)
        if kind == "star":
            sides = 2 * int(rng.integers(4, 8))  # 4 to 7 points
        angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) + np.pi / sides
        profile = np.full(sides, radius)
        if kind == "star":
            profile[1::2] *= rng.uniform(0.35, 0.6)
        elif kind == "blob":
            # A few low harmonics give a smooth, irregular closed outline.
            for k in range(2, 6):
                profile *= 1 + rng.uniform(0, 0.35 / k * 2) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
        elif kind in ("triangle", "pentagon", "hexagon"):
            profile *= rng.uniform(0.75, 1.0, sides)
            angles += rng.uniform(-0.2, 0.2, sides)
        if kind == "ring":
            angles = np.append(angles, angles[0])
            profile = np.append(profile, profile[0])
        u, v = profile * np.cos(angles), profile * np.sin(angles) * stretch
    rotation = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(rotation), np.sin(rotation)
    return np.stack([u * cos - v * sin, u * sin + v * cos], axis=1), stroke


def _rasterize(points: np.ndarray, stroke: int, shape: tuple[int, int]) -> np.ndarray:
    """H x W bool mask of a polygon (stroke 0) or a polyline of width `stroke`."""
    canvas = Image.new("L", (shape[1], shape[0]))
    draw = ImageDraw.Draw(canvas)
    xy = points.ravel().tolist()
    if stroke:
        draw.line(xy, fill=1, width=stroke, joint="curve")
    else:
        draw.polygon(xy, fill=1)
    return np.asarray(canvas) > 0


def _mean_under(region: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Mean RGB of a 3 x h x w `region` under `shape`, from every third pixel when that finds any."""
    sampled = region[:, ::3, ::3][:, shape[::3, ::3]]
    return (sampled if sampled.shape[1] else region[:, shape]).mean(1)


def _pick_colour(rng: np.random.Generator, underneath: np.ndarray, two_tone: bool) -> tuple[str, np.ndarray]:
    """A colour word far enough from what the shape covers, and its jittered RGB.

    For two-tone textures the second tone must stand out too, if less, or half the object
    could melt into the background.
    """
    distance = np.linalg.norm(_ANCHORS - underneath, axis=1)
    if two_tone:
        distance = np.minimum(distance, 2 * np.linalg.norm(_TONES - underneath, axis=1))
    candidates = np.flatnonzero(distance > MIN_CONTRAST)
    index = int(rng.choice(candidates)) if candidates.size else int(distance.argmax())
    return COLOURS[index], _ANCHORS[index] + rng.uniform(-15, 15, 3).astype(np.float32)


def _ramp(rng: np.random.Generator, height: int, width: int, normalize: bool = True) -> np.ndarray:
    """H x W float32 distance in px along a random direction, from 0; scaled to [0, 1] if `normalize`."""
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along = np.arange(width, dtype=np.float32) * cos + np.arange(height, dtype=np.float32)[:, None] * sin
    along -= along.min()
    if normalize:
        along /= along.max() + np.float32(1e-6)
    return along


def _texture(rng: np.random.Generator, texture: str, rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """3 x H x W float32 fill: the colour alone, or blended with a darker or lighter tone of it."""
    # The second tone keeps the hue, so the colour word still describes the object.
    rgb, tone = rgb[:, None, None], _second_tone(rgb)[:, None, None]
    if texture == "solid":
        return np.broadcast_to(rgb, (3, height, width))
    if texture == "speckled":
        noise = rng.random((height, width), np.float32) - 0.5
        return rgb + noise * np.float32(rng.uniform(50, 110))
    if texture == "gradient":
        weight = _ramp(rng, height, width)
    elif texture == "striped":
        weight = (_ramp(rng, height, width, normalize=False) // rng.uniform(1.5, 5.0)) % 2
    else:  # checkered
        cell = rng.integers(3, 9)
        weight = (np.arange(width) // cell + np.arange(height)[:, None] // cell) % 2
    return rgb + (tone - rgb) * weight.astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """3 x H x W float32: a muted two-tone gradient, low-frequency mottling and clutter.

    The clutter (dots and short strokes) is not an instance: it teaches that not every small
    contrasting thing is an object, and it is too small to be one.
    """
    tones = rng.uniform(30, 225, (2, 3)).astype(np.float32)
    grey = tones.mean(1, keepdims=True)
    tones = grey + np.float32(rng.uniform(0.15, 0.8)) * (tones - grey)  # muted, so objects stand out
    cells = rng.standard_normal((int(rng.integers(3, 9)), int(rng.integers(3, 9))), np.float32)
    mottle = np.asarray(Image.fromarray(cells, "F").resize((width, height), Image.BILINEAR))
    mottle = mottle * np.float32(rng.uniform(4, 16))
    # Built channel by channel in place: full-size temporaries are what costs time here.
    image = np.empty((3, height, width), np.float32)
    ramp = _ramp(rng, height, width)
    for channel in range(3):
        np.multiply(ramp, tones[1, channel] - tones[0, channel], out=image[channel])
        image[channel] += mottle
        image[channel] += tones[0, channel]

    count = int(rng.integers(5, 40))
    labels = Image.new("L", (width, height))
    draw = ImageDraw.Draw(labels)
    for label in range(1, count + 1):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.5:
            r = rng.uniform(0.5, 2.0)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=label)
        else:
            dx, dy = rng.uniform(-5, 5, 2)
            draw.line((x, y, x + dx, y + dy), fill=label, width=1)
    labels = np.asarray(labels)
    palette = rng.uniform(0, 255, (3, count + 1)).astype(np.float32)
    palette = 0.5 * palette + 0.5 * image.mean((1, 2))[:, None]  # quieter than the objects
    cluttered = labels > 0
    image[:, cluttered] = palette[:, labels[cluttered]]
    return image


def _visible_masks(owner: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the instances that show enough of themselves, their parents, and who was kept.

    An instance is kept if it owns at least MIN_VISIBLE_AREA pixels itself; one that only
    shows through its parts would duplicate a part's mask. A kept instance's parent becomes its
    nearest kept ancestor. Returns (K x H x W bool masks, K int64 parents, N bool keep).
    """
    count = len(parents)
    masks = owner[None] == np.arange(count, dtype=owner.dtype)[:, None, None]
    keep = masks.sum((1, 2)) >= MIN_VISIBLE_AREA
    # Parts come after their parents, so going backwards a subpart reaches its part before
    # the part reaches the whole.
    for index in range(count - 1, -1, -1):
        if parents[index] >= 0:
            masks[parents[index]] |= masks[index]

    new_index = np.cumsum(keep) - 1
    kept_parents = []
    for index in np.flatnonzero(keep):
        ancestor = parents[index]
        while ancestor >= 0 and not keep[ancestor]:
            ancestor = parents[ancestor]
        kept_parents.append(new_index[ancestor] if ancestor >= 0 else -1)
    return masks[keep], np.array(kept_parents, np.int64), keep
