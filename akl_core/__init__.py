"""akl-distill core: Adaptive KL divergences, the distillation trainer and evaluation.

Importing this package does not import torch; the API validates job specs with ``akl_core.spec``.
"""

__version__ = "0.1.0"
