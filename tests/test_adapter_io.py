"""Adapter files: exact round-trip, strict and atomic loading, atomic saving."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_kit as lk
from lora_kit.adapter_io import CONFIG_NAME, WEIGHTS_NAME, decode_metadata, read_adapter
from tests.conftest import GPT2, Arch, logits, randomize, state_copy


def _saved(arch: Arch, tmp_path: Path, **overrides: object) -> tuple[lk.LoraModel, Path]:
    config = lk.LoraConfig(
        r=4,
        targets=arch.all_preset,
        rank_pattern={"c_fc|query": 2},
        modules_to_save=(arch.head,) if arch.head else (),
        **overrides,
    )
    lm = lk.inject(arch.build(0), config)
    randomize(lm)
    return lm, lm.save_adapter(tmp_path / "adapter")


def test_save_load_into_fresh_base_is_bit_identical(arch: Arch, tmp_path: Path) -> None:
    lm, path = _saved(arch, tmp_path)
    inputs = arch.inputs()
    fresh = lk.LoraModel.from_pretrained(arch.build(0), path)
    assert torch.equal(logits(fresh, inputs), logits(lm, inputs))
    files = read_adapter(path)
    assert files.origin == "lora_kit"
    assert files.metadata["base_fingerprint"]["model_type"] == arch.name
    assert lk.LoraConfig.from_dict(files.metadata["config"]) == lm.adapters["default"]


def test_load_adapter_defaults_to_directory_name(arch: Arch, tmp_path: Path) -> None:
    _, path = _saved(arch, tmp_path)
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=2))
    assert lm.load_adapter(path) == "adapter"
    assert lm.active_adapter == "default"  # loading does not activate (as in PEFT)


def _assert_untouched(lm: lk.LoraModel, before: dict[str, torch.Tensor]) -> None:
    assert set(lm.adapters) == {"default"}
    after = state_copy(lm)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _edit_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads((path / CONFIG_NAME).read_text())
        data[key] = value
        (path / CONFIG_NAME).write_text(json.dumps(data))

    return edit


def _edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        tensors = load_file(path / WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, path / WEIGHTS_NAME)

    return edit


def _edit_fingerprint(value: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as handle:
            metadata = dict(handle.metadata())
        metadata["lora_kit.base_fingerprint"] = value
        save_file(load_file(path / WEIGHTS_NAME), path / WEIGHTS_NAME, metadata=metadata)

    return edit


def _truncate(path: Path) -> None:
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _first_a(t: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(t) if k.endswith("lora_A.weight"))


BAD_FILES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "missing config": (
        lambda p: (p / CONFIG_NAME).unlink(),
        lk.AdapterFormatError,
        "adapter_config.json is missing",
    ),
    "invalid json": (
        lambda p: (p / CONFIG_NAME).write_text("{oops"),
        lk.AdapterFormatError,
        "not valid JSON",
    ),
    "deeply nested json": (
        lambda p: (p / CONFIG_NAME).write_text('{"r": ' + "[" * 200_000),
        lk.AdapterFormatError,
        "not valid JSON",
    ),
    "over-long integer in json": (  # found by fuzzing: was a bare ValueError
        lambda p: (p / CONFIG_NAME).write_text('{"r": ' + "9" * 5000 + "}"),
        lk.AdapterFormatError,
        "not valid JSON",
    ),
    "float layers_to_transform": (  # found by fuzzing: was a bare TypeError
        _edit_config("layers_to_transform", 1.5),
        lk.AdapterFormatError,
        "invalid layers_to_transform",
    ),
    "truncated": (_truncate, lk.AdapterFormatError, "truncated or corrupt"),
    "dora": (_edit_config("use_dora", True), lk.AdapterFormatError, "use_dora"),
    "pissa": (_edit_config("init_lora_weights", "pissa"), lk.AdapterFormatError, "base weights"),
    "nan": (_edit_tensors(lambda t: t[_first_a(t)].fill_(float("nan"))), lk.NonFiniteError, "NaN"),
    "missing key": (
        _edit_tensors(lambda t: t.pop(_first_a(t))),
        lk.AdapterMismatchError,
        "missing tensor .*lora_A",
    ),
    "renamed key": (
        _edit_tensors(lambda t: t.update({"base_model.model.x.lora_A.weight": t.pop(_first_a(t))})),
        lk.AdapterMismatchError,
        "missing tensor",
    ),
    "extra key": (
        _edit_tensors(
            lambda t: t.update({"base_model.model.zzz.lora_A.weight": torch.zeros(2, 2)})
        ),
        lk.AdapterMismatchError,
        "unexpected tensor 'base_model.model.zzz",
    ),
    "wrong shape": (
        _edit_tensors(lambda t: t.update({_first_a(t): torch.zeros(4, 31)})),
        lk.AdapterMismatchError,
        r"shape \[4, 31\].*needs \[\d+, 32\]",
    ),
    "wrong rank in config": (_edit_config("rank_pattern", {}), lk.AdapterMismatchError, "shape"),
    # A malformed recorded fingerprint raised TypeError, or (not an object) skipped the check.
    "fingerprint modules a list": (
        _edit_fingerprint('{"model_type": "gpt2", "modules": [1, 2], "weights_sha256": "x"}'),
        lk.AdapterFormatError,
        "base_fingerprint is malformed",
    ),
    "fingerprint not an object": (
        _edit_fingerprint('"gpt2"'),
        lk.AdapterFormatError,
        "base_fingerprint is malformed",
    ),
    "rank_pattern not a mapping": (
        _edit_config("rank_pattern", ["c_fc"]),
        lk.AdapterFormatError,
        "rank_pattern",
    ),
    "modules_to_save a string": (
        _edit_config("modules_to_save", "classifier"),
        lk.AdapterFormatError,
        "modules_to_save",
    ),
    "layers_pattern without layers_to_transform": (  # PEFT refuses it too
        _edit_config("layers_pattern", "h"),
        lk.AdapterFormatError,
        "layers_pattern='h' without layers_to_transform",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_and_change_nothing(arch: Arch, tmp_path: Path, case: str) -> None:
    _, path = _saved(arch, tmp_path)
    corrupt, error, message = BAD_FILES[case]
    corrupt(path)
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=2))
    before = state_copy(lm)
    with pytest.raises(error, match=message):
        lm.load_adapter(path, name="bad")
    _assert_untouched(lm, before)


def test_wrong_base_is_refused_unless_unchecked(arch: Arch, tmp_path: Path) -> None:
    _, path = _saved(arch, tmp_path)
    other = arch.build(seed=123)  # same architecture, different weights
    before = state_copy(other)
    with pytest.raises(lk.AdapterMismatchError, match="base weights differ"):
        lk.LoraModel.from_pretrained(other, path)
    assert not any(isinstance(m, lk.LoRALinear) for m in other.modules())
    assert all(torch.equal(v, before[k]) for k, v in state_copy(other).items())
    lk.LoraModel.from_pretrained(other, path, check_base=False)  # the user's explicit choice


def _reload_base(lm: lk.LoraModel, base: torch.nn.Module) -> None:
    """Copy ``base``'s weights into ``lm``'s base modules in place (adapters untouched)."""
    weights = {f"model.{k}": v for k, v in base.state_dict().items()}
    state = {k: weights.get(k.replace(".base.", "."), v) for k, v in lm.state_dict().items()}
    lm.load_state_dict(state)


def test_base_reloaded_in_place_is_fingerprinted_afresh(arch: Arch, tmp_path: Path) -> None:
    """The digest cached on each layer used to outlive a base reload: the adapter saved
    afterwards recorded the old base (refused on its own base, accepted on the old one), and
    loads and swaps checked files against the old base too."""
    lm, first = _saved(arch, tmp_path)  # caches the digests of the seed-0 base
    new_base = arch.build(seed=7)
    _reload_base(lm, new_base)
    path = lm.save_adapter(tmp_path / "after")
    lk.LoraModel.from_pretrained(copy.deepcopy(new_base), path)  # its own base: accepted
    with pytest.raises(lk.AdapterMismatchError, match="base weights differ"):
        lk.LoraModel.from_pretrained(arch.build(0), path)
    with pytest.raises(lk.AdapterMismatchError, match="base weights differ"):
        lm.load_adapter(first, "old")  # saved on the seed-0 base, no longer this one
    lm.make_swappable("default", 4)
    lm.swap_adapter("default", path)  # the swap plan remembers a fingerprint
    _reload_base(lm, arch.build(0))
    with pytest.raises(lk.AdapterMismatchError, match="base weights differ"):
        lm.swap_adapter("default", path)
    lm.swap_adapter("default", first)


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    from tests.conftest import BERT, GPT2

    _, path = _saved(GPT2, tmp_path)
    with pytest.raises(lk.LoraKitError):
        lk.LoraModel.from_pretrained(BERT.build(0), path)


def test_fingerprint_matches_the_same_base_in_bf16(tmp_path: Path) -> None:
    from tests.conftest import GPT2

    _, path = _saved(GPT2, tmp_path)
    lk.LoraModel.from_pretrained(GPT2.build(0).to(torch.bfloat16), path)


def test_missing_directory_and_file_instead_of_directory(tmp_path: Path) -> None:
    from tests.conftest import GPT2

    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=2))
    with pytest.raises(lk.AdapterFormatError, match="does not exist"):
        lm.load_adapter(tmp_path / "nope")
    (tmp_path / "f.safetensors").write_bytes(b"x")
    with pytest.raises(lk.AdapterFormatError, match="is a file"):
        lm.load_adapter(tmp_path / "f.safetensors")


def test_nan_weights_are_not_saved_and_old_adapter_survives(arch: Arch, tmp_path: Path) -> None:
    lm, path = _saved(arch, tmp_path)
    old = (path / WEIGHTS_NAME).read_bytes()
    layer = next(m for m in lm.modules() if isinstance(m, lk.LoRALinear))
    with torch.no_grad():
        layer.adapter("default").lora_B[0, 0] = float("nan")
    with pytest.raises(lk.NonFiniteError, match="NaN"):
        lm.save_adapter(path)
    assert (path / WEIGHTS_NAME).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp left behind


def test_interrupted_save_keeps_the_old_adapter(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, path = _saved(arch, tmp_path)
    old = {p.name: p.read_bytes() for p in path.iterdir()}
    (path / "README.md").write_text("notes")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lora_kit.adapter_io.save_file", crash)
    randomize(lm, seed=5)
    with pytest.raises(KeyboardInterrupt):
        lm.save_adapter(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name != "README.md"} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    lm.save_adapter(path)  # a later save replaces it and keeps the user's other files
    assert (path / "README.md").read_text() == "notes"
    assert (path / WEIGHTS_NAME).read_bytes() != old[WEIGHTS_NAME]


def test_save_failing_as_it_moves_into_place_keeps_the_old_adapter(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old directory is moved aside first; when moving the new one in failed, the path
    used to be left empty (the old adapter under a hidden '.old-<pid>' name)."""
    import os

    lm, path = _saved(arch, tmp_path)
    (path / "README.md").write_text("notes")
    old = {p.name: p.read_bytes() for p in path.iterdir()}
    real_replace = os.replace

    def failing_replace(src: Path, dst: Path) -> None:
        if Path(src).name.endswith(".tmp"):  # the new directory moving into place
            raise OSError("simulated failure")
        real_replace(src, dst)

    monkeypatch.setattr("lora_kit.adapter_io.os.replace", failing_replace)
    randomize(lm, seed=5)
    with pytest.raises(OSError, match="simulated"):
        lm.save_adapter(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_refuses_to_overwrite_a_non_adapter_directory(tmp_path: Path) -> None:
    from tests.conftest import GPT2

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "important.txt").write_text("keep me")
    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=2))
    with pytest.raises(lk.AdapterFormatError, match="not an adapter directory"):
        lm.save_adapter(tmp_path / "data")
    assert (tmp_path / "data" / "important.txt").read_text() == "keep me"


