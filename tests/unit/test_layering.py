"""Imports only point inward, from the edges to the core (DESIGN.md §2).

Every module under src/planetary_mesh is parsed (not imported) and each ``import`` in it, at the
top or inside a function, is checked against the table below. A new dependency between layers is
a design decision: make it here, on purpose, or not at all.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import planetary_mesh

PKG = "planetary_mesh"
SRC = Path(planetary_mesh.__file__).parent

# The package root holds only ``__version__``; naming it allows exactly ``planetary_mesh``, never
# its subpackages.
ROOT = PKG

# Which of the project's own modules each layer may import (a name allows that module and
# everything under it). Its own layer is always allowed. Anything not listed is refused.
ALLOWED: dict[str, frozenset[str]] = {
    # The pure core: plain data and functions, stdlib only (checked separately below).
    "core": frozenset({"planetary_mesh.errors"}),
    # Leaves every layer may lean on.
    "errors": frozenset(),
    "units": frozenset({"planetary_mesh.errors"}),
    "config": frozenset({"planetary_mesh.errors"}),
    "protocol": frozenset({"planetary_mesh.errors", "planetary_mesh.units"}),
    "pki": frozenset({"planetary_mesh.errors"}),
    # Finding the coordinator on the LAN: a hint only, it trusts and decides nothing.
    "discovery": frozenset({"planetary_mesh.errors"}),
    # `mesh doctor`'s checks: the network, discovery, TLS against the mesh's CA.
    "doctor": frozenset(
        {"planetary_mesh.errors", "planetary_mesh.discovery", "planetary_mesh.pki"}
    ),
    # The durable record knows the domain, nothing about the wire, the edges or the sandbox.
    "store": frozenset(
        {"planetary_mesh.core", "planetary_mesh.errors", "planetary_mesh.units"}
        | {"planetary_mesh.config"}
    ),
    # The sandbox runs a process; it knows nothing of who asked for it.
    "sandbox": frozenset(
        {"planetary_mesh.core", "planetary_mesh.errors", "planetary_mesh.units"}
        | {"planetary_mesh.config"}
    ),
    # The coordinator is where logic meets I/O: core, store, PKI, the wire format.
    "coordinator": frozenset(
        {
            ROOT,
            "planetary_mesh.discovery",
            "planetary_mesh.core",
            "planetary_mesh.store",
            "planetary_mesh.pki",
            "planetary_mesh.protocol",
            "planetary_mesh.config",
            "planetary_mesh.errors",
            "planetary_mesh.units",
        }
    ),
    # The agent talks to the coordinator over the wire only, and runs tasks in the sandbox.
    "agent": frozenset(
        {
            ROOT,
            "planetary_mesh.discovery",
            "planetary_mesh.core",
            "planetary_mesh.sandbox",
            "planetary_mesh.pki",
            "planetary_mesh.protocol",
            "planetary_mesh.config",
            "planetary_mesh.errors",
            "planetary_mesh.units",
        }
    ),
    # The client library speaks the public API and nothing else.
    "client": frozenset(
        {
            ROOT,
            "planetary_mesh.discovery",
            "planetary_mesh.core",
            "planetary_mesh.pki",
            "planetary_mesh.protocol",
            "planetary_mesh.config",
            "planetary_mesh.errors",
            "planetary_mesh.units",
        }
    ),
    # The CLI uses the client for everything a user asks of the mesh; the only exceptions are
    # the documented daemon entry points it starts (`mesh coordinator`, `mesh agent`, `mesh up`,
    # `mesh init`): never the coordinator's service or app, never the store.
    "cli": frozenset(
        {
            ROOT,
            "planetary_mesh.client",
            "planetary_mesh.config",
            "planetary_mesh.units",
            "planetary_mesh.errors",
            "planetary_mesh.protocol",
            "planetary_mesh.coordinator.server",
            "planetary_mesh.coordinator.bootstrap",
            "planetary_mesh.discovery",
            "planetary_mesh.doctor",
            # `mesh users add` makes the person's key on the admin's machine, never the server.
            "planetary_mesh.pki",
            # The liveness policy `mesh coordinator`'s flags fill in: plain data, pointing inward.
            "planetary_mesh.core.liveness",
            "planetary_mesh.agent",
            "planetary_mesh.sandbox.runner",
            "planetary_mesh.testing",
        }
    ),
    # LocalMesh starts real daemons and hands back a client: the same entry points as the CLI.
    "testing": frozenset(
        {
            ROOT,
            "planetary_mesh.client",
            "planetary_mesh.config",
            "planetary_mesh.units",
            "planetary_mesh.errors",
            "planetary_mesh.protocol",
            "planetary_mesh.pki",
            "planetary_mesh.coordinator.server",
            "planetary_mesh.coordinator.bootstrap",
            "planetary_mesh.agent",
            "planetary_mesh.sandbox.runner",
            # Sweeps what a killed agent left in its task cgroups.
            "planetary_mesh.sandbox.limits",
        }
    ),
    "__main__": frozenset({"planetary_mesh.cli"}),
    # The package root itself must stay import-free, or importing anything would import it all:
    # ``from planetary_mesh import MeshExecutor`` imports the executor only when asked for it
    # (a module __getattr__), never on ``import planetary_mesh``.
    "__init__": frozenset({"planetary_mesh.client.executor"}),
}

# What DESIGN.md and the brief name outright, kept apart so that loosening ALLOWED above to let
# one of these through fails here, not silently.
FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset(
        {"store", "coordinator", "agent", "cli", "client", "sandbox", "pki", "protocol", "config"}
    ),
    "store": frozenset({"coordinator", "agent", "cli", "client", "sandbox"}),
    "sandbox": frozenset({"coordinator", "store", "cli", "client", "agent"}),
    "client": frozenset({"coordinator", "store", "agent", "sandbox", "cli"}),
    "agent": frozenset({"coordinator", "store", "cli", "client"}),
    "cli": frozenset(
        {"store", "coordinator.service", "coordinator.app", "coordinator.sessions", "core"}
    ),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, resolved to a module name
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports_of(module: str) -> Iterator[Import]:
    path = MODULES[module]
    return imports_in(path.read_text(), module, is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool) -> Iterator[Import]:
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from planetary_mesh.pki import certs`` imports the module ``certs``.
                candidate = f"{source}.{alias.name}"
                yield Import(module, candidate if candidate in MODULES else source, node.lineno)


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]
INTERNAL = [imp for imp in ALL_IMPORTS if imp.target == PKG or imp.target.startswith(PKG + ".")]


def allows(allowed: frozenset[str], target: str) -> bool:
    return any(
        target == name or (name != ROOT and target.startswith(name + ".")) for name in allowed
    )


def where(imp: Import) -> str:
    return f"{MODULES[imp.module].relative_to(SRC.parent)}:{imp.line} imports {imp.target}"


# -- the rules ----------------------------------------------------------------------------------


def test_every_internal_import_is_allowed_for_its_layer() -> None:
    refused = []
    for imp in INTERNAL:
        layer = layer_of(imp.module)
        assert layer in ALLOWED, f"{imp.module} is in a layer the table does not know: {layer}"
        own = frozenset() if layer in ("__init__", "__main__") else {f"{PKG}.{layer}"}
        if not allows(ALLOWED[layer] | own, imp.target):
            refused.append(where(imp))
    assert refused == [], "imports that point outward:\n" + "\n".join(refused)


def test_the_core_imports_only_the_stdlib_and_itself() -> None:
    outside = [
        where(imp)
        for imp in ALL_IMPORTS
        if layer_of(imp.module) == "core"
        and imp.target not in (PKG,)
        and not imp.target.startswith(PKG + ".")
        and imp.target.partition(".")[0] not in sys.stdlib_module_names
    ]
    assert outside == [], "the core must stay stdlib only:\n" + "\n".join(outside)


def test_the_table_keeps_what_the_design_forbids() -> None:
    for layer, banned in FORBIDDEN.items():
        for ban in banned:
            full = f"{PKG}.{ban}"
            assert not allows(ALLOWED[layer], full), (layer, ban)
            assert not allows(ALLOWED[layer], full + ".anything"), (layer, ban)


def test_forbidden_imports_are_refused_by_the_checker() -> None:
    # The checker itself must say no: a rule that matches nothing proves nothing.
    assert not allows(ALLOWED["cli"] | {f"{PKG}.cli"}, "planetary_mesh.coordinator.service")
    assert not allows(ALLOWED["cli"], "planetary_mesh.store.sqlite")
    assert allows(ALLOWED["cli"], "planetary_mesh.coordinator.server")
    assert allows(ALLOWED["cli"], "planetary_mesh.agent.daemon")
    assert not allows(ALLOWED["client"], "planetary_mesh.pkix")  # a prefix is not a parent
    assert allows(ALLOWED["client"], ROOT)
    assert not allows(ALLOWED["client"], "planetary_mesh.coordinator")


# -- that the rules saw something ---------------------------------------------------------------


def test_every_layer_in_the_table_has_modules_and_every_module_a_layer() -> None:
    layers: dict[str, list[str]] = {}
    for module in MODULES:
        layers.setdefault(layer_of(module), []).append(module)
    assert set(layers) == set(ALLOWED), "a layer was added or removed: update the table"
    for layer in ("core", "store", "sandbox", "client", "cli", "coordinator", "agent"):
        assert len(layers[layer]) >= 2, (layer, layers[layer])


def test_the_parser_finds_the_imports_that_are_known_to_be_there() -> None:
    targets = {(imp.module, imp.target) for imp in INTERNAL}
    # Top-level, ``from x import module``, and a deferred import inside a function.
    assert ("planetary_mesh.core.model", "planetary_mesh.core.states") in targets
    assert ("planetary_mesh.store.sqlite", "planetary_mesh.core.scheduler") in targets
    assert ("planetary_mesh.agent.daemon", "planetary_mesh.pki.tls") in targets
    assert ("planetary_mesh.cli.main", "planetary_mesh.coordinator.server") in targets
    assert len(INTERNAL) >= 40
    for layer in ("core", "store", "sandbox", "client", "cli", "agent", "coordinator"):
        assert any(layer_of(imp.module) == layer for imp in INTERNAL), layer


def test_relative_imports_are_resolved() -> None:
    source = "from ..errors import MeshError\nfrom . import model\nfrom .states import TaskState\n"
    in_module = {i.target for i in imports_in(source, "planetary_mesh.core.x", is_package=False)}
    assert in_module == {
        "planetary_mesh.errors",
        "planetary_mesh.core.model",
        "planetary_mesh.core.states",
    }
    in_package = {i.target for i in imports_in(source, "planetary_mesh.core", is_package=True)}
    assert in_package == in_module
    deferred = "def f() -> None:\n    import planetary_mesh.store.sqlite\n"
    assert [i.target for i in imports_in(deferred, "planetary_mesh.cli.x", is_package=False)] == [
        "planetary_mesh.store.sqlite"
    ]
    assert module_name(SRC / "core" / "__init__.py") == "planetary_mesh.core"
    assert layer_of("planetary_mesh") == "__init__"
    assert layer_of("planetary_mesh.cli.main") == "cli"
