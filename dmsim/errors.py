"""One error type for the whole engine.

The engine raises :class:`DMError` with an errno and, where the kernel has one, the
kernel's message.  Edges convert it exactly once: FUSE to an errno, the control socket
to a code, the CLI to dmsetup's text and exit status.
"""
import errno as _errno
import os


class DMError(Exception):
    """An engine failure: ``errno`` plus the kernel's message (may be empty)."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err
        self.message = message

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)

    def __repr__(self):
        return "DMError(%s, %r)" % (_errno.errorcode.get(self.errno, self.errno), self.message)


class TargetError(DMError):
    """A constructor failure: ``message`` is the target's ``ti->error`` text."""

    def __init__(self, message: str, err: int = _errno.EINVAL):
        super().__init__(err, message)


def errno_name(err: int) -> str:
    """``-EINVAL`` style suffix used in kernel log lines."""
    return "-" + _errno.errorcode.get(err, str(err))


def collapse(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups (Trio's strict
    nurseries wrap every error that crosses them), or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class collapse_groups:
    """Context manager for API edges: a lone error leaves as itself, not wrapped in
    an ExceptionGroup, so callers can ``except DMError`` (several stay a group)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or not isinstance(exc, BaseExceptionGroup):
            return False
        inner = collapse(exc)
        if inner is exc:
            return False
        raise inner
