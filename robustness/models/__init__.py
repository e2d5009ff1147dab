"""Model builders, registered with ``@register("model", NAME)``; every model takes [0, 1] pixels
(normalisation is its first layer), so attacks work in pixel space. Build one with
``registry.build("model", cfg.model, info=info)``."""
