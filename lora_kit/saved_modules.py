"""Whole modules trained and saved with an adapter (``modules_to_save``, e.g. a classifier head).

Each adapter that lists the module gets its own full, trainable copy; the original stays frozen
and is used whenever no active adapter has a copy.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .routing import Router, Selection
from .saved_rows import run_saved_rows


class SavedModule(nn.Module):
    """A frozen original module plus one trainable copy per adapter that saves it.

    Attributes:
        original: The model's own module, frozen.
        copies: Adapter name -> that adapter's copy.
        merged: While adapters are merged (set by `lora_kit.merge` only), their selection: it
            picks the copy whatever the router says, as the merged projections ignore it too.
    """

    def __init__(self, original: nn.Module, router: Router) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.router = router
        self.merged: Selection | None = None
        # The original's train/eval mode (flags only: its own children keep theirs).
        self.training = self.copies.training = original.training

    def add(self, name: str) -> nn.Module:
        """Create (and return) ``name``'s trainable copy of the original."""
        clone = copy.deepcopy(self.original)  # keeps the original's train/eval modes
        clone.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def active_module(self) -> nn.Module:
        """The copy of the first active (or merged) adapter that has one, else the original."""
        copies = self.copies
        selection = self.router.current if self.merged is None else self.merged
        for name, _ in selection.weights:
            if name in copies:
                return copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active copy with the caller's arguments, unchanged."""
        rows = self.router.current.rows
        if rows is not None and self.merged is None:  # mixed batch: each row, its own copy
            return run_saved_rows(self, rows, args, kwargs)
        return self.active_module()(*args, **kwargs)
