"""weightablate: the exact change of loss and accuracy when one weight is set to zero, for
thousands to millions of weights, without re-running the model for each."""
from . import ops
from .api import ablate
from .result import AblationResult, load

__version__ = "0.1.0"
__all__ = ["ablate", "load", "AblationResult", "ops", "__version__"]
