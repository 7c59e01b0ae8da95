"""Whole modules trained and saved with an adapter (``modules_to_save``, e.g. a classifier head).

Each adapter that lists the module gets its own full, trainable copy; the original stays frozen
and is used whenever no active adapter has a copy.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .routing import Router
from .rows import run_saved_rows


class SavedModule(nn.Module):
    """A frozen original module plus one trainable copy per adapter that saves it.

    Attributes:
        original: The model's own module, frozen.
        copies: Adapter name -> that adapter's copy.
    """

    def __init__(self, original: nn.Module, router: Router) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.router = router
        # The original's train/eval mode (flags only: its own children keep theirs).
        self.training = self.copies.training = original.training

    def add(self, name: str) -> nn.Module:
        """Create (and return) ``name``'s trainable copy of the original."""
        clone = copy.deepcopy(self.original)  # keeps the original's train/eval modes
        clone.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def active_module(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        copies = self.copies
        for name, _ in self.router.current.weights:
            if name in copies:
                return copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active copy with the caller's arguments, unchanged."""
        rows = self.router.current.rows
        if rows is not None:  # mixed batch: each row through its adapter's copy
            return run_saved_rows(self, rows, args, kwargs)
        return self.active_module()(*args, **kwargs)
