"""Typed errors for problems the user can fix.

Every subclass carries a one-line message that names the file, field or domain
at fault and says what to do. The CLI prints it as ``error: <message>`` and
exits non-zero; anything that is not a ``MetarecError`` is a bug and keeps its
traceback.
"""


class MetarecError(Exception):
    """Base class: an error caused by input, configuration or environment."""


class InputFileError(MetarecError):
    """An input file is missing, unreadable, empty, binary or malformed."""


class StoreError(MetarecError):
    """The domain store cannot be read or written as asked."""


class ConfigError(MetarecError):
    """A configuration value is unknown, of the wrong type or impossible."""


class TrainingError(MetarecError):
    """Training cannot go on (a non-finite loss, say); names the step and the domain."""


class CheckpointError(MetarecError):
    """A checkpoint cannot be written (a full or unwritable disk); names the path."""


class RetrievalError(MetarecError):
    """A search cannot run as asked: widths differ, k too large, no GPU, not enough memory."""


class RunInterrupted(Exception):
    """The user stopped a run (Ctrl-C). ``step``: the step whose checkpoint the workers wrote
    before stopping; None when they were stopped at once, without one."""

    def __init__(self, step: int | None) -> None:
        super().__init__("interrupted" + (f" at step {step}" if step is not None else ""))
        self.step = step
