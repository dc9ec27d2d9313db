"""A deterministic synthetic visual benchmark ("shapes") in the paper's task shapes.

Each image is a uniform gray canvas cut into a grid of patch-sized cells (12 x 12 = 144 image
tokens with the built-in model's 16-pixel patches); small coloured objects sit each inside one
cell, so the answer depends on one or a few image tokens among many uninformative ones, which is
what makes the choice of pruned tokens matter. Question kinds (section 5 / appendix E prompts):

- mc: multiple choice with letter answers (ScienceQA prompt): the colour of the named shape, or
  the shape of the named colour; 4 options.
- pope: POPE-style presence, "Is there a circle in the image?" / "Is there a red object in the
  image?" (or, in the `pair` variant, "Is there a red circle ...?" with `random` and
  `adversarial` negatives); exactly half of a test set's answers are yes.
- caption: one-sentence caption listing the objects in reading order.
- word: a one-word colour or shape answer (a training aid; not scored by the benchmark task).

The default configuration is the built-in benchmark: one object of 4 colours x 4 shapes per
image, single-attribute POPE questions, and the four values as options in a shuffled order (the
gold letter cycles A-D). That is the version a 10-layer model trains to 100% of the held-out
questions within 40 minutes of one CPU core (see himap.builtin.train). Both answers are interactions
between the question and the image (which option holds the image's value; whether the value
asked is the image's): yes/no stayed at chance until the training got an answer-position probe,
shuffled options until the training mix weighted mc higher (then ~1,200 steps near chance before
it rose). `mc_options="fixed"` (the values in canonical order) is the easier variant; the
richer one (`max_objects=3, pope_query="pair"`, 6 colours) is kept for experiments, untried with
the current recipe.

Sample i of a stream with seed s is drawn from numpy's generator seeded with (s, kind, i), so any
sample can be regenerated alone and the stream is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COLOURS = {
    "red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 40, 230),
    "yellow": (240, 230, 20), "white": (250, 250, 250), "black": (10, 10, 10),
}
"""Colour names and their RGB values: saturated and far apart, on a mid-gray background
(SyntheticConfig.colours picks the ones used)."""

SHAPES = ("circle", "square", "triangle", "cross")
"""Shape names; each is drawn by `draw_object`."""

KINDS = ("mc", "pope", "caption", "word")
"""Question kinds; the first three are the benchmark's splits, `word` only helps training."""

LETTERS = "ABCD"

MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # SPEC section 5, ScienceQA
POPE_SUFFIX = "Please just answer yes or no."  # SPEC section 5, POPE
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # SPEC section 5, captions
WORD_SUFFIX = "Answer with a single word."

