"""Which adapters are active: one shared, cheap-to-swap description per `LoraModel`.

Every `LoRALinear` of a model holds a reference to the same :class:`Router`, so switching
adapters is one attribute assignment however many layers or adapters there are. A selection set
with :meth:`Router.override` lives in a :class:`contextvars.ContextVar`: it is visible only to the
thread (or asyncio task) that set it, which is what makes per-call adapter choice thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rows import RowPlan


@dataclass(frozen=True)
class Selection:
    """What is active: a weighted set of adapters (empty: the base model alone).

    Attributes:
        weights: ``(adapter name, weight)`` pairs; a single active adapter has weight 1.0.
        rows: Per-row adapters of a mixed batch (see `lora_kit.rows`); when set, it replaces
            ``weights`` for the call.
    """

    weights: tuple[tuple[str, float], ...] = ()
    rows: RowPlan | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the active adapters, in order."""
        return tuple(name for name, _ in self.weights)


BASE_ONLY = Selection()


class Router:
    """The active selection of one model: a process-wide default plus a per-context override."""

    def __init__(self) -> None:
        self.default: Selection = BASE_ONLY
        self._override: ContextVar[Selection | None] = ContextVar(
            "lora_kit_selection", default=None
        )

    @property
    def current(self) -> Selection:
        """The selection in force for the calling thread/task."""
        override = self._override.get()
        return self.default if override is None else override

    @contextmanager
    def override(self, selection: Selection) -> Iterator[None]:
        """Use ``selection`` in this context only; restored on exit, also on error."""
        token = self._override.set(selection)
        try:
            yield
        finally:
            self._override.reset(token)

    # A ContextVar can be neither pickled nor deep-copied: copies get a fresh one.
    def __getstate__(self) -> dict[str, Any]:
        return {"default": self.default}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.default = state["default"]
