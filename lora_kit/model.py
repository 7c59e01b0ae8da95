"""`LoraModel`: the handle over a transformers model with LoRA adapters injected in place."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .adapter_io import AdapterFiles, checked_state_dict, read_adapter, write_adapter
from .cache import AdapterCache, Registration
from .config import LoraConfig, as_number
from .errors import (
    AdapterNameError,
    ConfigError,
    LoraKitError,
    MergedStateError,
)
from .fingerprint import fingerprint
from .layers import LoraAdapter, LoRALinear
from .loading import cached_targets, check_adapter_dtype, load_files
from .peft_format import head_key, lora_keys, task_type_for, to_peft_dict
from .resolve import resolve_adapter
from .routing import BASE_ONLY, Router, Selection
from .rows import RowPlan, check_row_count, input_rows
from .saved_modules import SavedModule
from .surgery import (
    entries,
    put_back,
    refuse_adapted_heads,
    strip_adapter,
    submodule,
    unwrap_if_empty,
    wrap_lora,
    wrap_saved,
)
from .swap import check_max_rank, live_record, make_swappable, saved_factors, swap_in
from .swap_packed import swap_from_directory
from .swap_plan import forget_plans
from .targets import (
    find_saved_modules,
    find_targets,
    inside_any,
    iter_layers,
    resolve_spec,
    spec_matches,
)

if TYPE_CHECKING:
    from .merge import MergeReport

# The PEFT release whose adapter format lora_kit writes (recorded in adapter_config.json).
PEFT_FORMAT_VERSION = "0.21.2"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")  # \Z: "$" allows a final "\n"

AdapterSelection = str | Mapping[str, float] | None


@dataclass(frozen=True)
class AdapterRecord:
    """Everything lora_kit knows about one adapter of a model.

    Attributes:
        name: The adapter's name in this model.
        config: Its configuration.
        modules: Names of the projections it adapts.
        saved_modules: Names of the whole modules it keeps its own copy of.
        source: The directory it was loaded from, if any.
    """

    name: str
    config: LoraConfig
    modules: tuple[str, ...]
    saved_modules: tuple[str, ...]
    source: str | None = None


@dataclass(frozen=True)
class ParameterSummary:
    """Parameter counts of a `LoraModel` (each tensor counted once)."""

    adapter: int
    saved_modules: int
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable: {self.trainable:,} ({share:.3f}% of {self.total:,}) = "
            f"{self.adapter:,} adapter + {self.saved_modules:,} modules_to_save"
        )


class LoraModel(nn.Module):
    """A transformers model with LoRA adapters injected in place.

    Create one with :func:`inject` or :meth:`from_pretrained`. Calling it calls the wrapped
    model; ``lm.model`` is that model (``generate`` works through :meth:`generate`).

    Adapter selection: :meth:`set_adapter` sets the model-wide default; :meth:`using` and
    :meth:`disabled` set a selection for the calling thread (or asyncio task) only, so
    concurrent requests that each use ``with lm.using(name):`` never see each other's adapter.

    Thread-safety model: per-call selection is safe (``with lm.using(...)`` or
    ``lm(..., adapter_names=[...])``, one adapter per row, for that call only); it lives in a
    ``ContextVar`` and overrides the default for that thread/task alone. ``set_adapter`` changes
    the shared default that every thread without an override sees: set it at start-up, not per
    request. Adding, loading, swapping or deleting adapters while other threads run inference
    is guarded by the adapter cache (``lora_kit.cache``) where it is used, not in general.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.router = Router()
        self._adapters: dict[str, AdapterRecord] = {}
        self._merge_state: Any = None  # set while adapters are merged (see merge.py)
        self.training = model.training  # the handle reports the model's train/eval mode

    # ---- adapters ----------------------------------------------------------------------

    @property
    def adapters(self) -> Mapping[str, LoraConfig]:
        """Adapter name -> config, read-only."""
        return MappingProxyType({n: r.config for n, r in self._adapters.items()})

    def adapter_record(self, name: str) -> AdapterRecord:
        """Everything known about adapter ``name``.

        Raises:
            AdapterNameError: No adapter of that name.
        """
        self._require(name)
        return self._adapters[name]

    @torch.inference_mode(False)  # long-lived tensors (see loading.load_files)
    def add_adapter(
        self, name: str, config: LoraConfig, *, adapter_dtype: torch.dtype = torch.float32
    ) -> None:
        """Inject a new, freshly initialised adapter (not activated; see :meth:`set_adapter`).

        Existing `LoRALinear` wrappers are reused, so adapters may target the same or different
        modules. The base weights are frozen and never modified.

        Raises:
            AdapterNameError: ``name`` is invalid or taken.
            ConfigError: ``config`` is not a `LoraConfig`, ``adapter_dtype`` not a float dtype,
                or a ``modules_to_save`` module carries another adapter's LoRA layers.
            NoTargetsError: Nothing matched (the message lists the modules that exist).
            UnsupportedModuleError: A matched module is not Linear/Conv1D.
        """
        self._refuse_if_merged("add_adapter")
        self._check_new_name(name)
        check_adapter_dtype(adapter_dtype)
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"config must be a lora_kit.LoraConfig, got {type(config).__name__}")
        targets = find_targets(self.model, config)
        heads = find_saved_modules(self.model, config.modules_to_save)
        refuse_adapted_heads(self.model, heads, f"add_adapter({name!r})")
        # Everything is validated: mutate from here on (taken back if interrupted).
        with self._undoing_add(name):
            if not self._adapters:
                self.model.requires_grad_(False)
            for target in targets:
                layer = wrap_lora(self.model, target, self.router)
                adapter = LoraAdapter(
                    layer.in_features,
                    layer.out_features,
                    r=config.rank_for(target),
                    scaling=config.scaling_for(target),
                    dropout=config.dropout,
                    dtype=adapter_dtype,
                    device=layer.weight.device,
                )
                adapter.reset(config.init)
                layer.add(name, adapter)
            for head in heads:
                wrap_saved(self.model, head, self.router).add(name)
            self._adapters[name] = AdapterRecord(name, config, tuple(targets), tuple(heads))

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and free its tensors; modules no adapter uses are unwrapped.

        Raises:
            AdapterNameError: No adapter of that name.
        """
        self._refuse_if_merged("delete_adapter")
        record = self.adapter_record(name)
        wrappers: list[tuple[str, LoRALinear | SavedModule]] = [
            *((m, self._layer(m)) for m in record.modules),
            *((m, self._saved(m)) for m in record.saved_modules),
        ]
        # Every wrapper is found: remove from here on (put back if interrupted part-way).
        removed: list[tuple[str, LoRALinear | SavedModule, nn.Module]] = []
        try:
            for module_name, wrapper in wrappers:
                held = entries(wrapper)
                removed.append((module_name, wrapper, held[name]))
                del held[name]
                unwrap_if_empty(self.model, module_name, wrapper)
        except BaseException:
            put_back(self.model, name, removed, list(self._adapters))
            raise
        del self._adapters[name]
        forget_plans(self, name)  # a remembered swap plan would keep the tensors alive
        default = self.router.default
        if name in default.names:
            self.router.default = Selection(tuple((n, w) for n, w in default.weights if n != name))

    # ---- selection ---------------------------------------------------------------------

    @property
    def active(self) -> Selection:
        """The selection in force for the calling thread."""
        return self.router.current

    @property
    def active_adapter(self) -> str | None:
        """The single active adapter's name (None if none, or if a weighted set is active)."""
        weights = self.router.current.weights
        return weights[0][0] if len(weights) == 1 and weights[0][1] == 1.0 else None

    def set_adapter(self, selection: AdapterSelection) -> None:
        """Set the model-wide active adapter(s): a name, ``{name: weight}``, or None (base only).

        Switching costs the same however many adapters are loaded: one assignment.

        Raises:
            AdapterNameError: An unknown adapter name.
            ConfigError: A weight that is not a finite number (text is not parsed).
        """
        self._refuse_if_merged("set_adapter")
        cache = self._adapter_cache()
        if cache is None:
            self.router.default = self._selection(selection)
            return
        self._precheck(selection)  # bad input: refused before anything loads
        pinned = cache.acquire(_selected_names(selection))  # loads registered adapters
        try:
            self.router.default = self._selection(selection)
        except BaseException as error:
            cache.release_after(pinned, error)
            raise
        cache.replace_default(pinned)

    @contextmanager
    def using(self, selection: AdapterSelection) -> Iterator[None]:
        """Use ``selection`` in this thread/task inside the block; restored on exit or error."""
        self._refuse_if_merged("using")
        self._precheck(selection)
        with (
            self._pinned(_selected_names(selection)),
            self.router.override(self._selection(selection)),
        ):
            yield

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block; restored on exit or error."""
        self._refuse_if_merged("disabled")
        with self.router.override(BASE_ONLY):
            yield

    # ---- parameters --------------------------------------------------------------------

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``: A, B and its ``modules_to_save`` copies."""
        record = self.adapter_record(name)
        params: list[nn.Parameter] = []
        for module_name in record.modules:
            adapter = self._layer(module_name).adapter(name)
            params.extend(adapter.parameters())
        for module_name in record.saved_modules:
            params.extend(self._saved(module_name).copies[name].parameters())
        return params

    def trainable_parameters(self) -> ParameterSummary:
        """Adapter and ``modules_to_save`` parameter counts against the model total."""
        adapter = saved = 0
        for module in self.model.modules():
            if isinstance(module, LoraAdapter):
                adapter += sum(p.numel() for p in module.parameters())
            elif isinstance(module, SavedModule):
                saved += sum(p.numel() for p in module.copies.parameters())
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return ParameterSummary(adapter, saved, trainable, sum(p.numel() for p in params))

    # ---- calling the model ---------------------------------------------------------------

    def forward(
        self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any
    ) -> Any:
        """Call the wrapped transformers model with the same arguments.

        Args:
            adapter_names: One adapter name (or None: base model) per batch row, for this call
                only (a mixed batch); omitted: the active selection.

        Raises:
            AdapterNameError: ``adapter_names`` is not a list with one known name (or None)
                per input row.
        """
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._rows(adapter_names, input_rows(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any
    ) -> Any:
        """``model.generate`` with the active adapter(s), or one adapter per row.

        Args:
            adapter_names: One adapter name (or None) per prompt row, as in :meth:`forward`;
                rows that ``generate`` expands (beams, ``num_return_sequences``) keep their
                prompt's adapter.

        Raises:
            AdapterNameError: As for :meth:`forward`, counting the prompt rows.
        """
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise LoraKitError(f"{type(self.model).__name__} has no generate method")
        if adapter_names is None:
            return generate(*args, **kwargs)
        with self._rows(adapter_names, input_rows(args, kwargs)):
            return generate(*args, **kwargs)

    # ---- files ---------------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike[str], name: str | None = None) -> Path:
        """Save one adapter as a PEFT-format directory (atomic: temp directory, then rename).

        Args:
            path: Directory to write (created; an existing adapter there is replaced).
            name: Which adapter; may be omitted when the model has exactly one.

        Returns:
            The directory written.

        Raises:
            AdapterNameError: Unknown or ambiguous name.
            NonFiniteError: The weights contain NaN/inf (nothing is written).
        """
        record = live_record(self, self.adapter_record(self._sole_name(name)))
        tensors: dict[str, Tensor] = {}
        for module_name in record.modules:
            adapter = self._layer(module_name).adapter(record.name)
            key_a, key_b = lora_keys(module_name)
            tensors[key_a], tensors[key_b] = saved_factors(adapter)
        for module_name in record.saved_modules:
            head = self._saved(module_name).copies[record.name]
            for key, value in head.state_dict().items():
                tensors[head_key(module_name, key)] = value
        layers = {m: self._layer(m) for m in record.modules}
        peft_config = to_peft_dict(
            record.config,
            target_modules=self._peft_targets(record),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
            task_type=self._peft_task_type(record),
            base_model_name_or_path=getattr(
                getattr(self.model, "config", None), "_name_or_path", None
            )
            or None,
            peft_version=PEFT_FORMAT_VERSION,
        )
        metadata = {
            "config": record.config.to_json(),
            "base_fingerprint": fingerprint(self.model, layers),
            "adapter_name": record.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return write_adapter(path, peft_config, tensors, metadata)

    def load_adapter(
        self,
        path: str | os.PathLike[str] | AdapterFiles,
        name: str | None = None,
        *,
        check_base: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
        max_rank: int | None = None,
    ) -> str:
        """Load an adapter directory (lora_kit's or PEFT's) under ``name``; not activated.

        Loading is strict and atomic: every key, shape and value, and the base fingerprint when
        the file has one, is checked before the model is touched.

        Args:
            path: The adapter directory, a name in the adapter library (``$LORA_KIT_ADAPTERS``
                or ``./adapters``) or a Hub repo id (see `lora_kit.resolve`); or its files
                already read (`lora_kit.read_adapter`), which are not read again.
            name: Name to give it; defaults to the directory's name (for a library name or a
                Hub id, its last part: ``"someone/gpt2-lora"`` -> ``"gpt2-lora"``).
            check_base: Verify the base fingerprint recorded by lora_kit (if present).
            adapter_dtype: dtype of the adapter tensors in memory.
            max_rank: Store it zero-padded to this rank with a tensor scaling, so that
                :meth:`swap_adapter` can later replace it in place without recompiling.

        Returns:
            The name it was loaded under.

        Raises:
            AdapterFormatError: Unreadable, truncated, non-finite or unsupported files.
            AdapterMismatchError: Keys, shapes or base fingerprint do not fit this model.
            AdapterNameError: The name is taken.
        """
        self._refuse_if_merged("load_adapter")
        files = path if isinstance(path, AdapterFiles) else read_adapter(resolve_adapter(path))
        if name is None:  # a directory's own name; a library name's or Hub id's last part
            source = files.path if isinstance(path, AdapterFiles) else Path(os.fspath(path))
            name = (files.path.resolve() if source.exists() else source).name
            if not _NAME_RE.match(name):
                raise AdapterNameError(
                    f"the adapter's directory name {name!r} is not a valid adapter name (use "
                    f"letters, digits, '_' and '-'); pass name=... to load_adapter"
                )
        if max_rank is None:
            load_files(self, files, name, check_base=check_base, adapter_dtype=adapter_dtype)
            return name
        where = str(files.path)
        check_max_rank(_ranks(self.model, files.config, where), max_rank, where)
        self._check_new_name(name)  # (the undo below takes away whatever is named ``name``)
        with self._undoing_add(name):  # loaded, then padded: both or neither
            load_files(self, files, name, check_base=check_base, adapter_dtype=adapter_dtype)
            make_swappable(self, name, max_rank)
        return name

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike[str],
        name: str = "default",
        *,
        check_base: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> LoraModel:
        """Inject and load a saved adapter in one call, and activate it.

        Args:
            model: The base transformers model (not yet injected).
            path: The adapter directory, a name in the adapter library or a Hub repo id, as
                for :meth:`load_adapter`.
            name: Name to give the adapter.
            check_base: Verify the base fingerprint recorded by lora_kit (if present).
            adapter_dtype: dtype of the adapter tensors in memory.

        Raises:
            The errors of :meth:`load_adapter`; ``model`` is unchanged when one is raised.
        """
        _refuse_injected(model)
        files = read_adapter(resolve_adapter(path))
        lm = cls(model)
        load_files(lm, files, name, check_base=check_base, adapter_dtype=adapter_dtype)
        lm.set_adapter(name)
        return lm

    # ---- internals -------------------------------------------------------------------------

    @contextmanager
    def _undoing_add(self, name: str) -> Iterator[None]:
        """Take back adapter ``name``, new to this model, if the block adding it raises.

        Its modules leave every layer (layers wrapped for it alone are unwrapped), its record
        and swap plan go, and when it was the first adapter the base's ``requires_grad`` flags,
        which adding it cleared, are put back. Enter it only once ``name`` is known to be free.
        """
        flags = None if self._adapters else [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            yield
        except BaseException:
            strip_adapter(self.model, name)
            self._adapters.pop(name, None)
            forget_plans(self, name)
            for param, flag in flags or ():
                param.requires_grad_(flag)
            raise

    def _peft_task_type(self, record: AdapterRecord) -> str | None:
        # PEFT's SEQ_CLS/TOKEN_CLS loaders insist on finding the head's weights in the file;
        # without a saved head, the generic task-less form loads the same adapter everywhere.
        # Those loaders also add every "classifier"/"score" module to modules_to_save, so the
        # head must be among the adapter's saved modules (not just some other module).
        task = task_type_for(type(self.model).__name__)
        if task in ("SEQ_CLS", "TOKEN_CLS"):
            peft_heads = find_saved_modules(self.model, ("classifier", "score"))
            if not record.saved_modules or not set(peft_heads) <= set(record.saved_modules):
                return None
        return task

    def _peft_targets(self, record: AdapterRecord) -> str | tuple[str, ...]:
        # With layers/exclude, the exact module names are the one form every PEFT release
        # reads the same way; otherwise keep the user's suffix list or regex.
        if record.config.layers is not None or record.config.exclude is not None:
            return record.modules
        spec = resolve_spec(record.config, self.model)
        if isinstance(spec, str) and _regex_matches_others(self.model, spec, record):
            # PEFT wraps every module a regex matches and raises on a container or a dropout
            # that lora_kit passes over: name exactly the modules that carry the adapter.
            return record.modules
        return spec

    def _selection(self, selection: AdapterSelection, *, registered: bool = False) -> Selection:
        """``selection`` checked and as a `Selection`; with ``registered``, names registered
        with the adapter cache (not necessarily loaded yet) count as known."""
        if selection is None:
            return BASE_ONLY
        if isinstance(selection, str):
            self._require(selection, registered=registered)
            return Selection(((selection, 1.0),))
        if isinstance(selection, Mapping):
            pairs = []
            for adapter_name, weight in selection.items():
                self._require(adapter_name, registered=registered)
                pairs.append((adapter_name, _weight(adapter_name, weight)))
            return Selection(tuple(pairs))
        raise AdapterNameError(
            f"select adapters with a name, a {{name: weight}} mapping, or None; "
            f"got {type(selection).__name__}"
        )

    def _precheck(self, selection: AdapterSelection) -> None:
        """Refuse a bad selection before the adapter cache loads (and evicts) anything for it."""
        if self._adapter_cache() is not None:
            self._selection(selection, registered=True)

    def _require(self, name: str, *, registered: bool = False) -> None:
        if name in self._adapters:
            return
        cache = self._adapter_cache() if registered else None
        if cache is None or not cache.is_registered(name):
            raise AdapterNameError(
                f"no adapter named {name!r}; loaded adapters: {sorted(self._adapters) or 'none'}"
            )

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise AdapterNameError(
                f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' "
                f"(no dots or spaces)"
            )
        if name in self._adapters:
            raise AdapterNameError(
                f"an adapter named {name!r} already exists; pick another name or "
                f"delete_adapter({name!r}) first"
            )
        cache = self._adapter_cache()
        if cache is not None and cache.refuses_name(name):
            raise AdapterNameError(
                f"adapter {name!r} is registered with the adapter cache, which loads it when "
                f"it is selected; select it instead, or unregister it first"
            )

    def _sole_name(self, name: str | None) -> str:
        if name is not None:
            return name
        if len(self._adapters) == 1:
            return next(iter(self._adapters))
        raise AdapterNameError(
            f"this model has {len(self._adapters)} adapters ({sorted(self._adapters)}): "
            f"say which one with name="
        )

    def _layer(self, module_name: str) -> LoRALinear:
        layer = submodule(self.model, module_name)
        if not isinstance(layer, LoRALinear):
            raise LoraKitError(f"{module_name!r} is not a LoRA layer (was the model edited?)")
        return layer

    def _saved(self, module_name: str) -> SavedModule:
        wrapper = submodule(self.model, module_name)
        if not isinstance(wrapper, SavedModule):
            raise LoraKitError(f"{module_name!r} is not a saved module (was the model edited?)")
        return wrapper

    # ---- merging (lora_kit.merge) ------------------------------------------------------------

    @property
    def merged(self) -> Selection | None:
        """The adapters currently merged into the base weights (None when unmerged)."""
        state = self._merge_state
        return None if state is None else Selection(state.report.weights)

    def merge(self, selection: str | Mapping[str, float]) -> MergeReport:
        """Fold one adapter, or a weighted set (negative weights subtract), into the base weights.

        The update is computed in fp32 and rounded once into the base dtype. While merged,
        forward runs the plain base layers (no adapter overhead); switching, loading, deleting
        adapters and training are refused until :meth:`unmerge`.

        Memory: one copy of each merged projection's original weight is kept for an exact
        :meth:`unmerge` (``report.kept_bytes``).

        An adapter registered with the adapter cache is loaded first, as for
        :meth:`set_adapter`.

        Returns:
            The per-module largest change, the heads in use and the memory kept.

        Merging and :meth:`unmerge` are all or nothing: interrupted part-way, every layer is
        put back as it was.

        Raises:
            MergedStateError: Something is merged already.
            AdapterNameError, ConfigError: Unknown adapter or non-finite weight.
            NonFiniteError: The result would hold NaN/inf; the model is unchanged.
        """
        from .merge import merge

        self._refuse_if_merged("merge")
        self._precheck(selection)
        with self._pinned(_selected_names(selection)):  # registered adapters are loaded first
            return merge(self, selection)  # (kept resident while merged: eviction waits)

    def unmerge(self) -> MergeReport | None:
        """Restore the base weights bit-exactly and the previous adapter selection.

        Returns:
            The report of the merge undone, or None if nothing was merged.
        """
        from .merge import unmerge

        return unmerge(self)

    def merge_and_unload(self, selection: AdapterSelection = None) -> nn.Module:
        """Merge for good and return the plain transformers model, with no lora_kit modules.

        An adapter registered with the adapter cache is loaded first, as for :meth:`merge`.

        Args:
            selection: What to merge; defaults to the current merge, else the active adapters.
                A ``modules_to_save`` head is replaced by the copy of the first merged adapter
                that has one.

        Returns:
            ``self.model``, unwrapped; this handle has no adapters afterwards, and the adapter
            cache forgets its registrations (they were for the unmerged base).

        Interrupted part-way, it leaves the handle as it was (merged only if it was before).
        """
        from .merge import merge_and_unload

        names = _selected_names(selection) if self._merge_state is None else ()
        if names:
            self._precheck(selection)
        with self._pinned(names):  # registered adapters are loaded first
            return merge_and_unload(self, selection)

    def _refuse_if_merged(self, operation: str) -> None:
        if self._merge_state is not None:
            names = [n for n, _ in self._merge_state.report.weights]
            raise MergedStateError(
                f"cannot {operation} while adapters {names} are merged into the base weights: "
                f"call lm.unmerge() first"
            )

    # ---- hot-swapping (issue 6) -------------------------------------------------------------

    def make_swappable(self, name: str, max_rank: int) -> None:
        """Re-store adapter ``name`` zero-padded to ``max_rank`` for :meth:`swap_adapter`.

        Outputs are unchanged (exactly: the padding is zeros). Call it before compiling. A
        registered adapter (:meth:`register_adapter`) is reloaded at ``max_rank`` after an
        eviction, as if registered with it.

        Raises:
            AdapterNameError: Unknown adapter.
            AdapterMismatchError: One of its ranks exceeds ``max_rank``.
        """
        make_swappable(self, name, max_rank)
        if self.cache.is_registered(name):
            self.cache.set_max_rank(name, max_rank)

    def swap_adapter(
        self,
        name: str,
        source: str | os.PathLike[str] | AdapterFiles | Mapping[str, Tensor],
        *,
        check_base: bool = True,
    ) -> None:
        """Replace adapter ``name``'s weights in place with another adapter's (compile-safe).

        The tensors keep their identity and ``data_ptr``; with an adapter loaded with
        ``max_rank=`` (or :meth:`make_swappable`), any rank up to it and any alpha can be swapped
        in without a ``torch.compile`` recompile. The new adapter may adapt a subset of the
        modules (the others are zeroed). Everything is checked before anything changes.

        The copies themselves are not undone (that would mean copying every tensor twice on
        each swap): a failure inside them (a device error, an interrupt) leaves ``name`` partly
        overwritten, under its previous record. Swapping again (the same source or another)
        rewrites every tensor, rank and scaling of it and makes it whole.

        Args:
            name: The resident adapter to overwrite.
            source: An adapter directory / library name / Hub id, parsed `AdapterFiles`, or a
                PEFT-keyed state dict (keeps ``name``'s config, ranks and scaling).
            check_base: Verify the base fingerprint recorded in the files (if present).

        A registered adapter (:meth:`register_adapter`) is reloaded after an eviction from the
        source it was registered with (which sets its modules) with ``source`` then swapped in,
        so ``source`` must be files, not a state dict. One the cache does not hold now (evicted,
        or never selected) is loaded first, and pinned during the swap.

        Raises:
            AdapterNameError: Unknown adapter, or a state dict for a registered adapter.
            AdapterMismatchError: The new weights do not fit (modules, ranks, shapes, base).
            AdapterFormatError: A state dict holding non-tensors, non-float or NaN/inf tensors
                (`NonFiniteError`), as for a file.
            MergedStateError: Adapters are merged into the base weights (unmerge first).
        """
        self._refuse_if_merged("swap_adapter")  # the merged delta would no longer match
        cache = self._adapter_cache()
        registered = cache is not None and cache.is_registered(name)
        if isinstance(source, Mapping) and registered:
            raise AdapterNameError(
                f"adapter {name!r} is registered with the adapter cache, which reloads it "
                f"from its source after an eviction, and a state dict cannot be reloaded: "
                f"save it as an adapter directory and swap from that"
            )
        # A registered adapter is loaded first (evicted or never used yet) and pinned, so the
        # cache cannot evict it part-way.
        with self._pinned((name,) if registered else ()):
            self._swap(name, source, check_base=check_base, registered=registered)

    def _swap(
        self,
        name: str,
        source: str | os.PathLike[str] | AdapterFiles | Mapping[str, Tensor],
        *,
        check_base: bool,
        registered: bool,
    ) -> None:
        record = self.adapter_record(name)
        if isinstance(source, AdapterFiles | Mapping):
            files = (
                source
                if isinstance(source, AdapterFiles)
                else AdapterFiles(
                    Path(where := f"<state dict for {name}>"),
                    record.config,
                    {},
                    checked_state_dict(source, where),
                )
            )
            swap_in(self, name, files, check_base=check_base)
            config, path = files.config, files.path
            origin = str(path)
        else:  # a directory: one copy when it fits a packed adapter (see swap_packed)
            origin, path = os.fspath(source), resolve_adapter(source)
            config = swap_from_directory(self, name, path, check_base=check_base)
        self._adapters[name] = replace(record, config=config, source=str(path))
        if registered:  # reload what it holds now, not what it held
            self.cache.set_swapped(name, origin)

    @property
    def cache(self) -> AdapterCache:
        """The adapter cache (registered adapters, residency budget); created on first use."""
        cache = self._adapter_cache()
        if cache is None:
            cache = AdapterCache(self)
            self.__dict__["_cache"] = cache
        return cache

    def set_cache_budget(
        self, max_resident: int | None = None, max_bytes: int | None = None
    ) -> None:
        """Bound the registered adapters held in memory (LRU eviction, transparent reload).

        Args:
            max_resident: Most registered adapters resident at once (None: no limit).
            max_bytes: Most bytes of their tensors resident at once (None: no limit).

        Raises:
            ConfigError: A limit that is not a positive integer.
        """
        self.cache.set_budget(max_resident, max_bytes)

    def register_adapter(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        max_rank: int | None = None,
        check_base: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Register an adapter to load on first use; costs only this metadata until then.

        Selecting it (``set_adapter``, ``using``, ``adapter_names``) loads it from ``source``;
        under a budget (:meth:`set_cache_budget`) idle ones are evicted least-recently-used
        first and reloaded from ``source`` when selected again.

        Args:
            name: The adapter's name.
            source: Directory, library name or Hub repo id (resolved when loaded).
            max_rank: Load it swappable at this padded rank (see :meth:`swap_adapter`).
            check_base: Verify the base fingerprint on each load.
            adapter_dtype: dtype of the loaded tensors.

        Raises:
            AdapterNameError: The name is invalid or taken.
            ConfigError: ``adapter_dtype`` is not a floating dtype adapters can use.
        """
        check_adapter_dtype(adapter_dtype)
        self.cache.register(
            Registration(name, os.fspath(source), max_rank, check_base, adapter_dtype)
        )

    def _adapter_cache(self) -> AdapterCache | None:
        cache = self.__dict__.get("_cache")
        return cache if isinstance(cache, AdapterCache) else None

    @contextmanager
    def _pinned(self, names: Iterable[str]) -> Iterator[None]:
        cache = self._adapter_cache()
        if cache is None:
            yield
            return
        pinned = cache.acquire(names)
        try:
            yield
        except BaseException as error:  # the call's error, not a failed eviction's, propagates
            cache.release_after(pinned, error)
            raise
        cache.release(pinned)

    @contextmanager
    def _rows(self, adapter_names: Sequence[str | None], rows: int | None) -> Iterator[None]:
        self._refuse_if_merged("adapter_names")  # merged deltas would apply to every row
        # Unknown names and a row count that does not fit: before any registered adapter loads.
        selection = self._row_selection(adapter_names)
        check_row_count(adapter_names, rows)
        with self._pinned(n for n in adapter_names if n is not None):
            if self._adapter_cache() is not None:  # registered ones are loaded now
                for adapter_name in adapter_names:  # (unless unregistered meanwhile)
                    if adapter_name is not None:
                        self._require(adapter_name)
            with self.router.override(selection):
                yield

    def _row_selection(self, adapter_names: Sequence[str | None]) -> Selection:
        """One adapter name (loaded or registered) or None per row, as a `Selection`."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise AdapterNameError(
                f"adapter_names must be a list with one adapter name (or None) per batch row, "
                f"got {type(adapter_names).__name__}"
            )
        for adapter_name in adapter_names:
            if adapter_name is not None and not isinstance(adapter_name, str):
                raise AdapterNameError(
                    f"adapter_names entries must be adapter names (str) or None, "
                    f"got {adapter_name!r}"
                )
            if adapter_name is not None:
                self._require(adapter_name, registered=True)
        return Selection(rows=RowPlan(adapter_names))


def inject(
    model: nn.Module,
    config: LoraConfig | None = None,
    name: str = "default",
    *,
    adapter_dtype: torch.dtype = torch.float32,
) -> LoraModel:
    """Inject a fresh LoRA adapter into ``model`` in place and activate it.

    Args:
        model: A transformers model (GPT-2 and BERT families have presets; any model with
            ``nn.Linear``/``Conv1D`` projections works with explicit targets).
        config: The adapter's config; defaults to ``LoraConfig()`` (r=8, alpha=16, the model
            type's default preset).
        name: The adapter's name.
        adapter_dtype: dtype of the adapter tensors (fp32 by default, also beside a bf16 base).

    Returns:
        The `LoraModel` handle; ``model`` itself is modified in place.

    Raises:
        LoraKitError: The model already has lora_kit layers (use ``add_adapter`` on its handle).
        NoTargetsError, UnsupportedModuleError, ConfigError: Nothing is changed when raised.
    """
    _refuse_injected(model)
    lm = LoraModel(model)
    lm.add_adapter(
        name, config if config is not None else LoraConfig(), adapter_dtype=adapter_dtype
    )
    lm.set_adapter(name)
    return lm


def _refuse_injected(model: nn.Module) -> None:
    if any(isinstance(m, LoRALinear | SavedModule) for m in model.modules()):
        raise LoraKitError(
            f"this {type(model).__name__} already has lora_kit layers; add adapters through "
            f"the LoraModel handle that injected them (lm.add_adapter / lm.load_adapter)"
        )


def _regex_matches_others(model: nn.Module, spec: str, record: AdapterRecord) -> bool:
    """Whether PEFT, reading ``spec`` as ``target_modules``, would match modules other than
    ``record.modules`` (it skips only modules inside ``modules_to_save``)."""
    adapted, saved = set(record.modules), record.config.modules_to_save
    return any(
        name and name not in adapted and spec_matches(spec, name) and not inside_any(name, saved)
        for name, _ in iter_layers(model)
    )


def _ranks(model: nn.Module, config: LoraConfig, source: str) -> dict[str, int]:
    """Module name -> the rank ``config`` (read from ``source``) gives it in ``model``."""
    targets = cached_targets(model, config, source)
    return {target: config.rank_for(target) for target in targets}


def _weight(adapter_name: str, weight: object) -> float:
    """A selection's weight for ``adapter_name`` as a finite float (read by `as_number`).

    Raises:
        ConfigError: Not a real number (text and bools are refused, not parsed), or NaN/inf.
    """
    value = as_number(weight)
    if value is None:
        raise ConfigError(f"weight of adapter {adapter_name!r} must be a number, got {weight!r}")
    if not math.isfinite(value):
        raise ConfigError(f"weight of adapter {adapter_name!r} must be finite, got {weight!r}")
    return value


def _selected_names(selection: AdapterSelection) -> tuple[str, ...]:
    """Adapter names a selection mentions (invalid selections are reported by the caller)."""
    if isinstance(selection, str):
        return (selection,)
    if isinstance(selection, Mapping):
        return tuple(n for n in selection if isinstance(n, str))
    return ()
