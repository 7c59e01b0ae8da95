"""Fast loading (`lora_kit.loading`) and adapter resolution (`lora_kit.resolve`).

The fast path must give exactly what the foundation's strict path gives (`from_pretrained` still
uses it): same modules, same tensors, bit-identical outputs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hotswap_helpers import (
    config_for,
    input_ids,
    logits,
    make_model,
    randomize,
    save_adapters,
)

import lora_kit as lk
from lora_kit.resolve import resolve_adapter
from lora_kit.saved_modules import SavedModule
from tests.conftest import fail_on_call, model_state


def test_fast_load_equals_strict_load(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    for name in ("a", "b", "c"):
        assert lm.load_adapter(root / name) == name
    for name in ("a", "b", "c"):
        reference = lk.LoraModel.from_pretrained(make_model(kind), root / name, name)
        assert lm.adapter_record(name) == reference.adapter_record(name)
        lm.set_adapter(name)
        assert torch.equal(logits(lm, input_ids(2)), logits(reference, input_ids(2)))
        params = lm.adapter_parameters(name)
        assert all(p.requires_grad for p in params)
        assert [p.shape for p in params] == [p.shape for p in reference.adapter_parameters(name)]


def test_load_adapter_takes_files_already_read(saved: tuple[str, Path]) -> None:
    """Files read once (``read_adapter``) load as the directory does, named after it."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    assert lm.load_adapter(lk.read_adapter(root / "a")) == "a"
    reference = lk.LoraModel.from_pretrained(make_model(kind), root / "a", "a")
    assert lm.adapter_record("a") == reference.adapter_record("a")
    lm.set_adapter("a")
    assert torch.equal(logits(lm, input_ids(2)), logits(reference, input_ids(2)))


def test_failed_load_changes_nothing(saved: tuple[str, Path]) -> None:
    kind, root = saved
    other = "bert" if kind == "gpt2" else "gpt2"
    lm = lk.LoraModel(make_model(other))
    lm.load_adapter(save_adapters(other, root.parent / f"other-{kind}", ("b",)) / "b", "b")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(lk.LoraKitError):
        lm.load_adapter(root / "a", "wrong")  # saved for the other architecture
    with pytest.raises(lk.AdapterNameError, match="already exists"):
        lm.load_adapter(root.parent / f"other-{kind}" / "b", "b")
    assert list(lm.adapters) == ["b"]
    after = lm.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_for_another_architecture_is_refused_naming_the_file(
    saved: tuple[str, Path],
) -> None:
    """The error names the directory and says the file is for another base; it used to say
    how to change a LoraConfig ("Pass one of these suffixes or a preset"), which a user loading
    a file has not written."""
    kind, root = saved
    other = "bert" if kind == "gpt2" else "gpt2"
    lm = lk.LoraModel(make_model(other))
    lm.load_adapter(save_adapters(other, root.parent / f"own-{kind}", ("b",)) / "b", "b")
    before = model_state(lm)
    wrong = root / "a"
    message = (
        rf"^{re.escape(str(wrong))}: the adapter's targets .* matched no .*saved for another model"
    )
    attempts = {
        "load": lambda: lm.load_adapter(wrong, "x"),
        "load swappable": lambda: lm.load_adapter(wrong, "x", max_rank=8),
        "swap": lambda: lm.swap_adapter("b", wrong),
        "from_pretrained": lambda: lk.LoraModel.from_pretrained(make_model(other), wrong),
    }
    for what, attempt in attempts.items():
        with pytest.raises(lk.NoTargetsError, match=message):
            attempt()
        assert model_state(lm) == before, what


