"""How a call travels: the function and its arguments pickled by cloudpickle, and what comes
back turned into a result or the exception to raise.

Modules that are not installed (a helper module next to the caller's script) are pickled *by
value*, so the agents need not have them; installed packages and the standard library travel by
reference and must be importable where the call runs.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import pickle
import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from planetary_mesh.errors import (
    CallCancelled,
    CallError,
    CallOutOfMemory,
    CallRefused,
    CallTimedOut,
    RemoteError,
    ResultTooLarge,
    WorkerDied,
)
from planetary_mesh.protocol import MAX_CALL_BYTES, CallUpdate
from planetary_mesh.units import format_size

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

_lock = threading.Lock()
_seen_modules = 0  # len(sys.modules) when last looked at
_installed: set[str] | None = None
_by_value: set[str] = set()


def _installed_names() -> set[str]:
    global _installed
    if _installed is None:
        _installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    return _installed


def _install_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(os.path.realpath(root) + os.sep for root in roots)


def ship_local_modules() -> None:
    """Have cloudpickle carry every imported module that is not installed by value."""
    global _seen_modules
    with _lock:
        if len(sys.modules) == _seen_modules:
            return
        installed = _installed_names()
        roots = _install_roots()
        for name, module in list(sys.modules.items()):
            top = name.partition(".")[0]
            if top in _by_value or top in installed or top == "__main__" or module is None:
                continue
            path = getattr(module, "__file__", None)
            if not path or os.path.realpath(path).startswith(roots):
                continue
            root = sys.modules.get(top)
            if root is not None:
                cloudpickle.register_pickle_by_value(root)
                _by_value.add(top)
        _seen_modules = len(sys.modules)


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A call as the mesh carries it (base64); ResultTooLarge if over the limit."""
    return _encode(("call", fn, args, kwargs))


def pickle_batch(items: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> str:
    """Several calls ``(fn, args, kwargs)`` in one task (``map`` with a chunksize, a joblib
    batch): the list of their results comes back."""
    return _encode(("batch", items))


def _encode(call: tuple[Any, ...]) -> str:
    ship_local_modules()
    data = cloudpickle.dumps(call)
    if len(data) > MAX_CALL_BYTES:
        raise ResultTooLarge(
            f"the pickled function and arguments take {format_size(len(data))}, over the"
            f" {format_size(MAX_CALL_BYTES)} a call may carry: pass large data through a file"
            " or storage the agents can read, and send its name instead"
        )
    return base64.b64encode(data).decode()


def outcome(update: CallUpdate, job_id: str) -> tuple[Any, BaseException | None]:
    """The result of an ended call, or the exception its future raises."""
    where = f"call {update.index} of job {job_id}"
    why = f"`mesh why {job_id} {update.index}` tells its whole story"
    data = base64.b64decode(update.result) if update.result else None
    if update.state == "succeeded" and data is not None:
        try:
            return pickle.loads(data), None
        except Exception as broken:
            return None, _unloadable(where, "its result", broken)
    reason = update.reason or "no reason given"
    ctx = (reason, job_id, update.index)
    if update.state == "cancelled" or update.end == "cancelled":
        return None, CallCancelled(f"{where} was cancelled on the mesh ({reason})", *_ids(ctx))
    if update.end == "exited" and update.exit_code == 1 and data is not None:
        return None, _raised(data, where, ctx)
    if update.end == "oom":
        error: CallError = CallOutOfMemory(
            f"{where} {reason}: its worker was killed; ask for more memory with"
            " executor.options(memory=...), or use less",
            *_ids(ctx),
        )
    elif update.end == "timeout":
        error = CallTimedOut(
            f"{where} {reason}: its worker was killed; allow longer with"
            " executor.options(timeout=...)",
            *_ids(ctx),
        )
    elif update.end == "sandbox_error":
        error = CallRefused(f"{where} could not run: {reason}", *_ids(ctx))
    else:
        error = WorkerDied(f"{where} did not return: {reason}; {why}", *_ids(ctx))
    return None, error


def _ids(ctx: tuple[str, str, int]) -> tuple[str, int, str]:
    reason, job_id, index = ctx
    return job_id, index, reason


def _raised(data: bytes, where: str, ctx: tuple[str, str, int]) -> BaseException:
    """The exception the call raised, with its remote traceback, as near as can be rebuilt."""
    try:
        record = pickle.loads(data)
    except Exception as broken:
        return _unloadable(where, "the exception it raised", broken)
    if "too_large" in record:
        return ResultTooLarge(
            f"{where} returned a result of {format_size(record['too_large'])} pickled, over the"
            f" {format_size(record['limit'])} a call may return: return less, or write big"
            " results to storage the caller can read",
            *_ids(ctx),
        )
    if record.get("exception") is not None:
        try:
            raised = pickle.loads(record["exception"])
            if isinstance(raised, BaseException):
                raised.add_note(f"(raised on the mesh by {where})")
                return raised
        except Exception:  # its class cannot be rebuilt here: say what it was instead
            pass
    return RemoteError(
        f"{where} raised {record['type']}: {record['message']}\n\nRemote traceback:\n"
        f"{record['traceback']}",
        record["type"],
        record["traceback"],
    )


def _unloadable(where: str, what: str, error: Exception) -> BaseException:
    return RemoteError(
        f"{where} ended, but {what} cannot be unpickled here ({type(error).__name__}: {error}):"
        " is the module it comes from importable in this process?",
        type(error).__name__,
        "",
    )
