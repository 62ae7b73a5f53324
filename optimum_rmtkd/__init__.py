"""optimum-rmtkd: Random-Matrix-Theory guided knowledge distillation for Hugging Face models."""
from .version import __version__
