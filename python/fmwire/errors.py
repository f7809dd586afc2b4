"""fmwire's exceptions: one class per error code of the protocol
(protocol/fmwire.capnp, ErrorCode), all under fmwire.Error.

Every error carries what the peer (or this client) said about it:

    code            the protocol's name for it ("worker_lost", "overloaded")
    retryable       whether the same request may succeed if sent again
                    (to another worker, or after a pause)
    retry_after_ms  the peer's hint for that pause; 0: none
"""


class Error(Exception):
    """A request or connection failed; see .code, .retryable, .retry_after_ms."""

    code = "internal"

    def __init__(self, message, *, code=None, retryable=False, retry_after_ms=0):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    def __str__(self):
        return f"{self.code}: {self.message}" + (" (retryable)" if self.retryable else "")


class Internal(Error):
    code = "internal"


class BadFrame(Error):
    """A malformed frame, or one over a limit: the connection closes."""
    code = "bad_frame"


class UnsupportedVersion(Error):
    code = "unsupported_version"


class LimitExceeded(Error):
    code = "limit_exceeded"


class InvalidRequest(Error, ValueError):
    """The peer refused a parameter (the message says which)."""
    code = "bad_request"


class Unauthorized(Error):
    code = "unauthorized"


class NotFound(Error):
    code = "not_found"


class Overloaded(Error):
    """Retryable; retry_after_ms says when."""
    code = "overloaded"


class NoWorker(Error):
    """No endpoint accepted the connection, or the router has no worker."""
    code = "no_worker"


class DeadlineExceeded(Error):
    """The request's timeout passed: the tokens before it were delivered,
    and the stream's .completion says how many."""
    code = "deadline_exceeded"


class DeadlineUnreachable(DeadlineExceeded):
    """Refused early: no worker can meet the request's timeout."""
    code = "deadline_unreachable"


class WorkerLost(Error):
    """The worker (or router) serving the stream went away mid-stream."""
    code = "worker_lost"


class Cancelled(Error):
    """Cancelled by something other than this stream's cancel() (the
    client was closed, or a peer cancelled it)."""
    code = "cancelled"


class DigestMismatch(Error):
    code = "digest_mismatch"


class TransferAborted(Error):
    code = "transfer_aborted"


_BY_CODE = {cls.code: cls for cls in (Internal, BadFrame, UnsupportedVersion, LimitExceeded, InvalidRequest,
                                      Unauthorized, NotFound, Overloaded, NoWorker, DeadlineExceeded,
                                      DeadlineUnreachable, WorkerLost, Cancelled, DigestMismatch, TransferAborted)}


def from_code(code, message, retryable, retry_after_ms):
    """The exception for a protocol error code (the native module raises these)."""
    cls = _BY_CODE.get(code, Error)
    return cls(message, code=code, retryable=retryable, retry_after_ms=retry_after_ms)
