"""weightablate: the exact change of loss and accuracy when one weight is set to zero, for
thousands to millions of weights, without re-running the model for each."""
from . import ops
from .api import ablate
from .result import AblationResult, load
from .verify import VerificationError
from . import criteria  # noqa: E402  (pruning criteria: magnitude, squared, wanda, taylor, obd, taylor2)
from .activations import ActivationStats, activation_stats  # noqa: E402
from .reporting import report  # noqa: E402  (matplotlib is imported only when a report is drawn)
from . import prune  # noqa: E402  (exact importance in torch.nn.utils.prune, iterative pruning)

__version__ = "0.1.0"
__all__ = ["ablate", "load", "AblationResult", "VerificationError", "ops", "criteria", "activation_stats", "ActivationStats", "report",
           "prune", "__version__"]
