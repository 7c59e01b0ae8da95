"""Differential audit of adapter-config semantics against the real `peft` package.

Seeded configs from ``tests.peft_grammar`` (targets as suffix lists, regexes and ``all-linear``;
``exclude_modules``; ``layers_to_transform`` with and without ``layers_pattern``; rank/alpha
patterns with suffix, partial-path, full-name and regex keys, overlapping in both orders;
rsLoRA; saved heads) go through both directions:

* PEFT builds and saves the adapter, lora_kit loads it;
* lora_kit injects and saves the adapter, PEFT loads it.

Each case checks (a) the same modules carry the adapter on both sides, with the same rank,
scaling and update ``scaling * B @ A`` each, the same whole modules are saved, and (b) fp32
logits and last hidden states agree within 1e-5: the same low-rank update computed by different
kernels differs by float rounding only (about 1e-7 here). ``PEFT_AUDIT_SCALE=8`` runs eight
times the cases (a sweep of 1000 + 700 passed; the default stays under 30 s on 2 cores).
A config lora_kit refuses must be refused with `AdapterFormatError`/`ConfigError` naming an
``adapter_config.json`` field that it deliberately does not implement; a config PEFT refuses is
not generated (the case draws again).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

import lora_kit as lk
from tests.conftest import BERT, GPT2, Arch, logits, randomize
from tests.peft_grammar import lora_kit_options, peft_options

TOL = {"rtol": 1e-5, "atol": 1e-5}
# Random factors' std: at 0.2, with the grammar's largest scaling (alpha 32 over rank 1) the
# update was ~60x the base weights (std 0.02) and attention saturated: fp32 rounding alone then
# moved logits by 2e-5 (lora_kit and PEFT each about that far from a float64 reference). At 0.1
# every adapter still changes the outputs by more than the tolerance.
STD = 0.1
_SCALE = int(os.environ.get("PEFT_AUDIT_SCALE", "1"))
CASES_PER_ARCH = {"peft_to_lora_kit": 60 * _SCALE, "lora_kit_to_peft": 40 * _SCALE}
MAX_DRAWS = 50

# adapter_config.json fields lora_kit refuses on purpose (with AdapterFormatError naming them).
DELIBERATELY_REFUSED: frozenset[str] = frozenset()

Summary = dict[str, tuple[int, float]]  # module -> (rank, scaling)
Deltas = dict[str, torch.Tensor]  # module -> scaling * B @ A, [out, in]

_BASES: dict[str, nn.Module] = {}


def _base(arch: Arch) -> nn.Module:
    """One base per architecture, deep-copied for every use (building is the slow part)."""
    if arch.name not in _BASES:
        _BASES[arch.name] = arch.build(0)
    return copy.deepcopy(_BASES[arch.name])


def _first_accepted(
    arch: Arch, seed: int, draw: Callable[[str, random.Random], dict[str, Any]], build: Any
) -> tuple[dict[str, Any], Any]:
    """The first draw of the case's stream that ``build`` accepts, and what it built."""
    rng = random.Random(f"{arch.name}-{seed}")
    for _ in range(MAX_DRAWS):
        options = draw(arch.name, rng)
        try:
            return options, build(options)
        except (ValueError, TypeError, KeyError, lk.LoraKitError):
            continue  # the library itself rejects this config: not a case
    raise AssertionError(f"no accepted config in {MAX_DRAWS} draws for {arch.name}-{seed}")


def _peft_summary(model: nn.Module) -> tuple[Summary, Deltas, set[str]]:
    adapted, deltas, saved = {}, {}, set()
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            adapted[name] = (module.r["default"], module.scaling["default"])
            delta = module.get_delta_weight("default")  # stored like the base weight
            deltas[name] = delta.T if module.fan_in_fan_out else delta
        elif isinstance(module, ModulesToSaveWrapper) and any(
            True for _ in module.original_module.parameters()
        ):
            saved.add(name)
    return adapted, deltas, saved


def _lora_kit_summary(lm: lk.LoraModel) -> tuple[Summary, Deltas, set[str]]:
    record = lm.adapter_record("default")
    adapted, deltas = {}, {}
    for name in record.modules:
        layer = lm.model.get_submodule(name)
        assert isinstance(layer, lk.LoRALinear)
        adapter = layer.adapter("default")
        adapted[name] = (adapter.r, adapter.scaling)
        deltas[name] = adapter.delta_weight()
    return adapted, deltas, set(record.saved_modules)