def test_a_file_adapting_an_embedding_is_refused_naming_the_file(tmp_path: Path) -> None:
    """PEFT adapts embeddings too; lora_kit refuses such a file, and says so about the file
    (the message used to ask to narrow LoraConfig.targets)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out note on Conv1D
        peft_model = get_peft_model(
            make_model("gpt2"), LoraConfig(target_modules=["c_attn", "wte"])
        )
    peft_model.save_pretrained(tmp_path / "emb")
    model = make_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    where = re.escape(str(tmp_path / "emb"))
    message = rf"^{where}: the adapter targets 'transformer.wte' \(type Embedding\).*use PEFT"
    with pytest.raises(lk.UnsupportedModuleError, match=message):
        lk.LoraModel.from_pretrained(model, tmp_path / "emb")
    assert not any(isinstance(m, lk.LoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_adapters_differing_only_in_rank_pattern_load_side_by_side(
    kind: str, tmp_path: Path
) -> None:
    """The expected key -> shape table is cached per model and config: two adapters with the
    same targets and ``r`` but other ``rank_pattern`` ranks need their own tables."""
    fc = "c_fc" if kind == "gpt2" else "intermediate.dense"
    source = lk.LoraModel(make_model(kind))
    for name, pattern in (("plain", {}), ("narrow", {fc: 2})):
        config = dataclasses.replace(config_for(kind, "a"), rank_pattern=pattern)
        source.add_adapter(name, config)
        randomize(source, name, seed=len(name))
        source.save_adapter(tmp_path / name, name)
    lm = lk.LoraModel(make_model(kind))
    for name in ("plain", "narrow"):
        lm.load_adapter(tmp_path / name, name)
    for name in ("plain", "narrow"):
        lm.set_adapter(name)
        source.set_adapter(name)
        assert torch.equal(logits(lm, input_ids(2)), logits(source, input_ids(2)))


def test_resolve_library_by_name(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kind, root = saved
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(root))
    assert resolve_adapter("b") == root / "b"
    lm = lk.LoraModel(make_model(kind))
    assert lm.load_adapter("b") == "b"
    # from_pretrained resolves names the same way (it took only directories before)
    assert lk.LoraModel.from_pretrained(make_model(kind), "c").active_adapter == "default"
    monkeypatch.delenv("LORA_KIT_ADAPTERS")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").symlink_to(root)
    assert resolve_adapter("c") == Path("adapters") / "c"


def test_a_plain_folder_does_not_shadow_a_library_adapter(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`-a b` from a folder that happens to hold a `b/` of other files (data, a run in
    progress) loaded that folder and failed ('adapter_config.json is missing') instead of
    the library's adapter b. An adapter directory there still comes first, as documented."""
    kind, root = saved
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(root))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an adapter")
    assert resolve_adapter("b") == root / "b"
    assert lk.LoraModel(make_model(kind)).load_adapter("b") == "b"
    shutil.copytree(root / "c", tmp_path / "c")
    assert resolve_adapter("c") == Path("c")  # a local adapter directory wins
    (tmp_path / "d").mkdir()  # no library entry either: the folder is reported
    with pytest.raises(lk.AdapterFormatError, match="adapter_config.json is missing"):
        lk.LoraModel(make_model(kind)).load_adapter("d")


@pytest.mark.parametrize("spec", ["./b", "b/../b"])
def test_a_spec_written_as_a_path_never_becomes_a_library_name(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spec: str
) -> None:
    """`./b` means that folder: it used to fall back to the library's adapter b (the same
    adapter under another name) when the folder held no adapter, or did not exist."""
    kind, root = saved
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(root))
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter("b") == root / "b"  # the bare name still finds the library's b
    with pytest.raises(lk.AdapterFormatError, match="does not exist") as missing:
        resolve_adapter(spec)
    assert "adapter library" not in str(missing.value)  # neither the library nor the Hub
    assert "Hugging Face" not in str(missing.value)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an adapter")
    assert resolve_adapter(spec) == Path(spec)
    lm = lk.LoraModel(make_model(kind))
    with pytest.raises(lk.AdapterFormatError, match="adapter_config.json is missing"):
        lm.load_adapter(spec, "b")
    assert lm.adapters == {}
    home = tmp_path / "home"
    shutil.copytree(root / "c", home / "c")
    monkeypatch.setenv("HOME", str(home))
    assert resolve_adapter("~/c") == home / "c"


def _fake_hub_cache(cache: Path, repo: str, adapter: Path) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in adapter.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def _offline_hub_holding_a(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, root: Path) -> None:
    """Offline, with adapter ``a`` cached as Hub repo someone/adapter-a and an empty library."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(tmp_path / "library"))
    _fake_hub_cache(tmp_path / "hub", "someone/adapter-a", root / "a")


def test_resolve_hub_cache_offline(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kind, root = saved
    _offline_hub_holding_a(monkeypatch, tmp_path, root)
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter("someone/adapter-a", "a")
    assert lm.adapter_record("a").source.endswith(os.path.join("snapshots", "0" * 40))
    with pytest.raises(lk.AdapterFormatError) as info:
        lm.load_adapter("someone/missing", "m")
    message = str(info.value)
    for tried in (
        "directory 'someone/missing'",
        "adapter library",
        "Hugging Face cache",
        "HF_HUB_OFFLINE is set",
    ):
        assert tried in message
    assert "m" not in lm.adapters


def test_hub_adapter_without_a_name_is_named_after_the_repo(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It was named after the cache's snapshot folder: the 40-hex commit hash."""
    kind, root = saved
    _offline_hub_holding_a(monkeypatch, tmp_path, root)
    shutil.copytree(root / "b", tmp_path / "library" / "team" / "b")
    lm = lk.LoraModel(make_model(kind))
    assert lm.load_adapter("someone/adapter-a") == "adapter-a"
    assert lm.load_adapter("team/b") == "b"  # a library name, as before
    monkeypatch.chdir(root / "c")
    assert lm.load_adapter(".") == "c"  # an existing directory: its real name, as before
    assert sorted(lm.adapters) == ["adapter-a", "b", "c"]


