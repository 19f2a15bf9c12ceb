"""The embedded default data set: glyphs of matplotlib's fonts as a tfds builder.

A many-identity, open-set problem built from data that ships inside an
installed package (matplotlib's ``mpl-data/fonts/ttf``), so nothing is
downloaded. Each class is one Unicode character; each image is that character
rendered by one font file, as face data sets hold one identity in many photos.
Unseen characters (classes) are what the model is evaluated on.

How it is made (`render_glyphs`, deterministic: the same FreeType renders the
same pixels):

* Fonts: the 27 text font files of `FONTS`, DejaVu Sans / Sans Mono / Serif
  with their bold and oblique variants (12), STIX General and STIX NonUnicode
  in four styles each (8) and Computer Modern (cmr, cmb, cmss, cmti, cmtt,
  cmmi, cmsy). The display and size variants, cmex10 (big delimiters) and
  LastResort (a box for every code point) are not text fonts. Computer Modern
  files use TeX's encoding, which agrees with Unicode only on letters and
  digits: they contribute those (cmsy10 only A-Z, its calligraphic capitals).
* A font covers a character when its character map has it; characters of the
  Unicode categories C* (control, format, private use) and Z* (spaces) are
  not candidates. Each covered candidate is rendered with Pillow's FreeType,
  anti-aliased, at `EM_PIXELS` pixels per em on a `SIZE` x `SIZE` grey canvas:
  the baseline on row `BASELINE` (so the height of a glyph and where it sits,
  ``.`` against ``·`` and ``'``, stay apart) and the ink centred horizontally.
  A glyph whose ink leaves the canvas is rendered smaller until it fits,
  centred both ways. White ink on black, uint8.
* Dropped: renderings with no ink (fewer than `MIN_INK_PIXELS` pixels >= 128),
  and renderings equal to the font's placeholder glyph (``.notdef``, the box a
  font draws for what it lacks).
* Homoglyphs are merged: characters whose DejaVu Sans renderings are
  identical (Latin ``A``, Greek ``Α`` and Cyrillic ``А``) are one class, named
  by the lowest code point; each font gives the class one image (the first
  member it covers). Then every image that occurs more than once is dropped
  everywhere: across classes (two characters another font draws alike) and
  within a class (fonts sharing outlines, e.g. DejaVu's symbols): no two
  images of the set are equal, and no two classes share a rendering.
* A class needs `MIN_IMAGES` images (fonts) left; the classes are then
  shuffled with `CLASS_SEED`, so the first 80% by label (the open-set split of
  `train.input_pipeline.open_set_split`) is a random 80% of the characters,
  not the first Unicode blocks.

Built here: `NUM_CLASSES` = 1,625 characters, `NUM_IMAGES` = 22,331 images
(12 to 23 per class, 13.7 on average), 4 seconds to render. Training adds a
small random affine jitter (``config.random_affine``, `train.input_pipeline`).

Prepare it with ``prepare_glyphs(data_dir)``; the training pipeline does this
on first use (a few seconds).
"""

from __future__ import annotations

import collections
import os
import unicodedata

import numpy as np
import tensorflow_datasets as tfds

from train import digits_builder

NAME = "margin_jax_glyphs"
FILE_FORMAT = "array_record"
SIZE = 32  # images are SIZE x SIZE x 1, uint8
EM_PIXELS = 20  # font size: pixels per em
BASELINE = 24  # row of the baseline
MIN_INK_PIXELS = 2  # pixels >= 128 for a rendering to count as a glyph
MIN_IMAGES = 12  # fonts (images) a class needs
CLASS_SEED = 0  # the shuffle of the class order (labels)
# What this builds with Pillow 13.0 (FreeType 2.14.3) and matplotlib 3.11's
# fonts; another FreeType may anti-alias a few glyphs differently.
NUM_CLASSES = 1625
NUM_IMAGES = 22331