def _assert_same_semantics(peft_model: nn.Module, lm: lk.LoraModel, arch: Arch, what: str) -> None:
    """Same modules, ranks, scalings, per-module updates and saved heads; outputs within TOL."""
    (peft_adapted, peft_deltas, peft_saved) = _peft_summary(peft_model)
    (lk_adapted, lk_deltas, lk_saved) = _lora_kit_summary(lm)
    assert set(lk_adapted) == set(peft_adapted), f"{what}: adapted modules differ"
    for name, (rank, scaling) in peft_adapted.items():
        lk_rank, lk_scaling = lk_adapted[name]
        assert lk_rank == rank, f"{what}: rank of {name}"
        assert math.isclose(lk_scaling, scaling, rel_tol=1e-12), f"{what}: scaling of {name}"
        # the same fp32 product of the same factors: equal up to summation order
        torch.testing.assert_close(lk_deltas[name], peft_deltas[name], rtol=1e-6, atol=1e-7)
    assert lk_saved == peft_saved, f"{what}: saved modules differ"
    inputs = arch.inputs()
    got, expected = _outputs(lm, inputs), _outputs(peft_model, inputs)
    with lm.disabled():
        base = _outputs(lm, inputs)
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], **TOL, msg=lambda m: f"{what}: {m}")
    # the outputs check sees the adapter (the per-module deltas above are the precise check: a
    # lone layer-0 key adapter moves the tiny BERT's outputs by ~1e-4 only)
    effect = max((base[k] - expected[k]).abs().max().item() for k in expected)
    assert effect > TOL["atol"], f"{what}: the adapter changes outputs by {effect:.1e} only"


def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits (what the promise is about) and the last hidden states: the tiny BERT's 3-way
    head on one pooled token hardly moves, its hidden states show more."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def _randomize_peft(model: nn.Module, seed: int) -> None:
    """Random LoRA factors (so the adapter changes outputs) and a head that differs from the
    base's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * STD)
            elif ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=gen) * STD)


def _set_fields(path: Path) -> list[str]:
    """The adapter_config.json fields that carry a value (not null/empty/false)."""
    data = json.loads((path / "adapter_config.json").read_text())
    return [k for k, v in data.items() if v not in (None, [], {}, False, "")]


def _save_peft(peft_model: Any, path: Path) -> None:
    """``save_pretrained``, then the pattern keys put back in the model's order.

    PEFT writes adapter_config.json with ``sort_keys=True``, which also sorts ``rank_pattern``
    and ``alpha_pattern``; the first matching key wins, so its own reload can disagree with the
    model that saved the file (another alpha, or ranks that do not fit the tensors). That is
    PEFT's bug, not the format's meaning: the file gets the order the model was built with.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(path))
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    config = peft_model.peft_config["default"]
    data["rank_pattern"], data["alpha_pattern"] = config.rank_pattern, config.alpha_pattern
    config_path.write_text(json.dumps(data))


def _peft_reload(arch: Arch, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_base(arch), str(path)).eval()


def _ids(direction: str) -> list[str]:
    return [f"{a.name}-{s}" for a in (GPT2, BERT) for s in range(CASES_PER_ARCH[direction])]


