"""The lora_kit exception hierarchy.

Every error lora_kit raises on purpose derives from :class:`LoraKitError`, so callers can catch
one type. Messages say what went wrong, where (module, file, field) and how to fix it. Raising any
of these never leaves the model or files on disk half-changed: lora_kit validates before it
mutates and writes through a temporary name.
"""

from __future__ import annotations


class LoraKitError(Exception):
    """Base class of every error lora_kit raises on purpose."""


class ConfigError(LoraKitError, ValueError):
    """A configuration value is invalid; the message names the field and the accepted values."""


class NoTargetsError(LoraKitError):
    """The target specification matched no supported module of the model."""


class UnsupportedModuleError(LoraKitError):
    """A targeted module is of a type lora_kit cannot wrap (only Linear and GPT-2 Conv1D)."""


class AdapterNameError(LoraKitError, ValueError):
    """An adapter name is invalid, already taken, or unknown."""


class AdapterMismatchError(LoraKitError):
    """An adapter does not fit the model: keys, shapes or base fingerprint differ."""


class AdapterFormatError(LoraKitError):
    """An adapter directory or file is missing, unreadable, truncated or unsupported."""


class NonFiniteError(AdapterFormatError):
    """Adapter weights (or a result computed from them) contain NaN or infinity."""


class MergedStateError(LoraKitError):
    """Not allowed while adapters are merged into the base weights; call ``unmerge()`` first."""


# ---- training (lora_kit.train) ------------------------------------------------------------


class DataError(LoraKitError, ValueError):
    """Training data is missing, empty or malformed; found before training starts."""


class TrainingDivergedError(LoraKitError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the last good checkpoint stays."""


# ---- provenance and heads (lora_kit.history, lora_kit.heads) -------------------------------


class HistoryError(AdapterFormatError):
    """A recorded stacking/merge history is malformed or of an unknown schema."""


class HeadConflictError(AdapterMismatchError):
    """Several inputs carry different trained copies of one ``modules_to_save`` head."""


class HeadLayoutError(AdapterMismatchError):
    """An adapter's head cannot be placed into the base checkpoint: unknown task, head or labels."""
