"""The Client's URLs, made once per path, are the ones httpx would make on every request."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from planetary_mesh.client.client import absolute_url


@pytest.mark.parametrize("base", ["https://127.0.0.1:4443", "https://[::1]:9/", "https://h:1/mesh"])
@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/jobs/run", {"timeout": 60.0}),
        ("/v1/jobs", None),
        ("/v1/jobs/0123abcd/tasks/3/logs", {"offset": 0, "limit": 65536}),
        ("/v1/events", {"after": 3, "wait": 1.5, "limit": None, "kind": "a b&c"}),
    ],
)
def test_the_url_is_the_one_httpx_makes(
    base: str, path: str, params: dict[str, Any] | None
) -> None:
    with httpx.Client(base_url=base) as http:
        expected = http.build_request("GET", path, params=params).url
        query = "" if not params else str(httpx.QueryParams(params))
        assert absolute_url(http.base_url, path, query) == expected
        assert str(absolute_url(http.base_url, path, query)) == str(expected)