def _cases(direction: str) -> list[tuple[Arch, int]]:
    return [(a, s) for a in (GPT2, BERT) for s in range(CASES_PER_ARCH[direction])]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Hundreds of forwards of tiny models: with several intra-op threads on a shared 2-core
    machine, each small matmul waited milliseconds for the other thread (3x slower overall)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_model_card(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's README model card is a jinja render per save (a third of a case's time); it holds
    nothing a loader reads."""
    monkeypatch.setattr(PeftModel, "create_or_update_model_card", lambda self, output_dir: None)


def _build_peft(arch: Arch, options: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PeftConfig(**{"init_lora_weights": False, **options})
        return get_peft_model(_base(arch), config).eval()


def check_peft_file(arch: Arch, options: dict[str, Any], peft_model: Any, path: Path) -> None:
    """Save ``peft_model`` (built from ``options``) to ``path``; lora_kit must load the file
    with the same modules, ranks, scalings, heads and logits as PEFT's own loader, or refuse it
    naming a field it deliberately does not implement."""
    _save_peft(peft_model, path)
    reference = _peft_reload(arch, path)  # what the file means to PEFT
    what = f"{arch.name} {options}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = lk.LoraModel.from_pretrained(_base(arch), path)
    except (lk.AdapterFormatError, lk.ConfigError) as exc:
        named = [f for f in _set_fields(path) if re.search(rf"\b{f}\b", str(exc))]
        assert set(named) & DELIBERATELY_REFUSED, f"{what}: refused without cause: {exc}"
        return
    except lk.LoraKitError as exc:
        pytest.fail(f"{what}: PEFT loads this file, lora_kit raised {exc!r}")
    _assert_same_semantics(reference, lm, arch, what)


@pytest.mark.parametrize(("arch", "seed"), _cases("peft_to_lora_kit"), ids=_ids("peft_to_lora_kit"))
def test_peft_adapter_means_the_same_to_lora_kit(arch: Arch, seed: int, tmp_path: Path) -> None:
    options, peft_model = _first_accepted(arch, seed, peft_options, lambda o: _build_peft(arch, o))
    _randomize_peft(peft_model, seed)
    check_peft_file(arch, options, peft_model, tmp_path / "p")


@pytest.mark.parametrize(("arch", "seed"), _cases("lora_kit_to_peft"), ids=_ids("lora_kit_to_peft"))
def test_lora_kit_adapter_means_the_same_to_peft(arch: Arch, seed: int, tmp_path: Path) -> None:
    def build(options: dict[str, Any]) -> lk.LoraModel:
        return lk.inject(_base(arch), lk.LoraConfig(**options))

    options, lm = _first_accepted(arch, seed, lora_kit_options, build)
    randomize(lm, seed=seed, std=STD)
    path = lm.save_adapter(tmp_path / "a")
    peft_model = _peft_reload(arch, path)
    _assert_same_semantics(peft_model, lm, arch, f"{arch.name}-{seed} {options}")


# Configs the audit found lora_kit reading differently from PEFT (each failed before its fix).
FOUND: list[tuple[Arch, dict[str, Any]]] = [
    # a module named in full in target_modules is adapted whatever layers_to_transform says
    (GPT2, {"target_modules": ["transformer.h.0.attn.c_attn", "c_fc"], "layers_to_transform": 1}),
    (
        BERT,
        {
            "target_modules": ["bert.encoder.layer.0.attention.self.query", "value"],
            "layers_to_transform": [1],
        },
    ),
    # layers_pattern names the module list whose index counts: "layers" is none of GPT-2's, so
    # PEFT adapts only the module named in full (lora_kit ignored the pattern)
    (
        GPT2,
        {
            "target_modules": ["transformer.h.0.attn.c_attn", "c_fc"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    (
        BERT,
        {
            "target_modules": ["bert.encoder.layer.0.attention.self.query", "value"],
            "layers_to_transform": [0, 1],
            "layers_pattern": ["h", "blocks"],
        },
    ),
    # targeting lm_head (tied to the embeddings) makes PEFT save its base weight beside the
    # adapter (lm_head.base_layer.weight), which PEFT loads back: unchanged, that is a no-op
    (GPT2, {"target_modules": ["c_attn", "lm_head"]}),
    (GPT2, {"target_modules": r".*\.1\.mlp\.c_fc|lm_head"}),
]


@pytest.mark.parametrize(
    ("arch", "options"), FOUND, ids=[f"{a.name}-{i}" for i, (a, _) in enumerate(FOUND)]
)
def test_found_disagreements_stay_fixed(
    arch: Arch, options: dict[str, Any], tmp_path: Path
) -> None:
    peft_model = _build_peft(arch, {"r": 4, "lora_alpha": 8, **options})
    _randomize_peft(peft_model, 0)
    check_peft_file(arch, options, peft_model, tmp_path / "p")


PEFT_MATCHES_WHOLE_PARTS = Version(peft.__version__) >= Version("0.22")


def test_a_saved_module_named_inside_a_name_part(tmp_path: Path) -> None:
    """modules_to_save=["fier"]: PEFT 0.22 and lora_kit match whole name parts only, so nothing
    is saved; PEFT 0.21 and older also saved the classifier. Against the installed PEFT: with
    0.22 both sides agree as for any case; with an older PEFT its file is refused, saying which
    entry to write. Either way, a file of the old kind is refused with that message, and loads
    once its config names the module."""
    options = {"target_modules": ["query"], "modules_to_save": ["fier"]}
    peft_model = _build_peft(BERT, {"r": 4, "lora_alpha": 8, **options})
    _randomize_peft(peft_model, 0)
    message = r"modules_to_save entry 'fier' ends the module name 'classifier'.*Write 'classifier'"
    if PEFT_MATCHES_WHOLE_PARTS:
        check_peft_file(BERT, options, peft_model, tmp_path / "p")
    else:
        _save_peft(peft_model, tmp_path / "p")
        with pytest.raises(lk.AdapterMismatchError, match=message):
            lk.LoraModel.from_pretrained(_base(BERT), tmp_path / "p")
    # A file of the old kind: the classifier saved under an entry that names it partly.
    old = tmp_path / "old"
    config = lk.LoraConfig(r=4, targets=("query",), modules_to_save=("classifier",))
    lm = lk.inject(_base(BERT), config)
    randomize(lm, seed=0)
    lm.save_adapter(old)
    expected = logits(lm, BERT.inputs())
    config_path = old / "adapter_config.json"
    good = config_path.read_text()
    config_path.write_text(good.replace('"classifier"', '"fier"'))
    with pytest.raises(lk.AdapterMismatchError, match=message):
        lk.LoraModel.from_pretrained(_base(BERT), old)
    config_path.write_text(good)
    loaded = lk.LoraModel.from_pretrained(_base(BERT), old)
    torch.testing.assert_close(logits(loaded, BERT.inputs()), expected, **TOL)


def test_a_changed_base_weight_saved_beside_a_targeted_lm_head_is_refused(tmp_path: Path) -> None:
    """PEFT would write it into the (tied) base weights; lora_kit never changes a base. Loading
    and swapping in place both refuse, and the swap changes nothing."""
    peft_model = _build_peft(GPT2, {"r": 4, "target_modules": ["c_attn", "lm_head"]})
    _randomize_peft(peft_model, 0)
    good, bad = tmp_path / "good", tmp_path / "bad"
    _save_peft(peft_model, good)
    _save_peft(peft_model, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, bad / "adapter_model.safetensors")
    message = r"lm_head\.base_layer\.weight.*differs"
    with pytest.raises(lk.AdapterMismatchError, match=message):
        lk.LoraModel.from_pretrained(_base(GPT2), bad)
    lm = lk.LoraModel.from_pretrained(_base(GPT2), good)
    before = logits(lm, GPT2.inputs())
    with pytest.raises(lk.AdapterMismatchError, match=message):
        lm.swap_adapter("default", bad)
    assert torch.equal(logits(lm, GPT2.inputs()), before)


# adapter_config.json edits lora_kit must refuse naming the field, with whether PEFT refuses too:
# each of these was loaded with another meaning, or refused naming lora_kit's own field name.
REFUSED: dict[str, tuple[Arch, dict[str, Any], str, bool]] = {
    "zero rank in rank_pattern": (BERT, {"rank_pattern": {"query": 0}}, "rank_pattern", True),
    # PEFT expands any casing of all-linear; lora_kit refused only 'all-linear' (NoTargetsError)
    "all-linear in capitals": (BERT, {"target_modules": "ALL-LINEAR"}, "target_modules", False),
    # PEFT: a regex that matches no module; lora_kit read it as its preset (adapted c_attn)
    "preset name": (GPT2, {"target_modules": "gpt2-attn"}, "target_modules", True),
    # PEFT: "layers_to_transform cannot be used when target_modules is a str"; lora_kit applied
    # the layers to the regex
    "regex with layers": (
        GPT2,
        {"target_modules": r".*c_attn", "layers_to_transform": [0]},
        "layers_to_transform",
        True,
    ),
    # PEFT takes these; lora_kit refuses them, but named LoraConfig.alpha / LoraConfig.layers
    "negative alpha": (GPT2, {"lora_alpha": -8}, "lora_alpha", False),
    "negative layer": (BERT, {"layers_to_transform": [0, -1]}, "layers_to_transform", False),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_configs_lora_kit_cannot_read_as_peft_does_are_refused_naming_the_field(
    case: str, tmp_path: Path
) -> None:
    arch, edits, field, peft_refuses = REFUSED[case]
    target = ["c_attn"] if arch is GPT2 else ["query"]
    peft_model = _build_peft(arch, {"r": 4, "target_modules": target})
    path = tmp_path / "p"
    _save_peft(peft_model, path)
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edits}))
    with pytest.raises(lk.AdapterFormatError, match=rf"\b{field}\b"):
        lk.LoraModel.from_pretrained(_base(arch), path)
    try:
        _peft_reload(arch, path)
    except (ValueError, RuntimeError):
        assert peft_refuses
    else:
        assert not peft_refuses


# ---- LoraConfig fields outside the grammar: each value either reads as PEFT reads it, or is
# refused with AdapterFormatError naming the field (each case failed before its fix).

# init_lora_weights values that only choose the factors' start (the base stays as it was, and
# PEFT's forward is plain LoRA): lora_kit refused them as "modifying the base weights".
PLAIN_INITS = ["orthogonal", "nora", "mica", "MiCA", "Gaussian"]  # PEFT reads these two in any case


@pytest.mark.parametrize("init", PLAIN_INITS)
def test_inits_that_leave_the_base_alone_load_as_peft_reads_them(
    arch: Arch, init: str, tmp_path: Path
) -> None:
    target = ["c_attn", "c_fc"] if arch.name == "gpt2" else ["query", "value"]
    options = {"r": 4, "lora_alpha": 8, "target_modules": target, "init_lora_weights": init}
    peft_model = _build_peft(arch, options)
    _randomize_peft(peft_model, 0)
    check_peft_file(arch, options, peft_model, tmp_path / "p")


def test_an_eva_initialised_adapter_loads_as_peft_reads_it(arch: Arch, tmp_path: Path) -> None:
    """A real EVA run (SVD of the layers' inputs over a few batches; the base is untouched)."""
    from peft import EvaConfig, initialize_lora_eva_weights

    target = ["c_attn", "c_fc"] if arch.name == "gpt2" else ["query", "value"]
    options = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": target,
        "init_lora_weights": "eva",
        "eva_config": EvaConfig(rho=1.0),
    }
    peft_model = _build_peft(arch, options)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (4, 10), generator=gen)} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    _randomize_peft(peft_model, 0)
    check_peft_file(arch, options, peft_model, tmp_path / "p")


