"""How an ended call becomes a result or an exception in the caller, and how the agent reads a
worker's frames without trusting it. Pure logic: no mesh, no processes."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import struct
from typing import Any

import cloudpickle
import pytest

from planetary_mesh.agent import functions
from planetary_mesh.client.pickling import outcome, pickle_batch, pickle_call
from planetary_mesh.errors import (
    CallCancelled,
    CallOutOfMemory,
    CallRefused,
    CallTimedOut,
    RemoteError,
    ResultTooLarge,
    WorkerDied,
)
from planetary_mesh.protocol import MAX_CALL_BYTES, CallUpdate


def _update(state: str, end: str | None, exit_code: int | None, result: Any = None) -> CallUpdate:
    data = None if result is None else base64.b64encode(result).decode()
    return CallUpdate(
        index=4, state=state, end=end, exit_code=exit_code, reason="the reason", result=data
    )


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("no")


def test_a_returned_value_is_the_result() -> None:
    assert outcome(_update("succeeded", "exited", 0, pickle.dumps([1, 2])), "j1") == ([1, 2], None)


@pytest.mark.parametrize(
    ("end", "expected", "words"),
    [
        ("oom", CallOutOfMemory, "options(memory="),
        ("timeout", CallTimedOut, "options(timeout="),
        ("sandbox_error", CallRefused, "could not run: the reason"),
        ("signalled", WorkerDied, "mesh why j1 4"),
        ("disk_quota", WorkerDied, "did not return"),
    ],
)
def test_each_way_a_call_is_killed_has_its_own_error(
    end: str, expected: type[Exception], words: str
) -> None:
    _, error = outcome(_update("failed", end, None), "j1")
    assert isinstance(error, expected)
    assert words in str(error) and "call 4 of job j1" in str(error)
    assert (error.job_id, error.index, error.reason) == ("j1", 4, "the reason")  # type: ignore[attr-defined]


def test_a_cancelled_call_raises_call_cancelled() -> None:
    _, error = outcome(_update("cancelled", None, None), "j1")
    assert isinstance(error, CallCancelled)


def test_a_raised_exception_comes_back_as_itself_or_as_remote_error() -> None:
    try:
        raise KeyError("missing")
    except KeyError as raised:
        record = {"type": "builtins.KeyError", "message": "'missing'", "traceback": "TB"}
        record["exception"] = cloudpickle.dumps(raised)
    _, error = outcome(_update("failed", "exited", 1, pickle.dumps(record)), "j1")
    assert isinstance(error, KeyError) and error.args == ("missing",)
    assert any("call 4 of job j1" in note for note in error.__notes__)

    unbuildable = {**record, "exception": b"not a pickle", "type": "app.Custom"}
    _, error = outcome(_update("failed", "exited", 1, pickle.dumps(unbuildable)), "j1")
    assert isinstance(error, RemoteError)
    assert error.type_name == "app.Custom" and error.remote_traceback == "TB"
    assert "Remote traceback:\nTB" in str(error)


def test_too_large_results_say_how_large() -> None:
    record = {"too_large": 9 * 2**20, "limit": 8 * 2**20}
    _, error = outcome(_update("failed", "exited", 1, pickle.dumps(record)), "j1")
    assert isinstance(error, ResultTooLarge)
    assert "9.0M" in str(error) and "8.0M" in str(error)


def test_calls_over_the_size_limit_are_refused_before_they_leave() -> None:
    with pytest.raises(ResultTooLarge, match="a call may carry"):
        pickle_call(len, (b"x" * MAX_CALL_BYTES,), {})
    call = pickle.loads(base64.b64decode(pickle_batch([(divmod, (7, 2), {}), (pow, (2, 3), {})])))
    assert call[0] == "batch" and [f(*a, **k) for f, a, k in call[1]] == [(3, 1), 8]


def _frame(header: Any, *blobs: bytes, raw_header: bytes | None = None) -> bytes:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack(">I", len(encoded)) + encoded + b"".join(blobs)


def _read(data: bytes) -> Any:
    async def read() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await functions._read_frame(reader)

    return asyncio.run(read())


def test_the_agent_reads_a_workers_frames_as_json_and_sizes_only() -> None:
    done = _frame({"done": 1, "ok": True, "sizes": [3, 2]}, b"abc", b"hi")
    assert _read(done) == ({"done": 1, "ok": True, "sizes": [3, 2]}, [b"abc", b"hi"])
    # A pickle where JSON belongs is never unpickled: it is nonsense, and the worker is done.
    assert _read(_frame(None, raw_header=pickle.dumps({"done": 1}))) is None
    assert _read(_frame({"sizes": [-1]})) is None
    assert _read(_frame({"sizes": [functions.BLOB_LIMIT + 1]})) is None
    assert _read(_frame({"sizes": [1, 1, 1]}, b"a", b"b", b"c")) is None
    assert _read(struct.pack(">I", functions.MAX_HEADER_BYTES + 1)) is None
    assert _read(_frame({"sizes": [10]}, b"short")) is None  # the worker died mid-frame
