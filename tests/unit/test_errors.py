"""The exception tree drawn in ``hato.errors``' docstring against the classes in the package."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import hato
import hato.errors
from hato.errors import HatoError

# "    │   ├── QueueFullError     ..." -> ("│   ", "├── ", "QueueFullError", None)
# "    ├── UserError              (hato.users) ..." -> ("", "├── ", "UserError", "hato.users")
_TREE_LINE = re.compile(r"^    ((?:[│ ]   )*)([├└]── )?(\w+)(?: +\((hato[\w.]*)\))?")


def _modules() -> list[ModuleType]:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(hato.__path__, "hato.")
        if info.name != "hato.__main__"  # importing it runs the command
    ]


def _public_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class the package defines under a public name, by name."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules():
        for name, value in vars(module).items():
            # type(value), not isinstance: a lazy object (Django's settings) would load.
            if (
                issubclass(type(value), type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                assert name not in found, f"two exception classes named {name}"
                found[name] = value
    return found


def _drawn_tree() -> dict[str, tuple[str | None, str | None]]:
    """The docstring's tree: class name -> (parent's name, module named on its line)."""
    doc = hato.errors.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    tree: dict[str, tuple[str | None, str | None]] = {}
    path: list[str] = []
    for line in block.splitlines():
        match = _TREE_LINE.match(line)
        assert match, f"not a tree line: {line!r}"
        indent, branch, name, module = match.groups()
        depth = len(indent) // 4 + (1 if branch else 0)
        path = [*path[:depth], name]
        tree[name] = (path[-2] if depth else None, module)
    return tree


def test_every_hato_error_is_drawn_under_its_base_with_its_module() -> None:
    tree = _drawn_tree()
    errors = {n: c for n, c in _public_exceptions().items() if issubclass(c, HatoError)}
    assert "UserError" in errors and "SigningError" in errors and "SendError" in errors
    for name, cls in errors.items():
        assert name in tree, f"{cls.__module__}.{name} is missing from hato.errors' tree"
        parent, module = tree[name]
        base = next((b.__name__ for b in cls.__bases__ if issubclass(b, HatoError)), None)
        assert parent == base, f"{name} is drawn under {parent}, but its base is {base}"
        home = None if cls.__module__ == "hato.errors" else cls.__module__
        assert module == home, f"{name} is drawn as from {module}, but lives in {home}"


def test_the_tree_draws_only_classes_that_exist() -> None:
    errors = {n for n, c in _public_exceptions().items() if issubclass(c, HatoError)}
    assert set(_drawn_tree()) <= errors


def test_other_public_exceptions_are_named_with_their_module() -> None:
    doc = hato.errors.__doc__ or ""
    others = {n: c for n, c in _public_exceptions().items() if not issubclass(c, HatoError)}
    for name, cls in others.items():
        assert f"``{name}`` ({cls.__module__})" in doc, f"{cls.__module__}.{name} is not named"