def _variant_options(arch: Arch) -> dict[str, dict[str, Any]]:
    from peft.tuners.lora.config import KasaConfig, MontecloraConfig, VeloraConfig

    target = ["c_attn", "c_fc"] if arch.name == "gpt2" else ["query", "value"]
    variants: dict[str, dict[str, Any]] = {
        "velora_config": {"velora_config": VeloraConfig()},
        "monteclora_config": {"monteclora_config": MontecloraConfig()},
    }
    if arch.name == "bert":  # PEFT's KaSA takes nn.Linear only
        variants["kasa_config"] = {"kasa_config": KasaConfig()}
    return {k: {"r": 4, "target_modules": target, **v} for k, v in variants.items()}


def test_lora_variants_are_refused_naming_their_field(arch: Arch, tmp_path: Path) -> None:
    """VeLoRA, MonteCLoRA and KaSA files carry extra state (KaSA also a truncated base); they
    were refused as 'saved for a different model' (AdapterMismatchError on their tensors)."""
    for field, options in _variant_options(arch).items():
        path = tmp_path / field
        _save_peft(_build_peft(arch, options), path)
        with pytest.raises(lk.AdapterFormatError, match=rf"{field}=.*Use PEFT"):
            lk.LoraModel.from_pretrained(_base(arch), path)


