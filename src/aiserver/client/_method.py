"""``RequestMethod``: a client method whose signature is its request dataclass's constructor.

``upscale = RequestMethod(ImageUpscale, start)`` makes ``client.upscale(image, model="x")``
build ``ImageUpscale(image, model="x")`` and return ``client.start(request)``. The keyword
list of a call lives in its dataclass only; type checkers see it through ``ParamSpec`` and
``inspect.signature`` / ``help()`` through ``__signature__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, overload

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
        self._name = getattr(request_type, "__name__", "method")
        self.__doc__ = request_type.__doc__
        self.__signature__ = inspect.signature(request_type)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    def __call__(self, client: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Called on the class, like a function: ``AsyncClient.upscale(client, image)``."""
        return self._run(client, self.request_type(*args, **kwargs))

    @overload
    def __get__(self, client: None, owner: type[Any]) -> RequestMethod[_C, _P, _R, _T]: ...
    @overload
    def __get__(self, client: _C, owner: type[Any]) -> Callable[_P, _T]: ...
    def __get__(self, client: _C | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        request_type, run = self.request_type, self._run

        def method(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return run(client, request_type(*args, **kwargs))

        method.__name__ = method.__qualname__ = self._name
        method.__doc__ = self.__doc__
        method.__signature__ = self.__signature__  # type: ignore[attr-defined]
        return method
