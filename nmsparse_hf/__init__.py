"""nmsparse_hf: N:M structured-sparsity training (SR-STE, MDGF, SDGF) for Hugging Face models.

The core (config, masks, schedule, autograd, targets, sparsifier) imports no transformers; the
Trainer integration lives in `nmsparse_hf.trainer` and is imported lazily.
"""

__version__ = "0.1.0"

from .autograd import EffectiveWeight, effective_weight
from .config import NMSparsityConfig
from .errors import NMSparsityConfigError, NMSparsityError, NMTargetError, NMVerificationError
from .masks import is_nm, nm_mask
from .schedule import SparsitySchedule, StepPlan
from .sparsifier import NMSparsifier, VerificationReport, verify_nm
from .targets import find_targets

__all__ = [
    "EffectiveWeight",
    "NMSparsifier",
    "NMSparsityConfig",
    "NMSparsityConfigError",
    "NMSparsityError",
    "NMTargetError",
    "NMVerificationError",
    "SparsitySchedule",
    "StepPlan",
    "VerificationReport",
    "__version__",
    "effective_weight",
    "find_targets",
    "is_nm",
    "nm_mask",
    "verify_nm",
]
