"""The launcher a warm sandbox runs as its PID 1: in C where the agent can compile it, in Python
where it cannot.

Every new job's sandbox starts a launcher. The Python one (warm_launcher.py) costs ~10 ms of CPU
to start, the C one (warm_launcher.c) well under 1 ms; on a small machine running one-task jobs
back to back, that CPU is what each job waits for. The agent compiles the C source the first
time it needs it (statically linked where it can: no dynamic loader at each start) and keeps the
binary in a cache named by the hash of its source and recipe, so an upgrade recompiles and
agents starting together each compile at most once (~0.2 s). Both speak the same protocol
(warm_launcher.py's docstring). The C binary is also the agent's helper on the host: run as
``launcher --join FD... [--rlimits SPEC] [--user UID:GID] -- COMMAND``, it joins a sandbox's
cgroup, takes the rlimits and becomes the task user (what setpriv did, without its exec), then
execs bwrap, so everything of the sandbox is born in its cgroup and the agent's spawn is a vfork
(see bwrap.py).

bwrap binds the launcher after it has dropped to the task user, so the package's own copy may sit
where that user cannot look (a venv in a private home): it binds a copy that root owns and
everyone may read, in a folder of the runner's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PYTHON_SOURCE = Path(__file__).with_name("warm_launcher.py")
C_SOURCE = Path(__file__).with_name("warm_launcher.c")
# Where the sandbox shows it, read only.
LAUNCHER_INSIDE = "/run/planetary-mesh/launcher"
COMPILE_TIMEOUT_S = 120.0
COMPILE_RECIPE = "-O2 -static, else -O2"  # part of the cache's key: a change recompiles


@dataclass(frozen=True)
class Launcher:
    path: Path  # the copy bwrap binds at LAUNCHER_INSIDE
    argv: tuple[str, ...]  # how the sandbox runs it, before its own arguments
    native: bool  # the C one


def prepare_launcher(folder: Path, native: bool = True) -> Launcher | None:
    """The launcher to bind, copied into ``folder``: the C one unless ``native`` is False or it
    cannot be compiled, else the Python one; None when neither can run (no Python under /usr)."""
    if native:
        compiled = native_launcher()
        if compiled is not None:
            path = folder / "launcher"
            shutil.copyfile(compiled, path)
            path.chmod(0o755)
            return Launcher(path, (LAUNCHER_INSIDE,), True)
    python = launcher_python()
    if python is None:
        return None
    source = folder / PYTHON_SOURCE.name
    shutil.copyfile(PYTHON_SOURCE, source)
    source.chmod(0o644)
    return Launcher(_compiled(python, source), (python, "-I", "-S", LAUNCHER_INSIDE), False)


def launcher_python() -> str | None:
    """A Python the sandbox can run (it shows the host's /usr and nothing else), or None."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if candidate.startswith("/usr/") and os.access(candidate, os.X_OK):
            return candidate
    return None


def cache_folder() -> Path:
    """Where compiled launchers are kept: $XDG_CACHE_HOME/planetary-mesh, or ~/.cache's."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "planetary-mesh"


def native_launcher(cache: Path | None = None) -> Path | None:
    """The compiled C launcher, compiled now if not yet; None (and a warning that says what to
    do) when it cannot be: no C compiler, or the compile failed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning(
            "no C compiler (cc): warm sandboxes run the Python launcher, ~10 ms more CPU per"
            " new job; install one (apt-get install gcc libc6-dev) for the faster launcher"
        )
        return None
    recipe = C_SOURCE.read_bytes() + COMPILE_RECIPE.encode()
    folder = cache or cache_folder()
    target = folder / f"warm-launcher-{hashlib.sha256(recipe).hexdigest()[:16]}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    temporary = folder / f".{target.name}.{os.getpid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # Static: no dynamic loader at each start (~0.2 ms of CPU per sandbox here).
            _compile(compiler, temporary, "-static")
        except subprocess.CalledProcessError:
            _compile(compiler, temporary)  # no static C library (libc.a): dynamic, then
        os.replace(temporary, target)  # whole or not at all, whoever compiles alongside
    except (OSError, subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", None) or b""
        lines = stderr.decode(errors="replace").strip().splitlines()
        log.warning(
            "could not compile the warm sandbox's C launcher with %s (%s): warm sandboxes run"
            " the Python launcher, ~10 ms more CPU per new job",
            compiler,
            lines[-1] if lines else error,
        )
        temporary.unlink(missing_ok=True)
        return None
    return target


def _compile(compiler: str, output: Path, *flags: str) -> None:
    command = [compiler, "-O2", *flags, "-o", str(output), str(C_SOURCE)]
    subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)


def _compiled(python: str, source: Path) -> Path:
    """``source`` compiled by ``python`` (the one that runs it in the sandbox), beside it: a
    script run from source is compiled at every start, ~2 ms of each new job's sandbox.
    The source itself if that fails (it runs as well, a little slower)."""
    compiled = source.with_suffix(".pyc")
    try:
        subprocess.run(
            [python, "-I", "-S", "-c", _COMPILE, str(source), str(compiled)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        compiled.chmod(0o644)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("could not compile the warm sandbox launcher (%s); it runs from source", error)
        return source
    return compiled


_COMPILE = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)"
