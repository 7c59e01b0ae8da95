"""Replacing modules inside a model: wrapping projections and heads, and undoing it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import ConfigError
from .layers import LoRALinear
from .routing import Router
from .saved_modules import SavedModule


def submodule(root: nn.Module, name: str) -> nn.Module:
    """The module at dotted path ``name`` inside ``root`` (``root`` itself for ``""``).

    Walks the child dictionaries directly: the same modules ``root.get_submodule`` returns, for
    a fraction of its cost (it goes through ``nn.Module.__getattr__`` at every step), which adds
    up when an adapter touches a hundred modules.

    Raises:
        AttributeError: No module at ``name`` (from ``get_submodule``, with its message).
    """
    module: nn.Module | None = root
    for part in name.split(".") if name else ():
        module = module._modules.get(part) if module is not None else None
    if module is None:
        return root.get_submodule(name)  # raises, naming the missing part
    return module


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def wrap_lora(root: nn.Module, name: str, router: Router) -> LoRALinear:
    """The `LoRALinear` at ``name``, wrapping the module there first if needed."""
    module = root.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    layer = LoRALinear(module, router)
    set_submodule(root, name, layer)
    return layer


def wrap_saved(root: nn.Module, name: str, router: Router) -> SavedModule:
    """The `SavedModule` at ``name``, wrapping the module there first if needed."""
    module = root.get_submodule(name)
    if isinstance(module, SavedModule):
        return module
    wrapper = SavedModule(module, router)
    set_submodule(root, name, wrapper)
    return wrapper


def refuse_adapted_heads(root: nn.Module, heads: tuple[str, ...] | list[str], where: str) -> None:
    """Raise if a ``modules_to_save`` module already carries another adapter's LoRA layers.

    A module trained whole cannot also hold a low-rank update (PEFT's rule too): wrapping the
    `LoRALinear` would copy those adapters into the head and break deleting or saving them.

    Raises:
        ConfigError: Naming the module and the adapters on it.
    """
    for head in heads:  # the module itself, or a block holding adapted projections
        adapted = [m for m in submodule(root, head).modules() if isinstance(m, LoRALinear)]
        if adapted:
            raise ConfigError(
                f"{where}: modules_to_save {head!r} carries LoRA adapters "
                f"{sorted({a for m in adapted for a in m.adapters})}; a module trained whole "
                f"cannot also be adapted. "
                f"Delete those adapters first, or leave {head!r} out of modules_to_save"
            )


def wrappers(root: nn.Module) -> list[tuple[str, LoRALinear | SavedModule]]:
    """Every lora_kit wrapper in ``root`` with its dotted path (walks the whole model)."""
    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoRALinear | SavedModule)]


def unwrap(root: nn.Module, name: str, wrapper: LoRALinear | SavedModule) -> None:
    """Put the plain module that ``wrapper`` stands for at ``name``: a layer's base module, a
    saved module's active (or merged) copy, which is its original once it holds no copy."""
    plain = wrapper.base if isinstance(wrapper, LoRALinear) else wrapper.active_module()
    set_submodule(root, name, plain)


def rewrap(root: nn.Module, name: str, wrapper: LoRALinear | SavedModule) -> None:
    """Put ``wrapper`` back at ``name`` if an `unwrap` took it out (undoing one)."""
    if submodule(root, name) is not wrapper:
        set_submodule(root, name, wrapper)


def unwrap_if_empty(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put the original module back at ``name`` once no adapter uses its wrapper ``module``."""
    if isinstance(module, LoRALinear | SavedModule) and not len(entries(module)):
        unwrap(root, name, module)


def entries(wrapper: LoRALinear | SavedModule) -> nn.ModuleDict:
    """A wrapper's per-adapter modules: a layer's adapters, or a saved module's copies."""
    return wrapper.adapters if isinstance(wrapper, LoRALinear) else wrapper.copies


def strip_adapter(root: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every wrapper in ``root``, unwrapping those left empty.

    Takes back a partly injected adapter (adding or loading it failed part-way): wrappers made
    for it alone go, and the others lose its module. It walks the whole model, so it is for that
    failure path only. (Wrappers are never empty otherwise: deleting unwraps them.)
    """
    for module_name, wrapper in wrappers(root):
        held = entries(wrapper)
        if name in held:
            del held[name]
        unwrap_if_empty(root, module_name, wrapper)  # also one wrapped just before it failed


def put_back(
    root: nn.Module,
    name: str,
    removed: Sequence[tuple[str, LoRALinear | SavedModule, nn.Module]],
    order: Sequence[str],
) -> None:
    """Undo a partial removal of adapter ``name``.

    Args:
        root: The model.
        name: The adapter.
        removed: ``(path, wrapper, module)``: each wrapper whose module for ``name`` was taken
            out (and which may have been unwrapped since).
        order: Every adapter name in the order they were added; each wrapper's modules are put
            back in it (a layer lists its adapters in that order).
    """
    rank = {n: i for i, n in enumerate(order)}
    for path, wrapper, module in removed:
        rewrap(root, path, wrapper)
        held = entries(wrapper)
        held[name] = module
        ordered = sorted(held, key=lambda n: rank.get(n, len(rank)))
        if list(held) != ordered:
            items = {n: held[n] for n in ordered}
            held.clear()
            held.update(items)
