"""Bounded adapter memory: registered adapters are loaded on first use and evicted when idle.

``lm.register_adapter(name, source)`` records only the name and where to load it from, so
registering thousands of adapters costs a few hundred bytes each. When a selection needs a
registered adapter that is not resident (``set_adapter``, ``using``, ``adapter_names``), it is
loaded from its source; once more than ``max_resident`` adapters (or ``max_bytes`` of adapter
tensors) are resident, the least recently used ones are evicted (deleted from the model) and will
be reloaded transparently next time. While adapters are merged into the base weights nothing is
evicted (deleting is refused then); the budget applies again from the first use after unmerge.

Thread-safety: loading and eviction happen under one lock, and every adapter a running call
uses is *pinned* for the duration of the call (the model-wide default for as long as it is the
default), so an adapter is never evicted while a call is using it. Adapters added with
``add_adapter``/``load_adapter`` directly are not managed by the cache and never evicted; a
registered name cannot be taken that way (the cache could no longer load it).

A call that fails (a forward that raises, say) after the cache loaded an adapter for it leaves
that adapter resident, as a call that succeeds does: it is unpinned on the way out, counts
against the budget as the most recently used, and is evicted like any idle adapter. Unloading
it at once would only make a retry load it again. When the eviction a release triggers raises,
the failed call's own error propagates, with the eviction's as a note.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .errors import AdapterNameError, ConfigError
from .rows import clear_stacks

if TYPE_CHECKING:
    from .model import LoraModel


@dataclass(frozen=True)
class Registration:
    """Where to (re)load a registered adapter from, and how.

    A swap (``LoraModel.swap_adapter``) does not replace ``source``: the file swapped in may
    adapt fewer modules (the others are held at zero), and loading it alone would give the
    adapter only those, so a later swap back to the full set would be refused. A reload loads
    ``source``, which sets the module set, and then swaps ``swapped`` in.

    Attributes:
        name: The adapter's name in the model.
        source: Directory, library name or Hub repo id (see `lora_kit.resolve`) it was
            registered with; it sets the modules the adapter holds.
        max_rank: Load it swappable at this padded rank (see `lora_kit.swap`).
        check_base: Verify the base fingerprint on each load.
        adapter_dtype: dtype of the loaded tensors.
        swapped: The source last swapped into it (None: never swapped).
    """

    name: str
    source: str
    max_rank: int | None = None
    check_base: bool = True
    adapter_dtype: torch.dtype = torch.float32
    swapped: str | None = None


class AdapterCache:
    """The registry and LRU residency of a `LoraModel`'s registered adapters.

    Attributes:
        max_resident: Most registered adapters resident at once (None: unbounded).
        max_bytes: Most bytes of registered adapters' tensors resident at once (None: unbounded).
        loads: How many times an adapter was loaded (first use or reload).
        evictions: How many times an adapter was evicted.
    """

    def __init__(
        self, lm: LoraModel, max_resident: int | None = None, max_bytes: int | None = None
    ) -> None:
        self._lm = lm
        self._lock = threading.RLock()
        self._registered: dict[str, Registration] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._pins: Counter[str] = Counter()
        self._default: tuple[str, ...] = ()
        self._loading: tuple[int, str] | None = None  # (thread, name) of the load in progress
        self.loads = 0
        self.evictions = 0
        self.max_resident: int | None = None
        self.max_bytes: int | None = None
        self.set_budget(max_resident, max_bytes)

    def set_budget(self, max_resident: int | None, max_bytes: int | None) -> None:
        """Change the budget (evicting idle adapters at once if over it).

        Raises:
            ConfigError: A limit that is not a positive integer.
        """
        for label, value in (("max_resident", max_resident), ("max_bytes", max_bytes)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(f"{label} must be a positive integer or None, got {value!r}")
        with self._lock:
            self.max_resident, self.max_bytes = max_resident, max_bytes
            self._evict()

    @property
    def registered(self) -> tuple[str, ...]:
        """Names of all registered adapters."""
        return tuple(self._registered)

    @property
    def resident(self) -> tuple[str, ...]:
        """Registered adapters currently loaded, least recently used first."""
        with self._lock:
            return tuple(self._resident)

    @property
    def resident_bytes(self) -> int:
        """Bytes of adapter tensors held by resident registered adapters."""
        with self._lock:
            return sum(self._resident.values())

    def register(self, registration: Registration) -> None:
        """Record an adapter's source; nothing is read until it is used.

        Raises:
            AdapterNameError: The name is invalid, or taken by a resident or registered adapter.
        """
        with self._lock:
            name = registration.name
            if name in self._registered:
                raise AdapterNameError(
                    f"adapter {name!r} is already registered (from "
                    f"{self._registered[name].source!r}); unregister it first"
                )
            self._lm._check_new_name(name)
            self._registered[name] = registration

    def unregister(self, name: str) -> None:
        """Forget a registered adapter, evicting it if resident.

        Raises:
            AdapterNameError: Not registered, or in use right now.
        """
        with self._lock:
            if name not in self._registered:
                raise AdapterNameError(f"no registered adapter named {name!r}")
            if self._pins[name]:
                raise AdapterNameError(f"adapter {name!r} is in use; unregister it when idle")
            if name in self._resident:
                self._drop(name)
            del self._registered[name]

    def clear(self) -> None:
        """Forget every registration and residency (the adapters were unloaded for good).

        Called by ``merge_and_unload``: registered adapters belong to the unmerged base, so
        reloading one onto the merged model would apply it twice.
        """
        with self._lock:
            self._registered.clear()
            self._resident.clear()
            self._pins.clear()
            self._default = ()

    def is_registered(self, name: str) -> bool:
        """Whether ``name`` is a registered adapter."""
        return name in self._registered

    def set_swapped(self, name: str, source: str) -> None:
        """Swap ``source`` into registered adapter ``name`` on each reload from now on (its
        registered source itself: a plain reload again)."""
        with self._lock:
            reg = self._registered[name]
            swapped = None if source == reg.source else source
            self._registered[name] = replace(reg, swapped=swapped)

    def set_max_rank(self, name: str, max_rank: int) -> None:
        """Reload registered adapter ``name`` swappable at ``max_rank`` from now on."""
        with self._lock:
            self._registered[name] = replace(self._registered[name], max_rank=max_rank)

    def acquire(self, names: Iterable[str]) -> tuple[str, ...]:
        """Make the registered ones among ``names`` resident and pin them; returns those pinned.

        Unregistered names are left alone (the caller's selection check reports unknown ones).

        Raises:
            The errors of `LoraModel.load_adapter` when a (re)load fails, or of
            `LoraModel.delete_adapter` when an eviction does; nothing stays pinned.
        """
        pinned: list[str] = []
        with self._lock:
            try:
                for name in dict.fromkeys(names):
                    if name not in self._registered:
                        continue
                    if name not in self._resident or name not in self._lm._adapters:
                        self._resident.pop(name, None)  # deleted behind the cache's back
                        self._load(name)
                    self._resident.move_to_end(name)
                    self._pins[name] += 1
                    pinned.append(name)
                self._evict()
            except BaseException as error:  # a failed load or eviction: nothing stays pinned
                self.release_after(pinned, error)
                raise
        return tuple(pinned)

    def release(self, names: Iterable[str]) -> None:
        """Unpin names returned by :meth:`acquire`."""
        with self._lock:
            for name in names:
                self._pins[name] -= 1
                if self._pins[name] <= 0:
                    del self._pins[name]
            self._evict()

    def release_after(self, names: Iterable[str], error: BaseException) -> None:
        """Unpin ``names`` on the way out of a call that raised ``error`` (then re-raise it).

        Unpinning itself cannot fail, but the eviction it triggers can (deleting an adapter):
        that failure is added to ``error`` as a note instead of replacing it, so the caller's
        original error is the one that propagates. The adapter that could not be evicted stays
        resident, unpinned, and is evicted by a later release.
        """
        names = tuple(names)
        try:
            self.release(names)
        except Exception as failure:
            note = f"releasing adapters {list(names)} after this error also failed: {failure!r}"
            if sys.version_info >= (3, 11):
                error.add_note(note)
            else:  # what add_note does; Python 3.10 tracebacks do not print it
                error.__notes__ = [*getattr(error, "__notes__", ()), note]

    def replace_default(self, pinned: tuple[str, ...]) -> None:
        """Make ``pinned`` (from :meth:`acquire`) the default's pins; unpin the previous ones."""
        with self._lock:
            previous, self._default = self._default, pinned
            self.release(previous)

    def refuses_name(self, name: str) -> bool:
        """Whether ``name`` is registered and this thread is not the cache loading it.

        Loading a registered adapter directly (``load_adapter``/``add_adapter``) would leave the
        cache unable to load it on its next selection.
        """
        return name in self._registered and self._loading != (threading.get_ident(), name)

    def _load(self, name: str) -> None:
        reg = self._registered[name]
        self._loading = (threading.get_ident(), name)
        try:
            with self._lm._undoing_add(name):  # loaded and swapped into: both or neither
                self._lm.load_adapter(
                    reg.source,
                    name,
                    check_base=reg.check_base,
                    adapter_dtype=reg.adapter_dtype,
                    max_rank=reg.max_rank,
                )
                if reg.swapped is not None:  # over the registered modules (see `Registration`)
                    self._lm._swap(name, reg.swapped, check_base=reg.check_base, registered=False)
        finally:
            self._loading = None
        size = sum(p.numel() * p.element_size() for p in self._lm.adapter_parameters(name))
        self._resident[name] = size
        self.loads += 1

    def _over_budget(self) -> bool:
        if self.max_resident is not None and len(self._resident) > self.max_resident:
            return True
        return self.max_bytes is not None and sum(self._resident.values()) > self.max_bytes

    def _evict(self) -> None:
        if self._lm._merge_state is not None:
            return  # adapters cannot be deleted while merged: evicted after unmerge
        while self._over_budget():
            idle = next((n for n in self._resident if not self._pins[n]), None)
            if idle is None:
                return  # everything resident is in use: over budget until released
            self._drop(idle)
            self.evictions += 1

    def _drop(self, name: str) -> None:
        if name in self._lm._adapters:  # first: if it raises, the records are unchanged
            self._lm.delete_adapter(name)
        del self._resident[name]
        clear_stacks(self._lm.model)  # mixed-batch stacks may hold copies of its factors
