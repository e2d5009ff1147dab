"""Training: the Lightning module and the regularizers, each registered with
``@register("regularizer", NAME)``. Every regularizer module is imported here, so looking up any
regularizer finds them all."""

from robustness.training import adversarial, cure, distillation, regularizer  # noqa: F401
