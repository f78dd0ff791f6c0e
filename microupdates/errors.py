"""Errors of the server side; the API maps each to an HTTP status."""


class MicroupdatesError(Exception):
    """Base of the errors below; its message is a sentence meant for the operator."""


class NotFoundError(MicroupdatesError):
    """Raised when a device, update, deployment, job or artifact does not exist."""


class ConflictError(MicroupdatesError):
    """Raised when a request clashes with stored state, such as a device name already taken."""


class InvalidRequestError(MicroupdatesError):
    """Raised when a request is well formed but cannot be carried out, such as an empty target."""


class EnrolmentKeyRejectedError(MicroupdatesError):
    """Raised when a device enrols with a key that is unknown (401), or expired, used up or revoked (403)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
