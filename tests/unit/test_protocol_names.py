"""Input file names are flat names, whatever text arrives: never a path, never `.` or `..`,
never a NUL; a refused name is named in a sentence, and a good one comes through unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from planetary_mesh.protocol import JobSubmit

# Text weighted toward what attacks file names: separators, dots, NUL, unicode look-alikes.
names = st.one_of(
    st.text(min_size=0, max_size=300),
    st.text(alphabet="./\\\0-_+abcAB1 \u2215\u2024", min_size=0, max_size=12),
    st.sampled_from(["..", ".", "../x", "/etc/passwd", "a/b", "x\0y", "C:\\x", "ok.txt"]),
)


@given(names)
def test_a_file_name_is_flat_or_refused_with_a_reason(name: str) -> None:
    try:
        job = JobSubmit(argv=["true"], files={name: ""})
    except ValidationError as refused:
        assert "must be a plain name" in str(refused)
        return
    (kept,) = job.files
    assert kept == name
    assert "/" not in kept and "\\" not in kept and "\0" not in kept
    assert kept not in (".", "..") and 1 <= len(kept) <= 255
    assert kept.isascii()


@pytest.mark.parametrize("name", ["..", ".", "../x", "/etc/passwd", "a/b", "x\0y", ""])
def test_the_classic_escapes_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        JobSubmit(argv=["true"], files={name: ""})