_DEJAVU = [
    f"DejaVu{family}{style}.ttf"
    for family in ("Sans", "SansMono", "Serif")
    for style in (
        ("", "-Bold", "-Oblique", "-BoldOblique")
        if family != "Serif"
        else ("", "-Bold", "-Italic", "-BoldItalic")
    )
]
_STIX = [
    f"STIX{family}{style}.ttf"
    for family in ("General", "NonUni")
    for style in ("", "Bol", "BolIta", "Ita" if family == "NonUni" else "Italic")
]
_LETTERS_DIGITS = frozenset(
    map(ord, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
)
# Computer Modern: TeX-encoded; the code points where TeX agrees with Unicode.
_COMPUTER_MODERN = {
    "cmr10.ttf": _LETTERS_DIGITS,
    "cmb10.ttf": _LETTERS_DIGITS,
    "cmss10.ttf": _LETTERS_DIGITS,
    "cmti10.ttf": _LETTERS_DIGITS,
    "cmtt10.ttf": _LETTERS_DIGITS,
    "cmmi10.ttf": _LETTERS_DIGITS,
    "cmsy10.ttf": frozenset(range(ord("A"), ord("Z") + 1)),
}
FONTS = (*_DEJAVU, *_STIX, *_COMPUTER_MODERN)
HOMOGLYPH_FONT = "DejaVuSans.ttf"


def font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def _is_candidate(code: int) -> bool:
    return unicodedata.category(chr(code))[0] not in "CZ"


def _coverage(path: str, name: str) -> list[int]:
    """The candidate code points of one font file, sorted."""
    from matplotlib.ft2font import FT2Font

    codes = FT2Font(path).get_charmap()
    allowed = _COMPUTER_MODERN.get(name)
    return sorted(
        c for c in codes if _is_candidate(c) and (allowed is None or c in allowed)
    )


def _place(mask: np.ndarray, top: int, *, centre_rows: bool):
    """The ink of ``mask`` (with its canvas offset) on the SIZE x SIZE canvas,
    or None when it does not fit."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros((SIZE, SIZE), np.uint8)
    ink = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = ink.shape
    if h > SIZE or w > SIZE:
        return None
    x0 = (SIZE - w) // 2
    y0 = (SIZE - h) // 2 if centre_rows else top + rows[0]
    if y0 < 0 or y0 + h > SIZE:
        return None
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[y0 : y0 + h, x0 : x0 + w] = ink
    return image


def _render(font, code: int, fonts_cache: dict, path: str) -> np.ndarray:
    """One glyph as uint8 [SIZE, SIZE] (see the module docstring)."""
    from PIL import ImageFont

    # Baseline at BASELINE: the anchor "ls" puts the origin at (0, BASELINE)
    # of the mask's coordinate frame.
    mask, (_, top) = font.getmask2(chr(code), mode="L", anchor="ls")
    array = np.asarray(mask, np.uint8).reshape(mask.size[1], mask.size[0])
    image = _place(array, BASELINE + top, centre_rows=False)
    size = EM_PIXELS
    while image is None:  # too big for the canvas: smaller, centred both ways
        size -= 1
        if size not in fonts_cache:
            fonts_cache[size] = ImageFont.truetype(path, size)
        mask, _ = fonts_cache[size].getmask2(chr(code), mode="L", anchor="ls")
        array = np.asarray(mask, np.uint8).reshape(mask.size[1], mask.size[0])
        image = _place(array, 0, centre_rows=True)
    return image


def _has_ink(image: np.ndarray) -> bool:
    return int(np.count_nonzero(image >= 128)) >= MIN_INK_PIXELS


def render_glyphs(*, progress: bool = False):
    """The data set in memory: (images uint8 [N, SIZE, SIZE, 1], labels [N],
    class names [C], font file of each image [N]).

    Images are ordered by label, then by font in `FONTS` order. A class name is
    its character's "U+XXXX" code, then the character.
    """
    from PIL import ImageFont

    directory = font_dir()
    coverage = {name: _coverage(os.path.join(directory, name), name) for name in FONTS}
    counts = collections.Counter(c for codes in coverage.values() for c in codes)
    candidates = sorted(c for c, n in counts.items() if n >= MIN_IMAGES)
    wanted = set(candidates)
    renders: dict[str, dict[int, np.ndarray]] = {}
    fonts = FONTS
    if progress:
        import tqdm

        fonts = tqdm.tqdm(FONTS, desc="glyphs", unit="font")
    for name in fonts:
        path = os.path.join(directory, name)
        font = ImageFont.truetype(path, EM_PIXELS)
        cache = {EM_PIXELS: font}
        # .notdef: the glyph drawn for a code point the font lacks.
        placeholder = _render(font, 0x10FFFD, cache, path)
        renders[name] = {}
        for code in coverage[name]:
            if code not in wanted:
                continue
            image = _render(font, code, cache, path)
            if _has_ink(image) and not np.array_equal(image, placeholder):
                renders[name][code] = image
    # Homoglyphs: one class per distinct DejaVu Sans rendering.
    groups: dict[bytes, list[int]] = collections.defaultdict(list)
    for code in candidates:
        image = renders[HOMOGLYPH_FONT].get(code)
        key = image.tobytes() if image is not None else code.to_bytes(4, "big")
        groups[key].append(code)
    classes = sorted(groups.values())  # each sorted; by lowest code point
    images, owners, font_of = [], [], []
    for k, members in enumerate(classes):
        for name in FONTS:
            image = next(
                (renders[name][c] for c in members if c in renders[name]), None
            )
            if image is not None:
                images.append(image)
                owners.append(k)
                font_of.append(name)
    # A rendering in two classes goes from both; within a class, the first
    # font's copy stays.
    classes_of = collections.defaultdict(set)
    for image, k in zip(images, owners, strict=True):
        classes_of[image.tobytes()].add(k)
    keep, kept = [], set()
    for image in images:
        key = image.tobytes()
        keep.append(len(classes_of[key]) == 1 and key not in kept)
        kept.add(key)
    per_class = collections.Counter(k for k, ok in zip(owners, keep, strict=True) if ok)
    kept_classes = [k for k in range(len(classes)) if per_class[k] >= MIN_IMAGES]
    order = np.random.default_rng(CLASS_SEED).permutation(len(kept_classes))
    label_of = {kept_classes[i]: label for label, i in enumerate(order)}
    rows = sorted(
        (label_of[k], FONTS.index(f), i)
        for i, (k, f, ok) in enumerate(zip(owners, font_of, keep, strict=True))
        if ok and k in label_of
    )
    names = [None] * len(kept_classes)
    for k, label in label_of.items():
        code = classes[k][0]
        names[label] = f"U+{code:04X} {chr(code)}"
    return (
        np.stack([images[i] for _, _, i in rows])[..., None],
        np.array([label for label, _, _ in rows], np.int64),
        names,
        [font_of[i] for _, _, i in rows],
    )


class MarginJaxGlyphs(tfds.core.GeneratorBasedBuilder):
    """Unicode characters (classes) rendered by matplotlib's font files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, rendered=None, **kwargs):
        # `render_glyphs()`'s output when building; opening a prepared set
        # renders nothing (the class names come from its files).
        self._rendered = rendered
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        names = None if self._rendered is None else self._rendered[2]
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(SIZE, SIZE, 1), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=names),
                    "font": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://matplotlib.org/stable/users/explain/text/fonts.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the fonts ship with matplotlib.
        if self._rendered is None:
            raise RuntimeError("Build the glyphs with prepare_glyphs(data_dir).")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels, _, fonts = self._rendered
        for i, (image, label, font) in enumerate(
            zip(images, labels, fonts, strict=True)
        ):
            yield i, {"image": image, "label": int(label), "font": font}


def prepare_glyphs(data_dir: str) -> MarginJaxGlyphs:
    """Builds the glyph data set under ``data_dir`` unless it is there already.

    Several processes may call this at once: one builds, the others wait for
    it under a lock file in ``data_dir`` (as `digits_builder.prepare_digits`).
    """

    def make(build: bool) -> MarginJaxGlyphs:
        rendered = render_glyphs(progress=True) if build else None
        return MarginJaxGlyphs(
            data_dir=data_dir, file_format=FILE_FORMAT, rendered=rendered
        )

    return digits_builder.prepare_locked(make, NAME, data_dir)
