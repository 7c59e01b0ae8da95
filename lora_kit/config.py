"""`LoraConfig`: the typed, validated description of one adapter, with JSON round-trip."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, NoReturn, TypeVar, get_args

from .errors import ConfigError

InitMethod = Literal["zero_b", "gaussian"]
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)

# A target specification: a preset name, a list of module-name suffixes, or a regular expression
# that must match a whole module name. ``None`` picks the preset for the model's type.
Targets = str | tuple[str, ...] | None

_V = TypeVar("_V")


class PatternMap(dict[str, _V]):
    """``rank_pattern``/``alpha_pattern`` of a `LoraConfig`: a dict that refuses edits.

    The config is frozen, and configs read from identical ``adapter_config.json`` texts share
    one object, so an edit in place would reach every adapter loaded from that text. Reads,
    iteration, ``json.dumps``, equality with a dict, copying and pickling work as for a dict.
    """

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise ConfigError(
            "LoraConfig's rank_pattern/alpha_pattern are read-only (the config is frozen); "
            "make a new config instead: dataclasses.replace(config, rank_pattern={...})"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self) -> tuple[type[PatternMap[_V]], tuple[dict[str, _V]]]:
        return type(self), (dict(self),)

    def __copy__(self) -> PatternMap[_V]:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> PatternMap[_V]:
        return self


def pattern_matches(pattern: str, module_name: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key applies to ``module_name``.

    Same rule as PEFT: the pattern (a regex) must match a dot-separated suffix of the name,
    so ``"value"`` matches ``"bert.encoder.layer.0.attention.self.value"`` and
    ``"layer.0.*value"`` matches only layer 0.
    """
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def ordered(value: Any) -> Any:
    """``value``, with a dict as its list of items: equal only in the same order."""
    return list(value.items()) if isinstance(value, dict) else value


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    Attributes:
        r: Rank of the update ``B @ A``; a positive integer.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: Dropout probability applied to the adapter's input, in ``[0, 1)``.
        targets: Which modules get an adapter: a preset name (see :func:`lora_kit.presets`),
            a sequence of module-name suffixes (``"c_attn"`` or ``"attn.c_proj"``), or a regular
            expression that must match the whole module name. ``None`` picks the default preset
            for ``model.config.model_type``.
        exclude: Modules never targeted, in the same forms as ``targets`` (no presets).
        layers: Block indices to touch; ``None`` means every block. As in PEFT, a module's
            block is the first all-digit part of its dotted name with at least two parts
            before it (``transformer.h.3.attn.c_attn``: 3); a name with none (a bare
            ``GPT2Model``'s ``h.3.attn.c_attn``) is in no block: set ``layers_pattern`` there.
            As in PEFT, it filters suffix matches only: a module that a ``targets`` list names
            in full is adapted whatever its block.
        layers_pattern: With ``layers``, regexes for the module list whose index is the block
            (PEFT's ``layers_pattern``, e.g. ``"h"`` or ``"layers"``): a module's block is the
            integer right after the first dotted part of its name matching the first pattern
            that matches anywhere; a module no pattern matches is in no block. ``None``: the
            rule given under ``layers``.
        rank_pattern: Per-module rank overrides; keys are regexes matched against a dot-separated
            suffix of the module name (PEFT's rule); the first matching key wins.
        alpha_pattern: Per-module alpha overrides, same matching rule. Like every field, the
            two pattern mappings are read-only (`PatternMap`): configs read from identical
            ``adapter_config.json`` texts share one object.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        init: ``"zero_b"`` (A Kaiming-uniform, B zero: the adapter starts as a no-op) or
            ``"gaussian"`` (A normal with std ``1/r``, B zero).
        modules_to_save: Module-name suffixes of whole modules (e.g. a classification head
            ``"classifier"``) trained and saved with the adapter as full copies. As in PEFT
            (0.22 and later), a module is saved when its name is one or ends with ``"."`` and
            one.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Targets = None
    exclude: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: InitMethod = "zero_b"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so the config stays immutable and hashable-ish.
        for name in ("targets", "exclude", "layers", "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.layers_pattern, str):
            object.__setattr__(self, "layers_pattern", (self.layers_pattern,))
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"LoraConfig.{name} must map module-name patterns to values, got {value!r}"
                )
            object.__setattr__(self, name, PatternMap(value))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not is_finite_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not is_finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"LoraConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        _check_spec("targets", self.targets)
        _check_spec("exclude", self.exclude)
        if self.layers is not None and (
            not isinstance(self.layers, tuple)
            or not self.layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers)
        ):
            raise ConfigError(
                f"LoraConfig.layers must be None or a non-empty list of block indices >= 0, "
                f"got {self.layers!r}"
            )
        self._validate_layers_pattern()
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(
                    f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}"
                )
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not is_finite_number(alpha) or alpha <= 0:
                raise ConfigError(
                    f"LoraConfig.alpha_pattern[{key!r}] must be a positive number, got {alpha!r}"
                )
        if not isinstance(self.modules_to_save, tuple) or any(
            not isinstance(m, str) or not m for m in self.modules_to_save
        ):
            raise ConfigError(
                f"LoraConfig.modules_to_save must be a list of module-name suffixes "
                f"(e.g. ['classifier']), got {self.modules_to_save!r}"
            )

    def _validate_layers_pattern(self) -> None:
        patterns = self.layers_pattern
        if patterns is None:
            return
        if not isinstance(patterns, tuple) or not patterns:
            raise ConfigError(
                f"LoraConfig.layers_pattern must be None, a regex or a non-empty list of regexes "
                f"(e.g. 'layers'), got {patterns!r}"
            )
        if self.layers is None:
            raise ConfigError(
                f"LoraConfig.layers_pattern={patterns!r} only says where block indices are: set "
                f"layers too, or drop layers_pattern"
            )
        for pattern in patterns:
            _check_regex("layers_pattern", pattern)
            if "|" in pattern:
                # PEFT splices the pattern into a larger regex unbracketed, so an alternation
                # there means something else than it says; a list is the portable form.
                raise ConfigError(
                    f"LoraConfig.layers_pattern: {pattern!r} uses '|'; give the alternatives as "
                    f"a list instead, e.g. {pattern.split('|')!r}"
                )

    # ---- per-module values -------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank used for ``module_name`` (``rank_pattern`` first, else ``r``)."""
        for pattern, rank in self.rank_pattern.items():
            if pattern_matches(pattern, module_name):
                return rank
        return self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha used for ``module_name`` (``alpha_pattern`` first, else ``alpha``)."""
        for pattern, alpha in self.alpha_pattern.items():
            if pattern_matches(pattern, module_name):
                return alpha
        return self.alpha

    def scaling_for(self, module_name: str) -> float:
        """The factor the update ``B @ A`` of ``module_name`` is multiplied by."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- JSON round-trip -----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Field by field, counting the order of ``rank_pattern``/``alpha_pattern`` keys (the
        first matching key wins, so two orders of overlapping patterns are different configs)."""
        if not isinstance(other, LoraConfig):
            return NotImplemented
        return all(
            ordered(getattr(self, f.name)) == ordered(getattr(other, f.name)) for f in fields(self)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = asdict(self)
        for name in ("targets", "exclude", "layers", "layers_pattern", "modules_to_save"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        for name in ("rank_pattern", "alpha_pattern"):
            out[name] = dict(out[name])  # the caller's to edit
        return out

    def to_json(self) -> str:
        """The config as a JSON string (fields sorted, stable).

        Only the fields are sorted: ``rank_pattern``/``alpha_pattern`` keep their order, since
        the first matching key wins (sorting them could change a module's rank or alpha).
        """
        return json.dumps(dict(sorted(self.to_dict().items())))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ConfigError: On unknown keys or invalid values.
        """
        reject_unknown_fields(cls, data)
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a non-string pattern key that breaks normalisation
            raise ConfigError(f"invalid LoraConfig data: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        """Parse :meth:`to_json` output.

        Raises:
            ConfigError: If the text is not a JSON object of valid fields.
        """
        return cls.from_dict(json_object(text, cls.__name__))


def is_finite_number(value: object) -> bool:
    """A real int/float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_BOOL_DTYPES = ("bool", "torch.bool")  # NumPy's and torch's boolean dtypes, as text


def as_number(value: object) -> float | None:
    """A weight given by a caller as a float (inf past float's range), or None if it is none.

    Anything ``float()`` reads except text and bools (also NumPy's and boolean tensors): ints,
    floats, NumPy scalars, Decimal, Fraction, one-element tensors. (Stacking and selection
    weights are read this way.)
    """
    if isinstance(value, str | bytes | bool) or str(getattr(value, "dtype", "")) in _BOOL_DTYPES:
        return None  # text is not parsed, a bool is not a weight
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int or Fraction too large for a float
        return math.inf
    except (TypeError, ValueError, RuntimeError):
        return None


def as_numbers(values: object) -> list[float] | None:
    """A list of weights given by a caller, each read by `as_number`; None if ``values`` is not
    an iterable of numbers (text, one number, or any entry that is not a number)."""
    if isinstance(values, str | bytes):
        return None
    try:
        found = [as_number(v) for v in values]  # type: ignore[attr-defined]
    except TypeError:  # not iterable
        return None
    return None if None in found else found  # type: ignore[return-value]


def reject_unknown_fields(cls: Any, data: Mapping[str, Any]) -> None:
    """Raise `ConfigError` naming any key of ``data`` that is not a field of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}; accepted fields are {sorted(known)}"
        )


def json_object(text: str, what: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object, or raise `ConfigError` saying what ``what`` needs."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{what} JSON is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} JSON must be an object, got {type(data).__name__}")
    return data


def _check_regex(field_name: str, pattern: object) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(
            f"LoraConfig.{field_name} keys must be non-empty strings, got {pattern!r}"
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"LoraConfig.{field_name}: {pattern!r} is not a valid regular expression ({exc})"
        ) from exc


def _check_spec(field_name: str, spec: object) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        _check_regex(field_name, spec)
        return
    if (
        not isinstance(spec, tuple)
        or not spec
        or any(not isinstance(s, str) or not s for s in spec)
    ):
        raise ConfigError(
            f"LoraConfig.{field_name} must be a preset name, a regex string, or a non-empty list "
            f"of module-name suffixes, got {spec!r}"
        )