def test_save_needs_a_name_when_ambiguous(tmp_path: Path) -> None:
    from tests.conftest import GPT2

    lm = lk.inject(copy.deepcopy(GPT2.build(0)), lk.LoraConfig(r=2))
    lm.add_adapter("b", lk.LoraConfig(r=2))
    with pytest.raises(lk.AdapterNameError, match="say which one"):
        lm.save_adapter(tmp_path / "x")


def _structure(model: torch.nn.Module) -> list[tuple[str, str, bool]]:
    """Module tree and trainability, to compare after a failed operation."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return [
        (n, type(m).__name__, grads.get(n + ".weight", False)) for n, m in model.named_modules()
    ]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"], ids=str)
@pytest.mark.parametrize("how", ["inject", "add_adapter", "load_adapter", "from_pretrained"])
def test_non_float_adapter_dtype_is_a_config_error_and_changes_nothing(
    arch: Arch, tmp_path: Path, how: str, dtype: object
) -> None:
    """It was a RuntimeError from nn.Parameter after the first layers were already wrapped."""
    _, path = _saved(arch, tmp_path)
    model = arch.build(0)
    lm = (
        lk.inject(model, lk.LoraConfig(r=2, targets=arch.attn_preset))
        if how
        in (
            "add_adapter",
            "load_adapter",
        )
        else None
    )
    before, tree = state_copy(model), _structure(model)
    config = lk.LoraConfig(r=4, targets=arch.all_preset)
    with pytest.raises(lk.ConfigError, match="adapter_dtype"):
        if how == "inject":
            lk.inject(model, config, adapter_dtype=dtype)  # type: ignore[arg-type]
        elif how == "from_pretrained":
            lk.LoraModel.from_pretrained(model, path, adapter_dtype=dtype)  # type: ignore[arg-type]
        elif how == "add_adapter":
            assert lm is not None
            lm.add_adapter("x", config, adapter_dtype=dtype)  # type: ignore[arg-type]
        else:
            assert lm is not None
            lm.load_adapter(path, "x", adapter_dtype=dtype)  # type: ignore[arg-type]
    assert _structure(model) == tree
    after = state_copy(model)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    if lm is not None:
        assert set(lm.adapters) == {"default"}


def test_config_text_is_parsed_once_and_reparsed_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapping among adapters of one recipe re-reads identical config files: parsed once."""
    import lora_kit.adapter_io as adapter_io

    _, path = _saved(GPT2, tmp_path)
    calls: list[str] = []
    real = adapter_io.from_peft_dict

    def counting(data: dict[str, object], source: str) -> lk.LoraConfig:
        calls.append(source)
        return real(data, source)

    monkeypatch.setattr(adapter_io, "from_peft_dict", counting)
    monkeypatch.setattr(adapter_io, "_CONFIGS", {})
    first, again = read_adapter(path), read_adapter(path)
    assert len(calls) == 1 and again.config is first.config
    data = json.loads((path / CONFIG_NAME).read_text())
    data["lora_alpha"] = 3.0
    (path / CONFIG_NAME).write_text(json.dumps(data))
    assert read_adapter(path).config.alpha == 3.0 and len(calls) == 2


