"""Model builders, registered with ``@register("model", NAME)``; every model takes [0, 1] pixels
(normalisation is its first layer), so attacks work in pixel space. Build one with
``registry.build("model", cfg.model, info=info)``."""

# Each builder registers itself when its module is imported; every one is imported here.
from robustness.models import imported, pooledcnn, resnet, smallcnn, zoo  # noqa: E402,F401
from robustness.models.imported import check_node, identity_of  # noqa: E402

__all__ = ["check_node", "identity_of"]
