"""Training: the Lightning module and the regularizers, each registered with
``@register("regularizer", NAME)``. Every regularizer module is imported here, so looking up any
regularizer finds them all."""

from robustness.training import (  # noqa: F401
    adversarial,
    cure,
    distillation,
    gradient_penalties,
    llr,
    regularizer,
    single_step,
    trades,
)
