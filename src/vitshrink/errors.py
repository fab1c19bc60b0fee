"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations


class VitshrinkError(Exception):
    """An expected failure caused by user input (bad path, bad data, unsupported family...)."""


class DataError(VitshrinkError):
    """Bad or missing data; the message names the offending file."""


class ModelError(VitshrinkError):
    """Missing, corrupt or unsupported model artifact."""


class UnsupportedFamilyError(ModelError):
    """A stage does not support this model family."""

    def __init__(self, family: str, stage: str, supported: list[str] | tuple[str, ...] = ()) -> None:
        extra = f" (supported: {', '.join(supported)})" if supported else ""
        super().__init__(f"{stage} does not support model family '{family}'{extra}")
        self.family = family
        self.stage = stage
