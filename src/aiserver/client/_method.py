"""``RequestMethod``: a client method whose signature is its request dataclass's constructor.

``upscale = RequestMethod(ImageUpscale, start)`` makes ``client.upscale(image, model="x")``
build ``ImageUpscale(image, model="x")`` and return ``client.start(request)``. The keyword
list of a call lives in its dataclass only; type checkers see it through ``ParamSpec``, and
``inspect.signature`` / ``help()`` through ``__signature__``.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

__all__ = ["RequestMethod"]

_C = TypeVar("_C")
_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


class RequestMethod(Generic[_C, _P, _R, _T]):
    """A descriptor: ``request_type(*args, **kwargs)`` handed to ``run(client, request)``."""

    def __init__(self, request_type: Callable[_P, _R], run: Callable[[_C, _R], _T]) -> None:
        self.request_type = request_type
        self._run = run
        # The request's parameters, and what ``run`` returns (a dataclass "returns" None).
        signature = inspect.signature(request_type).replace(
            return_annotation=inspect.signature(run).return_annotation
        )

        def function(client: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            return run(client, request_type(*args, **kwargs))

        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        function.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *signature.parameters.values()]
        )
        function.__doc__ = request_type.__doc__
        self._function = function

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._function.__name__ = name
        self._function.__qualname__ = f"{owner.__qualname__}.{name}"

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Callable[Concatenate[_C, _P], _T]: ...
    @overload
    def __get__(self, client: _C, owner: type[Any]) -> Callable[_P, _T]: ...
    def __get__(self, client: _C | None, owner: type[Any]) -> Any:
        if client is None:  # on the class: the plain function, as for any method
            return self._function
        return types.MethodType(self._function, client)