def test_unknown_config_keys_warn_on_every_read(tmp_path: Path) -> None:
    _, path = _saved(GPT2, tmp_path)
    data = json.loads((path / CONFIG_NAME).read_text())
    data["future_option"] = 1
    (path / CONFIG_NAME).write_text(json.dumps(data))
    for _ in range(2):
        with pytest.warns(UserWarning, match="future_option"):
            read_adapter(path)


def test_a_shared_config_cannot_be_edited_in_place(tmp_path: Path) -> None:
    """Reads of one config text share a LoraConfig; an edit of its pattern mappings would
    reach every adapter read from that text, so the mappings refuse edits."""
    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=4, targets="gpt2-all", rank_pattern={"c_fc": 2}))
    path = lm.save_adapter(tmp_path / "a")
    first = read_adapter(path).config
    with pytest.raises(lk.ConfigError, match="read-only"):
        first.rank_pattern["c_fc"] = 3  # type: ignore[index]
    again = read_adapter(path).config
    assert again is first and dict(again.rank_pattern) == {"c_fc": 2}


def test_save_under_a_file_is_an_adapter_format_error(tmp_path: Path) -> None:
    """It was a bare FileExistsError/NotADirectoryError from mkdir."""
    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=2))
    (tmp_path / "file").write_text("keep me")
    for path in (tmp_path / "file" / "adapter", tmp_path / "file" / "deeper" / "adapter"):
        with pytest.raises(lk.AdapterFormatError, match="is a file, not a directory"):
            lm.save_adapter(path)
    assert (tmp_path / "file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("where", [".", "..", "sub/.."])
def test_save_to_dot_or_dotdot_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Saving from inside the adapter folder to ``.`` raised a bare ValueError (``'.' has an
    empty name``) from the atomic swap, after writing a temporary copy inside that folder."""
    lm, folder = _saved(GPT2, tmp_path)
    (folder / "sub").mkdir()
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.chdir(folder / "sub" if where == ".." else folder)
    with pytest.raises(lk.AdapterFormatError, match=f"pass {str(folder)!r} instead"):
        lm.save_adapter(where)
    assert sorted(p.name for p in folder.iterdir()) == before
    lm.save_adapter(str(folder))  # the full path the message gives works


def test_saving_through_a_symlink_updates_the_linked_folder_and_keeps_the_link(
    tmp_path: Path,
) -> None:
    """The atomic swap renamed the link itself aside: the link became a new folder, the folder it
    pointed to kept the old adapter, and a hidden ``.NAME.old-<pid>`` link was left behind."""
    lm, real = _saved(GPT2, tmp_path)
    (real / "README.md").write_text("my card")
    link = tmp_path / "lib" / "ad"
    link.parent.mkdir()
    link.symlink_to(real)
    randomize(lm)
    lm.save_adapter(link)
    assert link.is_symlink() and [p.name for p in link.parent.iterdir()] == ["ad"]
    assert (real / "README.md").read_text() == "my card"
    saved = load_file(str(real / WEIGHTS_NAME))
    state = {k: v for k, v in lm.state_dict().items() if "lora_" in k}
    assert all(any(torch.equal(v, w) for w in state.values()) for v in saved.values())


def test_a_symlink_inside_an_adapter_folder_stays_a_link_when_saved_over(tmp_path: Path) -> None:
    """Carrying the folder's other files over copied what a link pointed to (a whole data set
    duplicated) and dropped the link."""
    lm, folder = _saved(GPT2, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bin").write_bytes(b"\x00" * 64)
    (folder / "data").symlink_to(data)
    (folder / "notes.md").symlink_to(tmp_path / "notes.md")
    (tmp_path / "notes.md").write_text("mine")
    lm.save_adapter(folder)
    assert (folder / "data").is_symlink() and (folder / "notes.md").is_symlink()
    assert (data / "train.bin").read_bytes() == b"\x00" * 64
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_metadata_value_with_an_over_long_integer_is_kept_as_text() -> None:
    """Found by fuzzing: json.loads raised a bare ValueError on it."""
    value = "9" * 5000
    assert decode_metadata({"lora_kit.note": value}) == {"note": value}
