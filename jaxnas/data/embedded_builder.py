"""``JaxnasEmbedded``: the TFDS builder that writes the embedded datasets as array_record.

Kept apart from ``embedded`` so that loading an already prepared dataset does not import TFDS.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxnas.data.core import SPLITS, stratified_split
from jaxnas.data import embedded


class JaxnasEmbedded(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the embedded datasets; the builder config name is the dataset name."""

    VERSION = tfds.core.Version(embedded.VERSION)
    RELEASE_NOTES = {"1.0.0": "mnist5k and digits with fixed stratified 60/20/20 splits."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=e.description) for name, e in embedded.EMBEDDED.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = embedded.EMBEDDED[self.builder_config.name]
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=spec.description,
            features=tfds.features.FeaturesDict(
                {
                    # PNG-encoded by PIL: TFDS would need TensorFlow to encode numpy images.
                    "image": tfds.features.Image(shape=spec.shape),
                    "label": tfds.features.ClassLabel(names=embedded.CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=spec.homepage,
        )

    def _split_generators(self, dl_manager):
        images, labels = embedded.EMBEDDED[self.builder_config.name].read()
        train, validation, test = stratified_split(labels, embedded.HELD_OUT_FRACTIONS, embedded.SPLIT_SEED)
        return {
            split: self._generate_examples(images, labels, index)
            for split, index in zip(SPLITS, (train, validation, test))
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, index: np.ndarray):
        for i in index:
            yield int(i), {"image": Image.fromarray(images[i, ..., 0]), "label": int(labels[i])}
