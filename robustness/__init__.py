"""robustness: experiments on adversarial robustness and the geometry of decision boundaries."""

__version__ = "0.1.0"
