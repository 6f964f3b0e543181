"""`Split`: one split of a source, as every source gives it (bigjax.data.sources for the bundled and local ones,
bigjax.data.tfds_source for TFDS). In a module of its own so that both import it and neither imports the other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from bigjax.data.errors import DataError


class Split:
    """One split of a source. Its records are read when first used, so a split whose tokenized cache exists is
    never read at all: training then needs only the cheap `fingerprint`."""

    def __init__(self, kind: str, fingerprint: str, description: str, read, num_classes: int | None = None):
        self.kind = kind  # "text" | "image"
        self.fingerprint = fingerprint  # names this data exactly: the key of its tokenized cache
        self.description = description  # for the log: what is read, and how
        self._read = read  # () -> records, or (records, num_classes) when only the records know their classes
        self._num_classes = num_classes
        self.where = description  # "the train split of X": for messages

    @functools.cached_property
    def records(self) -> Sequence:
        """Random access to the records: len() and [i] (a list or a grain.MapDataset)."""
        records = self._read()
        if isinstance(records, tuple):
            records, self._num_classes = records
        if len(records) == 0:
            raise DataError(f"{self.where} is empty; point config.data.source at data, or change the split")
        return records

    @property
    def num_classes(self) -> int | None:
        """Classes of the labels; None when the records have none."""
        if self._num_classes is None and self.kind == "text":
            self.records  # noqa: B018  (reading the records tells)
        return self._num_classes

    def with_records(self, transform, fingerprint: str) -> Split:
        """The same split, its records transformed when read."""
        read = lambda: (transform(self.records), self.num_classes)
        return Split(self.kind, fingerprint, self.description, read, self._num_classes)
