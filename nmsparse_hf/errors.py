"""Exceptions raised by nmsparse_hf. Each message names the field or layer, the value and the fix."""


class NMSparsityError(ValueError):
    """Base class of every error nmsparse_hf raises about user input or model state."""


class NMSparsityConfigError(NMSparsityError):
    """A sparsity setting is invalid (unknown value, out of range, inconsistent)."""


class NMTargetError(NMSparsityError):
    """A model cannot be sparsified as configured (no preset, no match, bad layer shape)."""


class NMVerificationError(NMSparsityError):
    """A layer that should be N:M is not, or checkpoint metadata disagrees with its weights."""


class NMCheckpointError(NMSparsityError):
    """A checkpoint cannot be read as a sparse checkpoint: files or metadata are missing,
    unreadable or malformed (``nmsparse verify`` exits 2)."""
