"""Every error sglrun raises on purpose derives from one root, ``SglrunError``.

The tree::

    SglrunError
    ├── InvalidArgumentError      a wrong parameter name, type or value at a call (also TypeError)
    ├── ProgramError              a program broke a language rule (nested roles, bad join mode)
    ├── VariableNotProducedError  a variable was read that no primitive produced (also KeyError)
    ├── UnsupportedNodeError      the interpreter met an expression it has no rule for
    ├── BackendError              a backend could not do what was asked
    │   ├── UnsupportedCapabilityError   the backend lacks a capability (regex, images, ...)
    │   ├── ModelNotFoundError           no model file could be found
    │   ├── TransportError               the request did not get an answer (connect, timeout)
    │   └── ServerError                  the server answered with an error status
    ├── RowTimeout                a batch row ran past its time limit (``--row-timeout``)
    ├── InputError                a batch input row or file is malformed (names file and line)
    └── ConfigError               a configuration file or value is wrong

Catching ``SglrunError`` catches everything sglrun itself means to raise; any other exception
that escapes a program is the program's own and is kept as-is in ``state.error()``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BatchJobError",
    "ConfigError",
    "InputError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "ProgramError",
    "RowTimeout",
    "ServerError",
    "SglrunError",
    "TransportError",
    "UnsupportedCapabilityError",
    "UnsupportedNodeError",
    "VariableNotProducedError",
]


class SglrunError(Exception):
    """Root of every error sglrun raises on purpose."""


class InvalidArgumentError(SglrunError, TypeError):
    """A parameter name, type or value is wrong; raised at the call, never in a worker."""


class ProgramError(SglrunError):
    """A program broke a rule of the language, e.g. nested roles."""


class VariableNotProducedError(SglrunError, KeyError):
    """A variable was read that was never produced; the message names it and the cause."""

    def __init__(self, name: str, cause: BaseException | None = None, detail: str = "") -> None:
        self.name = name
        self.cause = cause
        if cause is not None:
            why = f"the program failed first: {type(cause).__name__}: {cause}"
        else:
            why = detail or "no gen, select or var_scope in the program produced it"
        self.message = f"variable {name!r} was not produced: {why}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.message


class UnsupportedNodeError(SglrunError):
    """The interpreter has no rule for an expression type."""


class BackendError(SglrunError):
    """A backend could not complete a request."""


class UnsupportedCapabilityError(BackendError):
    """The backend cannot do what the program asks; names the capability and the backend."""

    def __init__(self, capability: str, backend: str, hint: str = "") -> None:
        self.capability = capability
        self.backend = backend
        message = f"{capability} is not supported by the {backend} backend"
        super().__init__(f"{message}: {hint}" if hint else message)


class ModelNotFoundError(BackendError):
    """No GGUF model could be found for the embedded engine."""


class TransportError(BackendError):
    """A request got no answer: connection refused or reset, or a timeout (``timed_out``)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class BatchJobError(BackendError):
    """A provider batch job gave a call no answer: the call's own error, or a job that failed
    or ended without it after the retries."""


class ServerError(BackendError):
    """A server answered with an error status; keeps the status and the server's message."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status = status
        self.server_message = message
        self.url = url
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}")


class RowTimeout(SglrunError):  # noqa: N818 - the name users see in error records
    """A row of a batch ran past its time limit; the batch went on without it."""


class InputError(SglrunError):
    """A batch input is malformed; the message names the file and line."""


class ConfigError(SglrunError):
    """A configuration file or value is wrong; the message names the file and key."""