def test_an_arrow_config_is_refused(arch: Arch, tmp_path: Path) -> None:
    """Arrow routes each token among several adapters: the file loaded as plain LoRA."""
    target = ["c_attn"] if arch.name == "gpt2" else ["query"]
    path = tmp_path / "p"
    _save_peft(_build_peft(arch, {"r": 4, "target_modules": target}), path)
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "arrow_config": {"top_k": 2}}))
    with pytest.raises(lk.AdapterFormatError, match=r"arrow_config="):
        lk.LoraModel.from_pretrained(_base(arch), path)


# GPT-2 ties lm_head to the input embeddings. With ensure_weight_tying PEFT shares the adapter
# or trained copy of lm_head with the embeddings (and rewrites the saved config).
TIED: dict[str, dict[str, Any]] = {
    "saved lm_head": {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
    "targeted lm_head": {"target_modules": ["c_attn", "lm_head"]},
    "lm_head in a regex": {"target_modules": r".*\.c_attn|lm_head"},
}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_adapters_are_refused_naming_ensure_weight_tying(case: str, tmp_path: Path) -> None:
    options = {"r": 4, "ensure_weight_tying": True, **TIED[case]}
    peft_model = _build_peft(GPT2, options)
    _randomize_peft(peft_model, 0)
    _save_peft(peft_model, tmp_path / "p")
    with pytest.raises(lk.AdapterFormatError, match=r"ensure_weight_tying=True with .*lm_head"):
        lk.LoraModel.from_pretrained(_base(GPT2), tmp_path / "p")


def test_ensure_weight_tying_on_a_file_of_untied_adapters_is_refused(tmp_path: Path) -> None:
    """The flag added to a file that targets lm_head makes PEFT tie it to the embeddings on
    loading (other outputs); lora_kit loaded it as before. Swapping it in is refused too."""
    options = {"r": 4, "target_modules": ["c_attn", "lm_head"]}
    peft_model = _build_peft(GPT2, options)
    _randomize_peft(peft_model, 0)
    plain, tied = tmp_path / "plain", tmp_path / "tied"
    _save_peft(peft_model, plain)
    _save_peft(peft_model, tied)
    config_path = tied / "adapter_config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "ensure_weight_tying": True}))
    inputs = GPT2.inputs()
    peft_tied = logits(_peft_reload(GPT2, tied), inputs)
    assert not torch.allclose(peft_tied, logits(_peft_reload(GPT2, plain), inputs), **TOL)
    message = r"ensure_weight_tying=True with 'lm_head' in target_modules"
    with pytest.raises(lk.AdapterFormatError, match=message):
        lk.LoraModel.from_pretrained(_base(GPT2), tied)
    lm = lk.LoraModel.from_pretrained(_base(GPT2), plain)
    before = logits(lm, inputs)
    with pytest.raises(lk.AdapterFormatError, match=message):
        lm.swap_adapter("default", tied)
    assert torch.equal(logits(lm, inputs), before)


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["c_attn", "c_fc"]},  # nothing tied: PEFT ignores the flag
        {"target_modules": ["c_attn"], "modules_to_save": ["wte"]},  # not a name PEFT ties
    ],
    ids=["no-embedding", "saved-wte"],
)
def test_ensure_weight_tying_without_a_tied_layer_loads_as_peft_reads_it(
    options: dict[str, Any], tmp_path: Path
) -> None:
    options = {"r": 4, "lora_alpha": 8, "ensure_weight_tying": True, **options}
    peft_model = _build_peft(GPT2, options)
    _randomize_peft(peft_model, 0)
    check_peft_file(GPT2, options, peft_model, tmp_path / "p")


def _tiny_roberta_mlm(seed: int) -> nn.Module:
    """A 2-layer RoBERTa masked LM: its output layer is ``lm_head.decoder``, tied to the input
    embeddings, inside an ``lm_head`` module that holds untied layers too (``lm_head.dense``)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    return RobertaForMaskedLM(config).eval()


ROBERTA_MLM = Arch("roberta-mlm", _tiny_roberta_mlm, "bert-qv", "bert-all", None)


def test_ensure_weight_tying_with_a_layer_inside_lm_head_loads_as_peft_reads_it(
    tmp_path: Path,
) -> None:
    """``dense`` matches ``lm_head.dense``, a Linear PEFT does not tie (its name's last part is
    not ``lm_head``), so PEFT ignores the flag; lora_kit refused the file as tied because a
    tensor key had an ``lm_head`` part anywhere in it."""
    options = {"r": 4, "lora_alpha": 8, "ensure_weight_tying": True, "target_modules": ["dense"]}
    peft_model = _build_peft(ROBERTA_MLM, options)
    _randomize_peft(peft_model, 0)
    assert any(".lm_head.dense.lora_A." in k for k in peft_model.state_dict())
    check_peft_file(ROBERTA_MLM, options, peft_model, tmp_path / "p")
