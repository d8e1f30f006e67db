"""Pillow-drawn scenes with known ground truth, and captions and questions made from templates.

A scene is 1-4 copies of one shape (circle, square, triangle, star) in one colour, at random non-overlapping
places and sizes on a light background, sometimes with a word written along the bottom. Because every fact is
known, answers can be checked exactly. Scene i of a split comes from seed (split, i), so the training and the
held-out scenes never coincide and anyone regenerates the same ones.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (240, 200, 0),
           "orange": (245, 130, 0), "purple": (140, 40, 170), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle", "star"]
WORDS = ["cat", "sun", "home", "tree", "milk", "door", "fish", "book"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE = 224
SPLIT_SEEDS = {"train": 1, "val": 2}


@dataclass
class Thing:
    x: int      # centre
    y: int
    r: int      # half the size


@dataclass
class Scene:
    shape: str
    colour: str
    things: list[Thing]
    background: tuple[int, int, int]
    word: str | None = None
    seed: tuple = field(default=())

    @property
    def count(self) -> int:
        return len(self.things)

    @property
    def clean(self) -> bool:
        """No two things touch. Things are placed by their centres' distance, which keeps circles apart but
        can let the corners of squares, triangles or stars meet (then two squares read as one shape); such
        scenes are left out of training and evaluation."""
        if self.shape == "circle":
            return True
        return not any(abs(a.x - b.x) < a.r + b.r + 3 and abs(a.y - b.y) < a.r + b.r + 3
                       for i, a in enumerate(self.things) for b in self.things[i + 1:])

    @property
    def position(self) -> str:
        """Where the first thing is: top/bottom/middle x left/right/centre."""
        t = self.things[0]
        row = "top" if t.y < SIZE * 0.4 else "bottom" if t.y > SIZE * 0.6 else "middle"
        col = "left" if t.x < SIZE * 0.4 else "right" if t.x > SIZE * 0.6 else "centre"
        return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def make_scene(split: str, index: int) -> Scene:
    rng = random.Random(f"{SPLIT_SEEDS[split]}-{index}")
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    n = rng.randint(1, 4)
    word = rng.choice(WORDS) if rng.random() < 0.3 else None
    bottom = SIZE - (40 if word else 8)  # keep the word's strip free
    things: list[Thing] = []
    while len(things) < n:
        things, tries = [], 0
        while len(things) < n and tries < 200:
            tries += 1
            r = rng.randint(14, 34 if n > 2 else 44)
            x, y = rng.randint(8 + r, SIZE - 8 - r), rng.randint(8 + r, bottom - r)
            if all(math.hypot(x - t.x, y - t.y) > r + t.r + 6 for t in things):
                things.append(Thing(x, y, r))
    background = tuple(rng.randint(215, 255) for _ in range(3))
    return Scene(shape, colour, things, background, word, (split, index))


def draw(scene: Scene) -> "Image.Image":
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (SIZE, SIZE), scene.background)
    d = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    for t in scene.things:
        box = (t.x - t.r, t.y - t.r, t.x + t.r, t.y + t.r)
        if scene.shape == "circle":
            d.ellipse(box, fill=fill)
        elif scene.shape == "square":
            d.rectangle(box, fill=fill)
        elif scene.shape == "triangle":
            d.polygon([(t.x, t.y - t.r), (t.x - t.r, t.y + t.r), (t.x + t.r, t.y + t.r)], fill=fill)
        else:  # a five-pointed star
            pts = [(t.x + (t.r if k % 2 == 0 else t.r * 0.45) * math.sin(k * math.pi / 5),
                    t.y - (t.r if k % 2 == 0 else t.r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
            d.polygon(pts, fill=fill)
    if scene.word:
        from PIL import ImageFont
        font = ImageFont.load_default(size=28)
        w = d.textlength(scene.word, font=font)
        d.text(((SIZE - w) / 2, SIZE - 36), scene.word, fill=(0, 0, 0), font=font)
    return im


# -- text ---------------------------------------------------------------------------------------------------------
def caption(scene: Scene) -> str:
    n = scene.count
    text = f"{NUMBERS[n].capitalize()} {scene.colour} {plural(scene.shape, n)}"
    if n == 1:
        text += f" in the {scene.position}" if scene.position != "centre" else " in the centre"
    text += "."
    if scene.word:
        text += f' The word "{scene.word}" is written at the bottom.'
    return text


CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Describe this scene briefly.",
                   "What do you see?"]
QUESTIONS = {
    "colour": ["What colour are the shapes?", "What color is the shape?", "Which colour do you see?"],
    "shape": ["What shape is in the image?", "Which shape is drawn?", "What kind of shape do you see?"],
    "count": ["How many shapes are there?", "How many shapes do you see?", "Count the shapes."],
    "position": ["Where is the shape?"],
    "word": ["What word is written in the image?"],
}


def answer(scene: Scene, kind: str) -> str:
    n = scene.count
    if kind == "colour":
        return f"{'It is' if n == 1 else 'They are'} {scene.colour}."
    if kind == "shape":
        return f"{'A' if n == 1 else NUMBERS[n].capitalize()} {plural(scene.shape, n)}."
    if kind == "count":
        return f"There {'is' if n == 1 else 'are'} {n}."
    if kind == "position":
        return f"In the {scene.position}."
    if kind == "word":
        return f'"{scene.word}".'
    raise ValueError(kind)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every kind that applies to this scene."""
    kinds = ["colour", "shape", "count"] + (["position"] if scene.count == 1 else []) + \
        (["word"] if scene.word else [])
    return [(k, rng.choice(QUESTIONS[k]), answer(scene, k)) for k in kinds]


_NUMBER_WORDS = {w: n for n, w in NUMBERS.items()}


def grade(kind: str, scene: Scene, reply: str) -> bool:
    """Whether a free-text reply answers the question right: it names the true value and no other one."""
    words = re.findall(r"[a-z]+|\d+", reply.lower().replace("color", "colour"))
    if kind == "colour":
        named = {w for w in words if w in COLOURS}
        return named == {scene.colour}
    if kind == "shape":
        named = {w.rstrip("s") for w in words if w.rstrip("s") in SHAPES}
        return named == {scene.shape}
    if kind == "count":
        named = {int(w) if w.isdigit() else _NUMBER_WORDS[w] for w in words
                 if w.isdigit() or w in _NUMBER_WORDS}
        return named == {scene.count}
    if kind == "position":
        return scene.position in " ".join(words)
    if kind == "word":
        return scene.word in words
    raise ValueError(kind)
