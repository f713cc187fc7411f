"""A warm Python worker: runs pickled function calls, one at a time, inside a job's sandbox.

Not imported by the agent: it runs as ``python -I py_worker.py ...`` under a Python from /usr,
inside bubblewrap, as the task user. It imports only the standard library, cloudpickle and
tblib (copies the agent binds read only next to this file), and whatever the calls need.

The agent made a listening socket ``agent.sock`` in the worker's work directory (its cwd)
before starting it. The worker connects and speaks frames: a 4-byte length, a JSON header whose
``sizes`` lists the byte blobs that follow, then those blobs. JSON, not pickle: the agent runs
as root outside the sandbox and never unpickles what a worker says. The worker says
``{"ready": pid, "python": "3.11"}``, then serves until the agent closes the socket:

- ``{"call": id}`` with one blob, a cloudpickle of ``("call", fn, args, kwargs)`` or
  ``("batch", [(fn, args, kwargs), ...])`` (``map`` with a chunksize, a joblib batch), whose
  result is the list of the results;
- answered by ``{"done": id, "ok": bool, "retire": bool, ...}`` with two blobs: the pickled
  result when ``ok``, else a pickled error record for the caller (the exception's type name,
  message, remote traceback as text and, when it pickles, the exception itself with its
  traceback, by tblib); and what the call printed through ``sys.stdout``/``sys.stderr``. The
  header also names a raised exception (``type``, ``message``) or an oversized result
  (``too_large``) for the agent's one-line reason. ``retire`` says this worker exits now (its
  memory passed the high-water mark), so the agent starts a fresh one for what comes.

A call that crashes the interpreter, or is killed for memory or time, takes the worker with it;
the agent tells which, and replaces the worker.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import sys
import traceback
from typing import Any

_HEADER = struct.Struct(">I")
MAX_CAPTURED_OUTPUT = 16 * 1024 * 1024  # of one call's print()s; the rest is dropped


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]] | None:
    raw = _read_exactly(sock, _HEADER.size)
    if raw is None:
        return None
    header_bytes = _read_exactly(sock, _HEADER.unpack(raw)[0])
    if header_bytes is None:
        return None
    header = json.loads(header_bytes)
    blobs = []
    for size in header.get("sizes", []):
        blob = _read_exactly(sock, size)
        if blob is None:
            return None
        blobs.append(blob)
    return header, blobs


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _send(sock: socket.socket, header: dict[str, Any], *blobs: bytes) -> None:
    encoded = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    sock.sendall(b"".join([_HEADER.pack(len(encoded)), encoded, *blobs]))


class _Capture(io.TextIOBase):
    """sys.stdout and sys.stderr during a call: what it prints goes back with its result."""

    def __init__(self, sink: bytearray) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        room = MAX_CAPTURED_OUTPUT - len(self._sink)
        if room > 0:
            data = text.encode(errors="replace")
            self._sink.extend(data[:room])
            if len(data) > room:
                self._sink.extend(b"\n[planetary-mesh: printed output truncated]\n")
        return len(text)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _error_record(
    error: BaseException, pickling_support: Any, cloudpickle: Any
) -> tuple[dict[str, Any], bytes]:
    # The first frames are this worker's own: the caller wants the call's.
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    error = error.with_traceback(tb)
    kind = type(error)
    record: dict[str, Any] = {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
        "exception": None,
    }
    try:
        pickling_support.install(error)
        record["exception"] = cloudpickle.dumps(error)
    except Exception:  # an exception that does not pickle still gets its name and traceback
        pass
    said = {"type": record["type"], "message": record["message"][:1000]}
    return said, pickle.dumps(record)


def _run(payload: bytes, cloudpickle: Any) -> Any:
    call = cloudpickle.loads(payload)
    if call[0] == "batch":
        return [fn(*args, **kwargs) for fn, args, kwargs in call[1]]
    _, fn, args, kwargs = call
    return fn(*args, **kwargs)


def _answer(
    payload: bytes, cloudpickle: Any, pickling_support: Any
) -> tuple[dict[str, Any], bytes]:
    """Run one call: its answer's header and blob (the pickled result, or an error record).
    The result is pickled here, so nothing of it outlives the call in this worker."""
    try:
        result = _run(payload, cloudpickle)
    except BaseException as error:  # SystemExit and KeyboardInterrupt are the call's own too
        said, record = _error_record(error, pickling_support, cloudpickle)
        return {"ok": False, **said}, record
    try:
        return {"ok": True}, cloudpickle.dumps(result)
    except Exception as error:
        error.add_note("the function returned, but its result could not be pickled")
        said, record = _error_record(error, pickling_support, cloudpickle)
        return {"ok": False, **said}, record


def main() -> None:
    high_water, max_result = int(sys.argv[1]), int(sys.argv[2])
    here = os.path.dirname(os.path.abspath(__file__))
    # The copies of cloudpickle and tblib next to this file, then the agent's own site
    # directories the sandbox shows (read only), then this Python's defaults.
    sys.path[:0] = [here, *sys.argv[3:]]
    import cloudpickle
    from tblib import pickling_support

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("agent.sock")
    _send(sock, {"ready": os.getpid(), "python": "{}.{}".format(*sys.version_info[:2])})
    real_stdout, real_stderr = sys.stdout, sys.stderr
    while True:
        message = _receive(sock)
        if message is None:
            return  # the agent is done with this worker
        header, (payload,) = message
        printed = bytearray()
        sys.stdout = sys.stderr = _Capture(printed)
        try:
            answer, data = _answer(payload, cloudpickle, pickling_support)
        finally:
            sys.stdout, sys.stderr = real_stdout, real_stderr
        if len(data) > max_result:
            too_large = {"too_large": len(data), "limit": max_result}
            answer, data = {"ok": False, **too_large}, pickle.dumps(too_large)
        retire = _rss() > high_water
        _send(sock, {**answer, "done": header["call"], "retire": retire}, data, bytes(printed))
        if retire:
            return


if __name__ == "__main__":
    main()
