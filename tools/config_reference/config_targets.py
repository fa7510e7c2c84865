"""Constructor signatures of `_target_`s for the configuration reference: the named parameters of a class,
function or classmethod, following ``**kwargs`` handed on to ``super().__init__``; nothing is instantiated."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object


@dataclass
class TargetParams:
    target: str
    params: list[tuple[str, Any]]   # (name, default or inspect.Parameter.empty), in signature order
    open_kwargs: bool               # accepts further **kwargs that are not resolved to named parameters
    error: str | None = None


def _super_init_call(cls: type) -> tuple[int, set[str], bool] | None:
    """(positional args, keyword names, passes **kwargs) of the ``super().__init__(...)`` call in
    ``cls.__init__``'s source, or None when there is none or no source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
                and node.func.value.func.id == "super"):
            npos = sum(1 for a in node.args if not isinstance(a, ast.Starred))
            names = {k.arg for k in node.keywords if k.arg is not None}
            return npos, names, any(k.arg is None for k in node.keywords)
    return None


def target_params(target: str) -> TargetParams:
    """The named parameters of a `_target_` (a class, function or classmethod). For a class whose
    ``__init__`` takes ``**kwargs`` and hands them to ``super().__init__``, the base class's parameters that
    the call does not set follow (repeatedly up the MRO)."""
    try:
        obj = get_object(target)
        sig = inspect.signature(obj)
    except Exception as e:  # noqa: BLE001 - reported in the output instead
        return TargetParams(target, [], False, f"{type(e).__name__}: {e}")
    params: list[tuple[str, Any]] = []
    seen: set[str] = set()

    def add(parameters, skip_positional: int = 0, skip_names: frozenset = frozenset()) -> bool:
        var_kw = False
        for p in parameters:
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
                continue
            if p.kind is p.VAR_POSITIONAL:
                continue
            if skip_positional and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                skip_positional -= 1
                continue
            if p.name in seen or p.name in skip_names:
                continue
            seen.add(p.name)
            params.append((p.name, p.default))
        return var_kw

    open_kwargs = add(sig.parameters.values())
    if inspect.isclass(obj):
        owner = next((c for c in obj.__mro__ if "__init__" in c.__dict__), None)
        while open_kwargs and owner is not None:
            call = _super_init_call(owner)
            if call is None or not call[2]:
                break  # **kwargs go elsewhere (or we cannot tell): stay open
            npos, names, _ = call
            mro = obj.__mro__
            base = next((c for c in mro[mro.index(owner) + 1:] if "__init__" in c.__dict__), None)
            if base is None or base is object:
                break
            base_params = list(inspect.signature(base.__init__).parameters.values())[1:]  # drop self
            open_kwargs = add(base_params, npos, frozenset(names))
            owner = base
    return TargetParams(target, params, open_kwargs)

