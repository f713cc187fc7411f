"""One exception tree for the whole project.

Every error a person can see derives from :class:`MeshError` and carries a message that says what
happened and what to do next. The CLI prints ``str(error)`` as one line and exits non-zero; it
never shows a traceback for a ``MeshError``::

    MeshError
    ├── ConfigError            bad flag, file, duration or size
    ├── IllegalTransition      the state machine refused an event (a bug or a stale report)
    ├── TrustError             certificates, tokens and CA pinning
    │   ├── TokenError         malformed, expired, used up or unknown join token
    │   └── CAMismatchError    the server's CA is not the one the token pins
    ├── StoreError             the durable store failed or holds something unexpected
    ├── SandboxError           a task could not be started in its sandbox
    ├── ClientError            talking to the coordinator failed
    │   ├── CoordinatorUnreachable
    │   ├── NotFound           unknown job, task or node (HTTP 404)
    │   └── RequestRejected    the coordinator refused the request (other 4xx)
    ├── CallError              a Python function call on the mesh ended without a result
    │   ├── CallOutOfMemory    its worker went over the call's memory limit
    │   ├── CallTimedOut       it ran past the call's timeout
    │   ├── CallCancelled      it was cancelled on the mesh (after it started)
    │   ├── WorkerDied         its worker process died under it (a crash, os._exit, a signal)
    │   ├── CallRefused        no worker could run it (Python version, sandbox)
    │   └── ResultTooLarge     its result or arguments are over the size limit
    └── RemoteError            the call raised an exception that cannot be rebuilt here

A function that raises on the mesh re-raises *its own* exception in the caller (a remote
``ZeroDivisionError`` is a ``ZeroDivisionError``, with the remote traceback); ``RemoteError``
stands in only when that exception's class cannot be unpickled in the caller.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error Planetary Mesh raises on purpose."""


class ConfigError(MeshError):
    """A flag, environment variable or configuration file holds something unusable."""


class IllegalTransition(MeshError):
    """An event does not apply to the state a task is in."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"a task in state {state!r} cannot take event {event!r}")
        self.state = state
        self.event = event


class TrustError(MeshError):
    """Certificates, keys, tokens or CA pinning failed."""


class TokenError(TrustError):
    """A join token is malformed, expired, used up, revoked or unknown."""


class CAMismatchError(TrustError):
    """The coordinator presents a CA other than the one the join token pins."""


class StoreError(MeshError):
    """The durable store failed."""


class DiscoveryError(MeshError):
    """Finding the coordinator on the LAN (mDNS) failed, or advertising it did."""


class SandboxError(MeshError):
    """A task could not be started inside its sandbox."""


class ClientError(MeshError):
    """A request to the coordinator failed."""


class CoordinatorUnreachable(ClientError):
    """No connection to the coordinator could be made, or it dropped before the answer.

    ``job_id``: the job the request submitted, where the caller chose its id (``Client.run``):
    it may exist all the same, and ``Client.wait(job_id)`` picks it up once the coordinator is
    back.
    """

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class NotFound(ClientError):
    """The coordinator does not know the job, task or node asked for."""


class RequestRejected(ClientError):
    """The coordinator refused the request (bad input, not allowed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CallError(MeshError):
    """A function call on the mesh ended without a result; the subclass says why.

    ``job_id`` and ``index`` name the task (`mesh why JOB INDEX` tells its whole story);
    ``reason`` is what the agent said.
    """

    def __init__(self, message: str, job_id: str = "", index: int = -1, reason: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.index = index
        self.reason = reason


class CallOutOfMemory(CallError):
    """The worker running the call went over the call's memory limit and was killed."""


class CallTimedOut(CallError):
    """The call ran past its timeout and its worker was killed."""


class CallCancelled(CallError):
    """The call was cancelled on the mesh after it started (`cancel_running`, `mesh cancel`)."""


class WorkerDied(CallError):
    """The Python worker running the call died: a crash, ``os._exit``, a signal."""


class CallRefused(CallError):
    """No worker could run the call: another Python version on the agent, or no sandbox."""


class ResultTooLarge(CallError):
    """The call's result (or its pickled arguments) is over the size the mesh carries."""


class RemoteError(MeshError):
    """The call raised an exception whose class cannot be rebuilt in the caller.

    ``type_name`` is the remote exception's qualified class name and ``remote_traceback`` its
    traceback as text.
    """

    def __init__(self, message: str, type_name: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback
