"""Errors of the server side; the API maps each to an HTTP status."""


class MicroupdatesError(Exception):
    """Base of the errors below; its message is a sentence meant for the operator."""


class NotFoundError(MicroupdatesError):
    """Raised when a device, update, deployment, job or artifact does not exist."""


class ConflictError(MicroupdatesError):
    """Raised when a request clashes with stored state, such as a device name already taken."""


class InvalidRequestError(MicroupdatesError):
    """Raised when a request is well formed but cannot be carried out, such as an empty target."""
