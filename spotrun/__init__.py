"""spotrun: run ML training on the cheapest spot GPU that fits, through preemptions.

Keep this module tiny: `spotrun --help` must not import cloud SDKs or torch.
"""

__version__ = "0.1.0"
