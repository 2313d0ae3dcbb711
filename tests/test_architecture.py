"""The layers of the package stay layered (docs/architecture.md "Layers").

Every import counts: module level, inside functions and under `TYPE_CHECKING`. A module may import from its
own layer's part or from a lower layer, never from a higher one; the parts of one layer are independent of
each other; and no module imports itself back through others (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnctl"

#: Top to bottom. Parts separated in one tuple are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("attnctl",),  # the public API: __init__, __main__
    ("attnctl.render",),  # the application: job files, renderer, CLI, wrapped generation, loading, calibration
    ("attnctl.handle",),  # apply() and the Handle
    ("attnctl.pipelines",),  # the wrapped call: runtime, denoiser wrapper, call protocols, prompt encoding
    ("attnctl.controls",),  # one file or folder per control
    ("attnctl.control",),  # the control protocol: Control, Bound, BindContext
    ("attnctl.processors",),  # per-family processors, edits and effects, the hook chain
    ("attnctl.denoiser_call", "attnctl.selection"),  # one denoiser call's rows / layer selection
    ("attnctl.kernels", "attnctl.families", "attnctl.toy", "attnctl.testing"),
    ("attnctl.prompt_weights",),  # finds a phrase as attnctl.tokens does (`phrase_pattern`), so occurrences count alike
    ("attnctl.tokens", "attnctl.steps", "attnctl.noise", "attnctl.foreign_patches"),
    ("attnctl.instance",),
    ("attnctl.validation",),
    ("attnctl.errors", "attnctl._version"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The attnctl modules `name` imports anywhere in its file (a `from pkg import sub` of a submodule counts as sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "attnctl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnctl":
                continue
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            if subs:
                found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    found.discard(name)
    return found


def layer_of(name: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for index, parts in enumerate(LAYERS):
        for part in parts:
            if (name == part or name.startswith(part + ".")) and (best is None or len(part) > len(best[1])):
                best = (index, part)
    if best is None:
        raise AssertionError(f"module {name} has no place in tests/test_architecture.py LAYERS")
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {target for target in imports_of(name, path, known) if target in known} for name, path in found.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        source_layer, source_part = layer_of(source)
        for target in sorted(targets):
            target_layer, target_part = layer_of(target)
            if target_layer < source_layer:
                bad.append(f"{source} imports {target}: {target_part} sits above {source_part}")
            elif target_layer == source_layer and target_part != source_part:
                bad.append(f"{source} imports {target}: {source_part} and {target_part} are independent parts of one layer")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_layer_imports_upward():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    edges = graph()
    edges["attnctl.kernels.spec"] = edges["attnctl.kernels.spec"] | {"attnctl.handle"}
    assert violations(edges) == ["attnctl.kernels.spec imports attnctl.handle: attnctl.handle sits above attnctl.kernels"]
    assert any("attnctl.kernels.spec" in component and "attnctl.handle" in component for component in cycles(edges))
    edges = graph()
    edges["attnctl.families.base"] = edges["attnctl.families.base"] | {"attnctl.kernels.spec"}
    assert violations(edges) == [
        "attnctl.families.base imports attnctl.kernels.spec: attnctl.families and attnctl.kernels are independent parts of one layer"
    ]


@pytest.mark.parametrize("body", [
    "def f():\n    from ..handle import apply\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..handle import Handle\n",
    "import attnctl.handle\n",
])
def test_imports_inside_functions_and_type_checking_count(tmp_path, body):
    fake = tmp_path / "spec.py"
    fake.write_text(body)
    assert "attnctl.handle" in imports_of("attnctl.kernels.spec", fake, set(modules()))