def test_finite_check_fast_path_and_fallback(saved: tuple[str, Path], tmp_path: Path) -> None:
    """read_adapter checks finiteness with batched norms; huge finite values must still load."""
    from safetensors.torch import load_file, save_file

    _, root = saved
    tensors = load_file(str(root / "a" / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    for value, ok in ((3e38, True), (float("nan"), False), (float("inf"), False)):
        target = tmp_path / f"v{value}"
        target.mkdir()
        (target / "adapter_config.json").write_bytes(
            (root / "a" / "adapter_config.json").read_bytes()
        )
        changed = dict(tensors)
        changed[key] = torch.full_like(tensors[key], value)  # norm overflows for 3e38
        save_file(changed, str(target / "adapter_model.safetensors"))
        if ok:
            assert lk.read_adapter(target).tensors[key].max() == torch.tensor(3e38)
        else:
            with pytest.raises(lk.NonFiniteError, match=key):
                lk.read_adapter(target)


def test_loaded_adapter_saves_and_reloads_exactly(saved: tuple[str, Path], tmp_path: Path) -> None:
    """Loaded tensors are views of one file buffer; saving them again must still work."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "a")
    again = lm.save_adapter(tmp_path / "again", "a")
    first, second = lk.read_adapter(root / "a"), lk.read_adapter(again)
    assert set(first.tensors) == set(second.tensors)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_factors_get_their_own_storage(tmp_path: Path) -> None:
    """Loaded factors never view the file's buffer: a fresh allocation keeps BLAS rounding the
    same as for the saved adapter and never pins the file (e.g. a large saved module)."""
    from tests.conftest import tiny_gpt2

    def factor_storages(path: Path) -> list[tuple[int, int]]:
        lm = lk.LoraModel(tiny_gpt2())
        lm.load_adapter(path, "x")
        factors = [
            t
            for m in lm.model.modules()
            if isinstance(m, lk.LoRALinear)
            for t in (m.adapter("x").lora_A, m.adapter("x").lora_B)
        ]
        return [(t.untyped_storage().nbytes(), t.numel() * t.element_size()) for t in factors]

    for saves in ((), ("wte",)):
        source = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4, modules_to_save=saves))
        path = source.save_adapter(tmp_path / f"saves-{len(saves)}")
        storages = factor_storages(path)
        assert all(nbytes == own for nbytes, own in storages), saves


def test_adapter_from_factors_checks_their_shapes() -> None:
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    adapter = lk.LoraAdapter(5, 3, r=2, scaling=0.5, factors=(a, b))
    assert adapter.lora_A.data_ptr() == a.data_ptr()  # held as given, no copy
    assert adapter.lora_B.data_ptr() == b.data_ptr() and adapter.scaling == 0.5
    with pytest.raises(lk.AdapterMismatchError, match=r"need \[2, 5\] and \[3, 2\]"):
        lk.LoraAdapter(5, 3, r=2, scaling=0.5, factors=(b, a))


def test_default_name_from_a_directory_that_is_not_a_valid_name(
    saved: tuple[str, Path], tmp_path: Path
) -> None:
    kind, root = saved
    shutil.copytree(root / "a", tmp_path / "a.v1")
    lm = lk.LoraModel(make_model(kind))
    with pytest.raises(lk.AdapterNameError, match=r"directory name 'a\.v1'.*pass name="):
        lm.load_adapter(tmp_path / "a.v1")
    assert lm.adapters == {}
    assert lm.load_adapter(tmp_path / "a.v1", "a_v1") == "a_v1"


@pytest.mark.parametrize("first", [True, False], ids=["first", "second"])
def test_load_failing_part_way_leaves_the_model_as_it_was(
    saved: tuple[str, Path], first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything is checked before the model changes, but an interrupt while attaching (the
    third layer's adapter, or BERT's head copy) left the layers wrapped so far holding an
    adapter with no record, and a first adapter's base frozen."""
    kind, root = saved
    faults = {
        "layer": (lk.LoRALinear, "add", 3),
        "head": (SavedModule, "add", 1),  # "a" saves BERT's classifier; GPT-2's saves none
    }
    for fault, (owner, method, call) in faults.items():
        if fault == "head" and kind == "gpt2":
            continue
        lm = lk.LoraModel(make_model(kind))
        if not first:
            lm.load_adapter(root / "b", "b")
        before = model_state(lm)
        broken = fail_on_call(getattr(owner, method), call, KeyboardInterrupt())
        with monkeypatch.context() as patch:
            patch.setattr(owner, method, broken)
            with pytest.raises(KeyboardInterrupt):
                lm.load_adapter(root / "a", "a")
        assert model_state(lm) == before, fault
        lm.load_adapter(root / "a", "a")
        assert list(lm.adapters) == ([] if first else ["b"]) + ["a"]