TRAIN_SEED = 0
"""Seed of the training stream (himap train-default)."""
VALID_SEED = 1
"""Seed of the held-out stream used to pick checkpoints during training."""
TEST_SEED = 2
"""Seed of the built-in test set (himap.tasks.shapes, himap demo)."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Image and scene parameters of the benchmark."""

    image_size: int = 192  # canvas side in pixels (the processor's crop size)
    patch_size: int = 16  # grid cell side = the vision tower's patch size, so one object = one token
    object_size: int = 12  # object side in pixels, drawn inside one cell
    jitter: int = 1  # the object's offset inside its cell varies by +-jitter pixels around centre
    min_objects: int = 1  # objects per image, inclusive range (distinct colours and shapes)
    max_objects: int = 1
    background: tuple[int, int, int] = (128, 128, 128)  # uniform canvas colour
    pope_query: str = "attribute"  # POPE questions name one "attribute" (shape or colour) or a "pair"
    mc_options: str = "shuffled"  # options list every value in canonical order ("fixed") or 3 random wrong ones ("shuffled")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")  # the colours used (keys of COLOURS)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        margin = (self.patch_size - self.object_size) // 2
        if self.object_size > self.patch_size or margin < self.jitter:
            raise ValueError("object_size + 2 * jitter must fit inside one patch-sized cell")
        if self.mc_options not in ("fixed", "shuffled"):
            raise ValueError(f"mc_options must be 'fixed' or 'shuffled', got {self.mc_options!r}")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown or len(self.colours) < len(LETTERS):
            raise ValueError(f"colours must be at least {len(LETTERS)} of {list(COLOURS)}, got {self.colours}")
        if self.pope_query not in ("pair", "attribute"):
            raise ValueError(f"pope_query must be 'pair' or 'attribute', got {self.pope_query!r}")
        if not 1 <= self.min_objects <= self.max_objects <= min(len(self.colours), len(SHAPES)):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {min(len(self.colours), len(SHAPES))}")

    @property
    def grid(self) -> int:
        """Cells per side (image tokens per side)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes and where it is drawn."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    cell: tuple[int, int]  # (row, column) of its grid cell; image token index = row * grid + column
    offset: tuple[int, int]  # (dy, dx) pixel offset from the cell's centred position


@dataclass(frozen=True)
class Sample:
    """One question about one generated image."""

    id: str  # "{seed}-{index}"
    kind: str  # one of KINDS
    prompt: str  # full user text after the image
    answer: str  # gold answer text: a letter, "yes"/"no", a caption or a word
    objects: tuple[ShapeObject, ...]  # the scene, in reading order (row, then column)
    meta: dict = field(default_factory=dict)  # category, options, ...
    copies: tuple[ShapeObject, ...] = ()  # extra copies of the objects in other cells (training curriculum only)

    def image(self, config: SyntheticConfig = SyntheticConfig(), blank: bool = False):
        """The rendered PIL image (`blank=True`: the empty canvas, for the Appendix-B check)."""
        return render(() if blank else self.objects + self.copies, config)


def draw_object(draw, obj: ShapeObject, config: SyntheticConfig) -> None:
    """Draw `obj` with PIL's ImageDraw inside its cell."""
    p, s = config.patch_size, config.object_size
    y0 = obj.cell[0] * p + (p - s) // 2 + obj.offset[0]
    x0 = obj.cell[1] * p + (p - s) // 2 + obj.offset[1]
    box = (x0, y0, x0 + s - 1, y0 + s - 1)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    elif obj.shape == "cross":
        t = max(2, s // 3)
        a = (s - t) // 2
        draw.rectangle((x0 + a, y0, x0 + a + t - 1, y0 + s - 1), fill=fill)
        draw.rectangle((x0, y0 + a, x0 + s - 1, y0 + a + t - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")


def render(objects, config: SyntheticConfig = SyntheticConfig()):
    """A PIL RGB image of `objects` on the uniform background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (config.image_size, config.image_size), config.background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj, config)
    return image


def random_scene(rng, config: SyntheticConfig = SyntheticConfig()) -> tuple[ShapeObject, ...]:
    """1-3 objects with distinct colours, shapes and cells, in reading order."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    colours = rng.permutation(list(config.colours))[:n]
    shapes = rng.permutation(list(SHAPES))[:n]
    cells = rng.choice(config.grid * config.grid, size=n, replace=False)
    objs = [ShapeObject(str(c), str(s), (int(k) // config.grid, int(k) % config.grid),
                        tuple(int(v) for v in rng.integers(-config.jitter, config.jitter + 1, size=2)))
            for c, s, k in zip(colours, shapes, cells)]
    return tuple(sorted(objs, key=lambda o: o.cell))


def random_copies(rng, objects, copies: int, config: SyntheticConfig = SyntheticConfig()):
    """copies - 1 more copies of each object, each in a free cell: with many copies the answer
    shows in many image tokens, an easier start for training (the copies fade out over it)."""
    used = {o.cell[0] * config.grid + o.cell[1] for o in objects}
    free = [k for k in range(config.grid * config.grid) if k not in used]
    n = min((copies - 1) * len(objects), len(free))
    cells = rng.choice(free, size=n, replace=False)
    return tuple(ShapeObject(objects[i % len(objects)].colour, objects[i % len(objects)].shape,
                             (int(k) // config.grid, int(k) % config.grid), objects[i % len(objects)].offset)
                 for i, k in enumerate(cells))


def options_text(options) -> str:
    """"(A) red (B) blue (C) ..." as in LLaVA's ScienceQA files."""
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def caption(objects) -> str:
    """"a red circle, a blue square and a green cross." (reading order)."""
    names = [f"a {o.colour} {o.shape}" for o in objects]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return body + "."


def _mc(rng, objects, index, config):
    target = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
        category, question, gold, values = "colour", f"What color is the {target.shape}?", target.colour, config.colours
    else:
        category, question, gold, values = "shape", f"What shape is the {target.colour} object?", target.shape, SHAPES
    if config.mc_options == "fixed":  # the first four values in canonical order, the gold among them
        options = [v for v in values if v == gold or values.index(v) < len(LETTERS)][: len(LETTERS)]
        if gold not in options:
            options[-1] = gold
        answer_index = options.index(gold)
    else:
        wrong = [str(x) for x in rng.permutation([v for v in values if v != gold])[: len(LETTERS) - 1]]
        answer_index = index % len(LETTERS)  # gold letters exactly balanced: always-one-letter scores 25%
        options = wrong[:answer_index] + [gold] + wrong[answer_index:]
    prompt = f"{question} Options: {options_text(options)}. {MC_SUFFIX}"
    return prompt, LETTERS[answer_index], {"category": category, "options": options, "target": gold}


UNSEEN_SHAPES = ("star", "diamond")
"""Shape words of the vocabulary that are never drawn (training-only POPE negatives)."""


def _pope_attribute(rng, objects, index, config, unseen: float = 0.0, fixed_draws: bool = False):
    """POPE with one attribute: "Is there a circle in the image?" / "... a red object ...?".
    With probability `unseen`, a negative names a shape or colour that is never drawn (a
    training aid: its answer depends on the question alone, which teaches reading the query).
    `fixed_draws`: always three draws from rng, whatever the answer (flipped twins stay in step)."""
    if rng.random() < 0.5:
        present, universe, category = {o.shape for o in objects}, SHAPES, "shape"
        never = UNSEEN_SHAPES
    else:
        present, universe, category = {o.colour for o in objects}, config.colours, "colour"
        never = tuple(c for c in COLOURS if c not in config.colours) + ("purple", "orange", "gray")
    if fixed_draws:
        u_unseen, u_value = rng.random(), rng.random()
    else:
        u_unseen = rng.random() if index % 2 == 1 and unseen > 0 else 1.0
    if index % 2 == 1 and u_unseen < unseen:
        universe, present = never, ()
    pool = sorted(present) if index % 2 == 0 else [a for a in universe if a not in present]
    value = pool[int(u_value * len(pool))] if fixed_draws else pool[int(rng.integers(len(pool)))]
    answer = "yes" if index % 2 == 0 else "no"
    what = f"a {value}" if category == "shape" else f"a {value} object"
    prompt = f"question: Is there {what} in the image? {POPE_SUFFIX}"
    return prompt, answer, {"category": category, "query": [value]}


def _pope(rng, objects, index, config):
    present = {(o.colour, o.shape) for o in objects}
    if index % 2 == 0:  # exactly half yes
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        category, answer = "positive", "yes"
    else:
        colours_in = {o.colour for o in objects}
        shapes_in = {o.shape for o in objects}
        adversarial = [(c, s) for c in colours_in for s in shapes_in if (c, s) not in present]
        if adversarial and rng.random() < 0.5:
            colour, shape = adversarial[int(rng.integers(len(adversarial)))]
            category = "adversarial"
        else:
            absent = [(c, s) for c in config.colours for s in SHAPES if (c, s) not in present
                      and (c, s) not in adversarial]
            colour, shape = absent[int(rng.integers(len(absent)))]
            category = "random"
        answer = "no"
    prompt = f"question: Is there a {colour} {shape} in the image? {POPE_SUFFIX}"
    return prompt, answer, {"category": category, "query": [colour, shape]}


def _word(rng, objects):
    target = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
        return f"What color is the {target.shape}? {WORD_SUFFIX}", target.colour, {"category": "colour"}
    return f"What shape is the {target.colour} object? {WORD_SUFFIX}", target.shape, {"category": "shape"}


def question(kind: str, rng, objects, index: int, config: SyntheticConfig = SyntheticConfig(),
             pope_unseen: float = 0.0, fixed_draws: bool = False) -> tuple[str, str, dict]:
    """(prompt, answer, meta) of one question of `kind` about `objects`; `index` fixes the gold
    letter (mc) and yes/no (pope) so that consecutive indices are balanced."""
    if kind == "mc":
        prompt, answer, meta = _mc(rng, objects, index, config)
    elif kind == "pope":
        if config.pope_query == "pair":
            prompt, answer, meta = _pope(rng, objects, index, config)
        else:
            prompt, answer, meta = _pope_attribute(rng, objects, index, config, pope_unseen, fixed_draws)
    elif kind == "caption":
        prompt, answer, meta = CAPTION_PROMPT, caption(objects), {"category": f"{len(objects)}-objects"}
    elif kind == "word":
        prompt, answer, meta = _word(rng, objects)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return prompt, answer, {"split": kind, "num_objects": len(objects), **meta}


def make_sample(index: int, kind: str, seed: int = TEST_SEED,
                config: SyntheticConfig = SyntheticConfig()) -> Sample:
    """Sample `index` of kind `kind` in the stream seeded `seed` (deterministic)."""
    import numpy as np

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    objects = random_scene(rng, config)
    prompt, answer, meta = question(kind, rng, objects, index, config)
    return Sample(f"{kind}-{seed}-{index}", kind, prompt, answer, objects, meta)


def make_conversation(index: int, seed: int, weights: dict[str, float], turns: int = 1,
                      config: SyntheticConfig = SyntheticConfig(), copies: int = 1,
                      pope_unseen: float = 0.0, pope_blank: float = 0.0,
                      flip_pope: bool = False, twin_draws: bool = False) -> list[Sample]:
    """`turns` questions about one image (a multi-turn training conversation, as in LLaVA's
    instruction data): kinds drawn with `weights`, a caption only as the last turn (it names
    every object, so later answers could be read off it). `copies` > 1 draws each object that
    many times (random_copies). With probability `pope_blank` the image is blank and every turn
    is a POPE question answered "no" (a training aid: "an object is in view" then predicts "yes",
    which lets the question-image matching start to learn). `flip_pope` turns every POPE answer
    of the conversation into its opposite (same image, same kind of attribute asked): a
    contrastive twin for the training batch; with `twin_draws` (set for both twins) the twins
    differ in nothing else."""
    import numpy as np

    rng = np.random.default_rng([seed, 7, index])
    objects = random_scene(rng, config)
    extra = random_copies(rng, objects, copies, config) if copies > 1 else ()
    if pope_blank > 0 and config.pope_query == "attribute" and rng.random() < pope_blank:
        out = []
        for t in range(turns):
            prompt, answer, meta = _pope_attribute(rng, (), 1, config, pope_unseen)
            out.append(Sample(f"conv-{seed}-{index}-{t}", "pope", prompt, answer, (), {"split": "pope", **meta}))
        return out
    kinds = [k for k in weights if weights[k] > 0]
    probs = np.array([weights[k] for k in kinds], dtype=float)
    probs /= probs.sum()
    out = []
    for t in range(turns):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        while kind == "caption" and t < turns - 1 and len(kinds) > 1:
            kind = kinds[int(rng.choice(len(kinds), p=probs))]
        # the gold letter / yes-no slot is drawn at random: an index-based cycle would let later
        # turns be predicted from earlier answers
        slot = int(rng.integers(4))
        if flip_pope and kind == "pope":
            slot ^= 1
        prompt, answer, meta = question(kind, rng, objects, slot, config, pope_unseen, twin_draws)
        out.append(Sample(f"conv-{seed}-{index}-{t}", kind, prompt, answer, objects, meta, extra))
    return out


def mixed_stream(seed: int, weights: dict[str, float], config: SyntheticConfig = SyntheticConfig()):
    """An endless deterministic stream of samples whose kinds are drawn with `weights`."""
    import numpy as np

    kinds = [k for k in weights if weights[k] > 0]
    probs = np.array([weights[k] for k in kinds], dtype=float)
    probs /= probs.sum()
    picker = np.random.default_rng([seed, 99])
    index = 0
    while True:
        kind = kinds[int(picker.choice(len(kinds), p=probs))]
        yield make_sample(index, kind, seed, config)
        index += 1


def fixed_set(n_per_kind: int, seed: int = TEST_SEED, kinds=("mc", "pope", "caption"),
              config: SyntheticConfig = SyntheticConfig()) -> list[Sample]:
    """The first `n_per_kind` samples of each kind of the stream seeded `seed`."""
    return [make_sample(i, k, seed, config) for k in kinds for i in range(n_per_kind)]


def informative_tokens(sample: Sample, config: SyntheticConfig = SyntheticConfig()) -> list[int]:
    """Indices (0..grid^2-1, row-major as the vision tower orders patches) of the image tokens
    that contain an object."""
    return [o.cell[0] * config.grid + o.cell[1] for o in sample.objects + sample.copies]
