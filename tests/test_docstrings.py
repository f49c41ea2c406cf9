"""Every public class and function of the core packages says why it exists (issue 12, item 5).

Public means no leading underscore, at module level or as a method of a public class. Dunder
methods are exempt except `__init__`, which needs a docstring of its own only when the class
docstring does not already document its arguments (an `Args:` section, or each parameter
named in backquotes). Functions nested in functions, and everything in private classes, are exempt.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The packages held to the rule (paths from the repository root).
PACKAGES = (
    "cvi_agent/llm",
    "cvi_agent/bot",
    "cvi_agent/conversations",
    "cvi_agent/rooms",
    "cvi_agent/store",
)

# Folders inside those packages not (yet) held to it.
EXCLUDED: tuple[str, ...] = ()


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _is_exempt_decorator(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`@typing.overload` stubs and property setters/deleters share the main definition's doc."""
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Name) and decorator.id == "overload":
            return True
        if isinstance(decorator, ast.Attribute) and decorator.attr in (
            "overload",
            "setter",
            "deleter",
        ):
            return True
    return False


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def _class_documents(doc: str | None, parameters: list[str]) -> bool:
    """Whether a class docstring already documents the constructor's arguments."""
    if not parameters:
        return True
    if not doc:
        return False
    if re.search(r"^\s*Args:\s*$", doc, re.M):
        return True
    return all(f"`{p}`" in doc for p in parameters)


def _body(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements at this level, looking inside `if`/`try`/`with` blocks (not functions)."""
    for node in nodes:
        if isinstance(node, ast.If):
            yield from _body(node.body)
            yield from _body(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _body(block)
            for handler in node.handlers:
                yield from _body(handler.body)
        elif isinstance(node, ast.With | ast.AsyncWith):
            yield from _body(node.body)
        else:
            yield node


def _missing_in(
    nodes: list[ast.stmt], prefix: str, cls: ast.ClassDef | None
) -> Iterator[tuple[int, str]]:
    """(line, qualified name) of each definition at this level that lacks a docstring."""
    for node in _body(nodes):
        if isinstance(node, ast.ClassDef):
            if not _is_public(node.name):
                continue
            if ast.get_docstring(node) is None:
                yield node.lineno, f"{prefix}{node.name}"
            yield from _missing_in(node.body, f"{prefix}{node.name}.", node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = node.name
            if name == "__init__":
                if cls is None or ast.get_docstring(node) is not None:
                    continue
                if not _class_documents(ast.get_docstring(cls), _parameters(node)):
                    yield node.lineno, f"{prefix}{name}"
                continue
            if not _is_public(name) or _is_exempt_decorator(node):
                continue
            if ast.get_docstring(node) is None:
                yield node.lineno, f"{prefix}{name}"


def missing_docstrings(package: str) -> list[str]:
    """`path:line name` of every public class or function in `package` without a docstring."""
    found: list[str] = []
    excluded = [ROOT / e for e in EXCLUDED]
    for path in sorted((ROOT / package).rglob("*.py")):
        if any(path.is_relative_to(e) for e in excluded):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        relative = path.relative_to(ROOT)
        for line, name in _missing_in(tree.body, "", None):
            found.append(f"{relative}:{line} {name}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package: str) -> None:
    assert (ROOT / package).is_dir(), f"{package} does not exist"
    missing = missing_docstrings(package)
    if missing:
        pytest.fail(
            f"{len(missing)} public name(s) in {package} without a docstring:\n"
            + "\n".join(missing),
            pytrace=False,
        )


def test_the_check_sees_what_it_should() -> None:
    source = '''
class Public:
    """Documented, naming only `a` (b is not quoted)."""

    def __init__(self, a: int, b: int) -> None: ...
    def method(self) -> None: ...
    def _private(self) -> None: ...
    def __repr__(self) -> str: ...


class Documented:
    """Args:
        a: documented.
    """

    def __init__(self, a: int) -> None: ...


class _Hidden:
    def method(self) -> None: ...


def function() -> None:
    def nested() -> None: ...


async def coroutine() -> None: ...
'''
    found = [name for _, name in _missing_in(ast.parse(source).body, "", None)]
    assert found == ["Public.__init__", "Public.method", "function", "coroutine"]
