"""One exception tree. The CLI turns any EdgelmError into one line and its exit code."""

from __future__ import annotations

from edgelm.escaping import printable


class EdgelmError(Exception):
    """Base of every error a user can cause; the message is one line, meant for them."""

    exit_code = 1


class UsageError(EdgelmError):
    """A bad flag or parameter value."""

    exit_code = 2


class ArtifactError(EdgelmError):
    """An artifact folder or model file that is missing, corrupt or of an unknown schema."""


class UnsupportedModelError(EdgelmError):
    """A source folder edgelm cannot recognise or cannot export in the requested way."""


class ExportError(EdgelmError):
    """An export that could not be completed."""


class ValidationError(ExportError):
    """An export whose numbers missed their thresholds; carries the failed checks."""

    def __init__(self, message: str, checks: list | None = None):
        super().__init__(message)
        self.checks = checks or []


class VerificationError(EdgelmError):
    """An artifact whose reference set, run on this machine, missed a bound (`edgelm verify`)."""


class ContextOverflowError(EdgelmError):
    """Prompt plus requested tokens do not fit the model's context."""


class CapacityError(EdgelmError):
    """Every sequence slot of a batched model is in use (a scheduler queues rather than raise)."""


class ProviderError(EdgelmError):
    """An execution provider or device that is not available here."""


class InputError(EdgelmError):
    """Input text the task cannot work with (no mask token, empty list, ...)."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error's message, at most `limit` characters, control
    characters escaped; the exception's type name when the message is empty. Foreign libraries'
    messages are shortened through this one function so every one-line error looks alike."""
    text = str(err).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    line = printable(line)
    return line if len(line) <= limit else line[: limit - 3] + "..."
