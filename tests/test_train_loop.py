"""The training loop: adapters-only updates, accumulation, resume bit-identity, NaN handling."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_helpers import encode, tiny_bert, tiny_gpt2, write_cls, write_text

import lora_kit as lk
from lora_kit.errors import ConfigError, DataError, TrainingDivergedError
from lora_kit.train import (
    CheckpointError,
    RunLogger,
    StepInfo,
    TrainConfig,
    evaluate,
    load_causal_lm,
    load_classification,
    loop,
    macro_f1,
    read_checkpoint,
    resolve_precision,
    train,
)
from lora_kit.train.data import Dataset, Example
from lora_kit.train.loop import checkpointing_on
from tests.conftest import fail_on_call, model_state, randomize


def _setup(kind: str, tmp: Path, dropout: float = 0.0) -> tuple[lk.LoraModel, object, object]:
    if kind == "gpt2":
        data = load_causal_lm(write_text(tmp / "a.txt"), encode, max_length=16, eos_id=0)
        model = tiny_gpt2(dropout)
        config = lk.LoraConfig(r=4, targets="gpt2-all", dropout=dropout)
    else:
        data = load_classification(write_cls(tmp / "c.jsonl"), encode, max_length=12)
        model = tiny_bert(dropout=dropout)
        config = lk.LoraConfig(r=4, targets="bert-all", modules_to_save=("classifier",))
    train_set, eval_set = data.split(0.1, seed=0)
    torch.manual_seed(1)
    return lk.inject(model, config), train_set, eval_set


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _cfg(tmp: Path, **changes: object) -> TrainConfig:
    base = {"out": str(tmp / "out"), "steps": 4, "batch_size": 4, "lr": 1e-2, "eval_fraction": 0.0}
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_only_adapter_and_head_parameters_change(kind: str, tmp_path: Path) -> None:
    lm, train_set, eval_set = _setup(kind, tmp_path)
    ours = {id(p) for p in lm.adapter_parameters("default")}
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    result = train(lm, train_set, _cfg(tmp_path), eval_data=eval_set)
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    params = dict(lm.named_parameters())
    assert changed, "training changed nothing"
    assert all(id(params[n]) in ours for n in changed), sorted(changed)
    # Every B moved off zero (A gets zero grad in step 1 only), and the head copy trained.
    assert any(".lora_B" in n for n in changed)
    if kind == "bert":
        assert any("classifier.copies.default" in n for n in changed)
        assert not any("classifier.original" in n for n in changed)
        assert set(result.metrics) == {"eval_loss", "eval_accuracy", "eval_macro_f1"}
    else:
        assert result.metrics["eval_perplexity"] == pytest.approx(
            math.exp(result.metrics["eval_loss"])
        )
    # The saved adapter reloads and equals the trained weights exactly.
    saved = _adapter(result.adapter_path)
    fresh = lk.LoraModel.from_pretrained(
        tiny_gpt2() if kind == "gpt2" else tiny_bert(), result.adapter_path
    )
    for name, p in fresh.named_parameters():
        if id(p) in {id(q) for q in fresh.adapter_parameters("default")}:
            assert torch.equal(p, params[name]), name
    assert saved


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_grad_accumulation_matches_one_big_batch(kind: str, tmp_path: Path) -> None:
    # 2 micro-batches of 4 accumulated == 1 batch of 8: same examples, same gradient up to
    # fp32 summation order (~1e-7 relative); after 3 Adam steps the adapters agree to 1e-5.
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        lm, train_set, _ = _setup(kind, tmp_path)
        cfg = _cfg(tmp_path / f"{bs}x{accum}", steps=3, batch_size=bs, grad_accum=accum)
        results.append(_adapter(train(lm, train_set, cfg).adapter_path))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_uneven_last_window_weights_every_example_equally(kind: str, tmp_path: Path) -> None:
    """One epoch ends in a window of unequal micro-batches (GPT-2: 33 examples, 4+4+1; BERT:
    43, 4+3). Weighting each micro-batch's mean loss by its share of the window's examples
    makes 3 accumulated micro-batches of 4 the same step as one batch of 12: equal step
    losses (1e-5 relative: fp32 summation order) and adapters (tolerance as above)."""
    runs = []
    for bs, accum in ((12, 1), (4, 3)):
        lm, train_set, _ = _setup(kind, tmp_path)
        rest = len(train_set) % 12
        assert rest > 4 and rest % 4  # the last window really is uneven
        steps: list[StepInfo] = []
        cfg = _cfg(tmp_path / f"{bs}x{accum}", steps=None, epochs=1, batch_size=bs,
                   grad_accum=accum)  # fmt: skip
        result = train(lm, train_set, cfg, callbacks=[steps.append])
        assert result.steps == math.ceil(len(train_set) / 12)
        runs.append(([info.loss for info in steps], _adapter(result.adapter_path)))
    (big_losses, big), (accum_losses, accumulated) = runs
    assert accum_losses == pytest.approx(big_losses, rel=1e-5)
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("empty", [False, True], ids=["unequal", "with-an-empty-one"])
def test_accumulating_causal_lm_examples_of_unequal_length_weights_every_token_equally(
    empty: bool, tmp_path: Path
) -> None:
    """Causal-LM examples of 4..16 tokens (a user's own Dataset, not packed blocks): the
    model's loss is a mean over a micro-batch's predicted tokens, so 4 micro-batches of 2
    weighted by their share of the window's tokens (HF Trainer's num_items_in_batch) are the
    step of one batch of 8. Weighted by examples, the step losses differed by 1e-3 and the
    adapters by 4e-2 after 3 steps. An empty example (``empty``) has no predicted token: it
    counted as -1 of the window's tokens, and the steps differed by 6e-4."""
    runs = []
    for bs, accum in ((8, 1), (2, 4)):
        lm, train_set, _ = _setup("gpt2", tmp_path)
        examples = tuple(
            Example(e.input_ids[: 0 if empty and i == 3 else 4 + (i * 5) % 13])
            for i, e in enumerate(train_set.examples)
        )
        data = Dataset("causal-lm", examples, (), train_set.pad_id)
        steps: list[StepInfo] = []
        cfg = _cfg(tmp_path / f"{bs}x{accum}", steps=3, batch_size=bs, grad_accum=accum)
        result = train(lm, data, cfg, callbacks=[steps.append])
        runs.append(([info.loss for info in steps], _adapter(result.adapter_path)))
    (big_losses, big), (accum_losses, accumulated) = runs
    assert all(math.isfinite(loss) for loss in big_losses + accum_losses)
    assert accum_losses == pytest.approx(big_losses, rel=1e-5)
    for key, value in big.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-5)


def test_other_adapters_requires_grad_put_back_when_training_fails(tmp_path: Path) -> None:
    """Frozen while another adapter trains; put back on an error too, and one the caller had
    frozen stays frozen."""
    lm, train_set, _ = _setup("gpt2", tmp_path)
    lm.add_adapter("other", lk.LoraConfig(r=4, targets="gpt2-all"))
    kept = lm.adapter_parameters("other")[0]
    kept.requires_grad_(False)
    seen: list[bool] = []

    def boom(info: StepInfo) -> None:
        seen.extend(p.requires_grad for p in lm.adapter_parameters("other"))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train(lm, train_set, _cfg(tmp_path, steps=2), callbacks=[boom])
    assert seen and not any(seen)  # frozen during training
    flags = [p.requires_grad for p in lm.adapter_parameters("other")]
    assert flags == [False] + [True] * (len(flags) - 1)


def _train_records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_epochs_end_with_their_partial_window(kind: str, tmp_path: Path) -> None:
    """With ``epochs``, each epoch runs ceil(examples / (batch * accum)) steps: the last,
    partial window too (GPT-2: 33 examples -> 5 steps of 8; BERT: 43 -> 6)."""
    lm, train_set, _ = _setup(kind, tmp_path)
    assert math.ceil(len(train_set) / 4) % 2  # the last window is a single micro-batch
    windows = math.ceil(len(train_set) / 8)
    cfg = _cfg(tmp_path, steps=None, epochs=2, batch_size=4, grad_accum=2)
    assert train(lm, train_set, cfg).steps == 2 * windows
    assert [r["epoch"] for r in _train_records(Path(cfg.out))] == [0] * windows + [1] * windows


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_clip_norm_caps_the_gradient_the_optimizer_steps_with(
    kind: str, clip: float, tmp_path: Path
) -> None:
    """The optimizer sees the gradient clipped to ``clip_norm`` (0: not clipped); the log has
    the pre-clip norm. Clipping scales by clip / (norm + 1e-6), so the clipped norm is within
    1e-6 / norm (< 1e-4 relative here) of ``clip``; fp32 norms agree to ~1e-7."""
    lm, train_set, _ = _setup(kind, tmp_path)
    seen: list[float] = []

    def record(optimizer: Any, args: object, kwargs: object) -> None:
        grads = [
            p.grad.double().norm()
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        seen.append(float(torch.stack(grads).norm()))

    handle = register_optimizer_step_pre_hook(record)
    try:
        cfg = _cfg(tmp_path, steps=3, clip_norm=clip)
        train(lm, train_set, cfg)
    finally:
        handle.remove()
    logged = [r["grad_norm"] for r in _train_records(Path(cfg.out))]
    assert len(seen) == len(logged) == 3
    if clip:
        assert all(n > clip for n in logged)  # clipping really applied at every step
        assert seen == pytest.approx([clip] * 3, rel=1e-4)
    else:
        assert seen == pytest.approx(logged, rel=1e-5)


class _StopError(Exception):
    pass


def _stop_at(step: int):  # type: ignore[no-untyped-def]
    def callback(info: StepInfo) -> None:
        if info.step == step:
            raise _StopError

    return callback


@pytest.mark.parametrize(
    ("kind", "save_every", "kill_at"),
    [("gpt2", 3, 5), ("gpt2", 4, 4), ("gpt2", 9, 9), ("bert", 5, 7)],
)
def test_killed_and_resumed_run_is_bit_identical(
    kind: str, save_every: int, kill_at: int, tmp_path: Path
) -> None:
    # Dropout on so the RNG state must be restored too. GPT-2 has 9 windows of 2x2 per epoch,
    # so 10 steps cross an epoch boundary, and save_every=9 checkpoints exactly at its end.
    cfg = {"steps": 10, "batch_size": 2, "grad_accum": 2, "save_every": save_every}
    lm, train_set, _ = _setup(kind, tmp_path, dropout=0.1)
    straight = _adapter(train(lm, train_set, _cfg(tmp_path / "a", **cfg)).adapter_path)

    lm, train_set, _ = _setup(kind, tmp_path, dropout=0.1)
    with pytest.raises(_StopError):
        train(lm, train_set, _cfg(tmp_path / "b", **cfg), callbacks=[_stop_at(kill_at)])
    assert read_checkpoint(tmp_path / "b" / "out").state["step"] == save_every
    lm, train_set, _ = _setup(kind, tmp_path, dropout=0.1)  # a fresh process would do this
    result = train(lm, train_set, _cfg(tmp_path / "b", **cfg), resume=True)
    resumed = _adapter(result.adapter_path)
    assert result.steps == 10
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(lm, train_set, _cfg(tmp_path), resume=True)
    train(lm, train_set, _cfg(tmp_path, steps=2))
    lm, train_set, _ = _setup("gpt2", tmp_path)
    with pytest.raises(ConfigError, match=r"lr: checkpoint 0\.01, now 0\.02"):
        train(lm, train_set, _cfg(tmp_path, steps=2, lr=2e-2), resume=True)


def _poison(lm: lk.LoraModel, bad_calls: set[int]) -> None:
    """Make the final hidden state NaN on the given forward calls (1-based)."""
    calls = {"n": 0}

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] in bad_calls else output

    lm.model.transformer.ln_f.register_forward_hook(hook)


def test_nan_step_is_skipped_with_a_warning(tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    _poison(lm, {2})  # the forward of step 2 (one micro-batch per step)
    seen: list[dict[str, torch.Tensor]] = []

    def snapshot(info: StepInfo) -> None:
        seen.append({n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad})

    with pytest.warns(UserWarning, match="step 2: non-finite loss"):
        result = train(lm, train_set, _cfg(tmp_path, steps=3), callbacks=[snapshot])
    assert result.steps == 3
    assert all(torch.equal(seen[0][n], seen[1][n]) for n in seen[0])  # step 2 changed nothing
    assert not all(torch.equal(seen[1][n], seen[2][n]) for n in seen[1])  # step 3 trained
    assert all(torch.isfinite(t).all() for t in _adapter(result.adapter_path).values())


def test_repeated_nan_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    _poison(lm, set(range(3, 100)))
    cfg = _cfg(tmp_path, steps=10, save_every=2, max_bad_steps=3)
    with (
        pytest.warns(UserWarning, match="non-finite"),
        pytest.raises(TrainingDivergedError, match=r"3 steps in a row.*checkpoint"),
    ):
        train(lm, train_set, cfg)
    checkpoint = read_checkpoint(cfg.out)
    assert checkpoint.state["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint.adapter.tensors.values())


def test_weight_decay_spares_biases_and_norms(tmp_path: Path) -> None:
    from lora_kit.train.loop import _optimizer

    lm, _, _ = _setup("bert", tmp_path)
    optimizer = _optimizer(lm.adapter_parameters("default"), _cfg(tmp_path, weight_decay=0.1))
    for group in optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (0.1 if dims == {2} else 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        lm.adapter_parameters("default")
    )


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [0.01, 0.01, 0.01, 0.01]),
        ("constant", 2, [0.0, 0.005, 0.01, 0.01]),
        ("linear", 0, [0.01, 0.0075, 0.005, 0.0025]),
        (
            "cosine",
            0,
            [
                0.01,
                0.01 * (1 + math.cos(math.pi / 4)) / 2,
                0.005,
                0.01 * (1 + math.cos(3 * math.pi / 4)) / 2,
            ],
        ),
    ],
)
def test_schedules(schedule: str, warmup: int, expected: list[float], tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    lrs: list[float] = []
    train(
        lm,
        train_set,
        _cfg(tmp_path, schedule=schedule, warmup_steps=warmup),
        callbacks=[lambda i: lrs.append(i.lr)],
    )
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_bf16_autocast_keeps_adapters_and_optimizer_fp32(tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    result = train(lm, train_set, _cfg(tmp_path, steps=1, precision="bf16", batch_size=2))
    assert all(p.dtype == torch.float32 for p in lm.adapter_parameters("default"))
    state = read_checkpoint(result.adapter_path).state["optimizer"]["state"]
    assert all(
        v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step"
    )


@pytest.mark.parametrize("init_scale", [2.0**60, 1.0])
def test_fp16_steps_the_scaler_skips_are_reported_skipped(
    init_scale: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp16 with loss scaling, emulated on CPU. A scale of 2**60 overflows every step, so the
    # scaler skips each update (the adapter stays as initialised); they were reported
    # skipped=False. An overflow is not divergence: no TrainingDivergedError. A skipped step
    # does not advance the schedule (as accelerate/HF Trainer): it advanced, and torch warned
    # that lr_scheduler.step() ran before optimizer.step().
    plan = loop.PrecisionPlan("fp16", "cpu")
    monkeypatch.setattr(loop, "resolve_precision", lambda requested, device: plan)
    monkeypatch.setattr(
        loop.PrecisionPlan,
        "scaler",
        lambda self: torch.amp.GradScaler("cpu", init_scale=init_scale),
    )
    lm, train_set, _ = _setup("gpt2", tmp_path)
    before = [p.detach().clone() for p in lm.adapter_parameters("default")]
    steps: list[StepInfo] = []
    config = _cfg(tmp_path, steps=3, warmup_steps=2, schedule="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's scheduler-order warning among them
        result = train(lm, train_set, config, callbacks=[steps.append])
    overflow = init_scale > 1
    assert [info.skipped for info in steps] == [overflow] * 3
    assert [r["skipped"] for r in _train_records(result.adapter_path)] == [overflow] * 3
    assert [info.lr for info in steps] == ([0.0] * 3 if overflow else [0.0, 5e-3, 1e-2])
    after = lm.adapter_parameters("default")
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) == overflow


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_cuda() -> None:
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("which", ["train", "eval"])
def test_causal_lm_data_with_nothing_to_predict_is_a_data_error(which: str, tmp_path: Path) -> None:
    """Examples of one token have no next token: training ran NaN steps into a
    TrainingDivergedError advising a lower LR, and evaluation logged a loss of 0 and a
    perplexity of 1 measured over nothing."""
    lm, train_set, _ = _setup("gpt2", tmp_path)
    single = Dataset("causal-lm", tuple(Example(e.input_ids[:1]) for e in train_set.examples),
                     (), train_set.pad_id)  # fmt: skip
    data, eval_data = (single, None) if which == "train" else (train_set, single)
    before = [p.detach().clone() for p in lm.adapter_parameters("default")]
    what = "training" if which == "train" else "eval"
    with pytest.raises(DataError, match=f"the {what} data has no token to predict"):
        train(lm, data, _cfg(tmp_path, eval_every=2), eval_data=eval_data)
    after = lm.adapter_parameters("default")
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not (tmp_path / "out").exists()


def test_empty_eval_data_is_no_eval_data(tmp_path: Path) -> None:
    # An empty held-out split (eval_fraction=0) passed with eval_every used to log and return
    # eval_loss 0.0 / perplexity 1.0 measured over nothing; it is now as if none was given.
    lm, train_set, _ = _setup("gpt2", tmp_path)
    empty = train_set.split(0.0, seed=0)[1]
    assert len(empty) == 0
    result = train(lm, train_set, _cfg(tmp_path, steps=4, eval_every=2), eval_data=empty)
    assert result.metrics == {}
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["event"] == "eval"]


def test_eval_loss_matches_the_models_own_loss(tmp_path: Path) -> None:
    # Token-weighted mean CE over equal-length blocks == HF's mean loss on one batch (1e-5:
    # same math, different reduction order).
    lm, train_set, _ = _setup("gpt2", tmp_path)
    plan = resolve_precision("fp32", torch.device("cpu"))
    metrics = evaluate(
        lm, train_set, batch_size=len(train_set), plan=plan, device=torch.device("cpu")
    )
    batch = train_set.collate(range(len(train_set)))
    with torch.no_grad():
        reference = float(lm(**batch).loss)
    assert metrics["eval_loss"] == pytest.approx(reference, rel=1e-5)


def test_macro_f1_by_hand() -> None:
    preds, golds = [0, 0, 1, 2, 1], [0, 1, 1, 0, 1]
    # class 0: tp=1 fp=1 fn=1 -> 0.5; class 1: tp=2 fp=0 fn=1 -> 0.8; class 2: fp=1 -> 0
    assert macro_f1(preds, golds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_adapter(kind: str, tmp_path: Path) -> None:
    # Recomputing activations in backward is the same arithmetic (dropout 0): equal to ~1e-6.
    results = []
    for checkpointing in (False, True):
        lm, train_set, _ = _setup(kind, tmp_path)
        cfg = _cfg(tmp_path / str(checkpointing), steps=2, gradient_checkpointing=checkpointing)
        results.append(_adapter(train(lm, train_set, cfg).adapter_path))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6)


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    # It also used to evaluate again and log a second eval and end record; now the final
    # metrics come back from the checkpoint and metrics.jsonl stays as it was.
    lm, train_set, eval_set = _setup("gpt2", tmp_path)
    done = train(lm, train_set, _cfg(tmp_path, steps=2), eval_data=eval_set)
    first = _adapter(done.adapter_path)
    log = (tmp_path / "out" / "metrics.jsonl").read_text()
    lm, train_set, eval_set = _setup("gpt2", tmp_path)
    result = train(lm, train_set, _cfg(tmp_path, steps=2), eval_data=eval_set, resume=True)
    assert result.steps == 2
    assert result.metrics == done.metrics != {}
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == log
    again = _adapter(result.adapter_path)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_training_an_adapter_that_is_not_active_is_refused(kind: str, tmp_path: Path) -> None:
    # With another adapter (or none) active, the forward never touches adapter "default":
    # every step was a silent no-op and the "trained" adapter was the untouched init.
    lm, train_set, _ = _setup(kind, tmp_path)
    lm.add_adapter("other", lk.LoraConfig(r=4, targets=f"{kind}-all"))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    for selection in ("other", None):
        lm.set_adapter(selection)
        with pytest.raises(ConfigError, match=r"'default' is not the active adapter.*set_adapter"):
            train(lm, train_set, _cfg(tmp_path, steps=1))
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters())
    assert not (tmp_path / "out").exists()  # refused before anything was written
    lm.set_adapter("default")
    lm.merge("default")
    with pytest.raises(ConfigError, match=r"merged into the base weights.*unmerge"):
        train(lm, train_set, _cfg(tmp_path, steps=1))
    lm.unmerge()
    train(lm, train_set, _cfg(tmp_path, steps=1))
    assert any(not torch.equal(p, before[n]) for n, p in lm.named_parameters())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_training_restores_eval_mode(kind: str, tmp_path: Path) -> None:
    # train() switched the model to train mode and left it there: after training, a model
    # the caller had in eval mode ran its predictions with dropout on (different each call).
    lm, train_set, eval_set = _setup(kind, tmp_path, dropout=0.5)
    lm.eval()
    train(lm, train_set, _cfg(tmp_path, steps=1, eval_every=1), eval_data=eval_set)
    assert not any(m.training for m in lm.modules())
    batch = train_set.collate([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(lm(**batch).logits, lm(**batch).logits, rtol=0, atol=0)
    lm.train()
    train(lm, train_set, _cfg(tmp_path / "again", steps=1))
    assert all(m.training for m in lm.modules())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_training_puts_modes_and_checkpointing_back_on_error(kind: str, tmp_path: Path) -> None:
    # gradient_checkpointing=True used to stay switched on after train() returned (every later
    # training or inference forward of the caller's model recomputed activations), and an
    # exception inside the loop left every module in train mode.
    lm, train_set, _ = _setup(kind, tmp_path, dropout=0.5)
    lm.eval()

    def boom(info: StepInfo) -> None:
        raise RuntimeError("stop")

    class Logger(RunLogger):  # records that the run closed its bar and TensorBoard writer
        closed = False

        def close(self) -> None:
            super().close()
            self.closed = True

    cfg = _cfg(tmp_path, steps=2, gradient_checkpointing=True)
    logger = Logger(cfg.out)
    with pytest.raises(RuntimeError, match="stop"):
        train(lm, train_set, cfg, callbacks=[boom], logger=logger)
    assert logger.closed  # it used to be closed only on success or divergence
    assert not any(m.training for m in lm.modules())
    assert not checkpointing_on(lm.model)
    train(lm, train_set, _cfg(tmp_path / "again", steps=1, gradient_checkpointing=True))
    assert not checkpointing_on(lm.model)
    # the caller's own choice stays as it was (transformers 5's name, else 4.x's)
    enable = getattr(lm.model, "activation_checkpointing_enable", None)
    (enable or lm.model.gradient_checkpointing_enable)()
    train(lm, train_set, _cfg(tmp_path / "third", steps=1, gradient_checkpointing=True))
    assert checkpointing_on(lm.model)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"r": 8}, r"rank 4 -> 8"),
        ({"alpha": 64.0}, r"scaling 4\.0 -> 16\.0"),
        ({"dropout": 0.3}, "dropout 0.0 -> 0.3"),
    ],
)
def test_resume_refuses_different_lora_settings(
    kind: str, change: dict[str, float], match: str, tmp_path: Path
) -> None:
    # A different rank failed with a bare RuntimeError from copy_; a different alpha or
    # dropout was accepted silently, so the resumed run trained a different function.
    lm, train_set, _ = _setup(kind, tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=2))
    heads = ("classifier",) if kind == "bert" else ()
    settings: dict[str, object] = {"r": 4, "targets": f"{kind}-all", "modules_to_save": heads}
    settings.update(change)
    model = tiny_gpt2() if kind == "gpt2" else tiny_bert()
    lm = lk.inject(model, lk.LoraConfig(**settings))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        train(lm, train_set, _cfg(tmp_path, steps=2), resume=True)


def test_unreadable_or_foreign_trainer_state_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Garbage bytes raised a bare KeyError, a pickled class outside the weights-only allow
    # list an UnpicklingError (whose message suggests weights_only=False), and a state
    # missing keys a KeyError deep inside train().
    import fractions

    lm, train_set, _ = _setup("gpt2", tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=1))
    state_file = tmp_path / "out" / "checkpoint" / "trainer_state.pt"
    raw = state_file.read_bytes()
    cases: list[tuple[bytes | dict[str, object], str]] = [
        (b"not a checkpoint at all", "unreadable trainer state"),
        (raw[: len(raw) // 2], "unreadable trainer state"),
        ({"step": 1, "x": fractions.Fraction(1, 3)}, "unreadable trainer state"),
        ({"step": 1}, r"not a lora_kit trainer state \(missing .*'optimizer'"),
    ]
    for content, match in cases:
        if isinstance(content, bytes):
            state_file.write_bytes(content)
        else:
            torch.save(content, state_file)
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(tmp_path / "out")
        lm, train_set, _ = _setup("gpt2", tmp_path)
        with pytest.raises(CheckpointError, match=match):
            train(lm, train_set, _cfg(tmp_path, steps=1), resume=True)


def test_edited_trainer_state_is_a_checkpoint_error_and_changes_nothing(tmp_path: Path) -> None:
    # A loadable state with a bad counter, optimizer, scheduler or RNG state raised a bare
    # TypeError/KeyError/ValueError/RuntimeError (a wrong exp_avg shape only at the first
    # step, after metrics.jsonl was rewound); NaN moments trained on into a NaN adapter.
    import copy

    lm, train_set, _ = _setup("gpt2", tmp_path)
    cfg = _cfg(tmp_path, steps=3, save_every=2)
    with pytest.raises(_StopError):
        train(lm, train_set, cfg, callbacks=[_stop_at(3)])
    out = tmp_path / "out"
    state_file = out / "checkpoint" / "trainer_state.pt"
    saved = torch.load(state_file, weights_only=True)

    def nan_moments(state: dict[str, Any]) -> None:
        state["optimizer"]["state"][0]["exp_avg"].fill_(float("nan"))

    def short_moments(state: dict[str, Any]) -> None:
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)

    edits: list[tuple[Any, str]] = [
        (lambda s: s.update(step="2"), "step is '2', not a count"),
        (lambda s: s.update(window=-1), "window is -1, not a count"),
        (lambda s: s.update(step=99), "step 99 is past this run's 3 steps"),
        (lambda s: s.update(metrics=[1]), "metrics is not a dict"),
        (lambda s: s.update(optimizer={}), r"optimizer.*does not fit.*KeyError"),
        (short_moments, "exp_avg has shape"),
        (nan_moments, "exp_avg holds NaN"),
        (lambda s: s.update(scheduler={}), "does not fit this run"),
        (lambda s: s.update(rng={}), r"does not fit this run \(KeyError"),
        # were a ConfigError (exit 2, as for a mistyped argument) and a bare TypeError/KeyError
        (lambda s: s.update(config="{broken"), "saved run config is unreadable"),
        (lambda s: s.update(config=5), "saved run config is unreadable"),
        (lambda s: s.update(data={"sha": 1}), "record of the training data is damaged"),
        (lambda s: s["data"].pop("sha256"), "record of the training data is damaged"),
    ]
    for edit, match in edits:
        state = copy.deepcopy(saved)
        edit(state)
        torch.save(state, state_file)
        before = _run_files(out)
        lm, train_set, _ = _setup("gpt2", tmp_path)
        with pytest.raises(CheckpointError, match=match):
            train(lm, train_set, cfg, resume=True)
        assert _run_files(out) == before, match


def _run_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_eval_data_with_other_labels_or_task_is_refused(tmp_path: Path) -> None:
    # An eval set loaded on its own gets ids from its own label list: without class "c0"
    # its "c1" became id 0, which the model learnt as "c0", and the metrics were silently
    # wrong. A causal-LM eval set for a classifier failed inside cross_entropy.
    import json

    lm, train_set, _ = _setup("bert", tmp_path)
    rows = [{"text": f"w{10 + i} w{20 + i}", "label": f"c{1 + i % 2}"} for i in range(4)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = load_classification(path, encode, max_length=12)
    assert other.labels == ("c1", "c2")
    with pytest.raises(DataError, match=r"labels \['c1', 'c2'\].*\['c0', 'c1', 'c2'\]"):
        train(lm, train_set, _cfg(tmp_path, steps=1), eval_data=other)
    text = load_causal_lm(write_text(tmp_path / "a.txt"), encode, max_length=16, eos_id=0)
    with pytest.raises(DataError, match="eval data is causal-lm but the training data is seq-cls"):
        train(lm, train_set, _cfg(tmp_path, steps=1), eval_data=text)
    same = load_classification(path, encode, max_length=12, labels=train_set.labels)
    result = train(lm, train_set, _cfg(tmp_path, steps=1), eval_data=same)
    assert set(result.metrics) == {"eval_loss", "eval_accuracy", "eval_macro_f1"}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_failed_or_interrupted_checkpoint_swap_keeps_the_previous_checkpoint(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old checkpoint is renamed aside before the new one is renamed in: a failure (or a
    # kill) between the two renames left no <out>/checkpoint, so --resume found nothing.
    import os

    from lora_kit.train import checkpoint as ckpt

    lm, train_set, _ = _setup(kind, tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=1))
    before = read_checkpoint(tmp_path / "out").state["step"]
    real_replace = os.replace
    calls = {"n": 0}

    def failing_replace(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the new checkpoint moving into place
            raise OSError("disk full")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path / "out", lm, "default", {"step": 99})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert read_checkpoint(tmp_path / "out").state["step"] == before
    # A kill between the renames: only the renamed-aside copy is left; resume still finds it.
    real_replace(tmp_path / "out" / "checkpoint", tmp_path / "out" / ".checkpoint.old-123")
    assert read_checkpoint(tmp_path / "out").state["step"] == before
    lm, train_set, _ = _setup(kind, tmp_path)
    assert train(lm, train_set, _cfg(tmp_path, steps=1), resume=True).steps == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name) == [
        "checkpoint"
    ]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_resume_failing_before_its_first_step_leaves_the_adapter_as_it_was(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming copies the checkpoint's tensors into the adapter first, then loads the
    optimizer, scheduler and RNG states: when one of those failed, the caller's adapter was
    left holding the checkpoint's weights."""
    lm, train_set, _ = _setup(kind, tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=2))
    lm, train_set, _ = _setup(kind, tmp_path)
    randomize(lm, seed=3)
    before = model_state(lm)
    broken = fail_on_call(loop._load_optimizer, 1, RuntimeError("injected"))
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_load_optimizer", broken)
        with pytest.raises(CheckpointError, match="injected"):
            train(lm, train_set, _cfg(tmp_path, steps=2), resume=True)
    assert model_state(lm) == before
    assert train(lm, train_set, _cfg(tmp_path, steps=2), resume=True).steps == 2


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_resume_refuses_different_training_data(kind: str, tmp_path: Path) -> None:
    # Only the settings were compared: a resume on edited data (here one example fewer)
    # continued silently with another data order and epoch length.
    lm, train_set, _ = _setup(kind, tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=2))
    smaller = type(train_set)(
        train_set.task, train_set.examples[:-1], train_set.labels, train_set.pad_id
    )
    lm, _, _ = _setup(kind, tmp_path)
    n = len(train_set)
    with pytest.raises(ConfigError, match=rf"training data differs.*{n} examples.*now {n - 1}"):
        train(lm, smaller, _cfg(tmp_path, steps=2), resume=True)
    lm, train_set, _ = _setup(kind, tmp_path)
    assert train(lm, train_set, _cfg(tmp_path, steps=2), resume=True).steps == 2


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_resumed_run_logs_each_step_once_like_an_uninterrupted_one(
    kind: str, tmp_path: Path
) -> None:
    # metrics.jsonl was only appended to: steps run after the last checkpoint of a killed run
    # were logged twice after --resume, and a fresh run into a used --out followed the old
    # run's records.
    import json

    def records(out: Path) -> list[tuple[str, int, float | None]]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["event"], r["step"], r.get("loss")) for r in map(json.loads, lines)]

    cfg = {"steps": 6, "batch_size": 2, "grad_accum": 2, "save_every": 2, "eval_every": 3}
    lm, train_set, eval_set = _setup(kind, tmp_path, dropout=0.1)
    train(lm, train_set, _cfg(tmp_path / "a", **cfg), eval_data=eval_set)
    lm, train_set, eval_set = _setup(kind, tmp_path, dropout=0.1)
    with pytest.raises(_StopError):
        train(
            lm, train_set, _cfg(tmp_path / "b", **cfg), eval_data=eval_set, callbacks=[_stop_at(5)]
        )
    lm, train_set, eval_set = _setup(kind, tmp_path, dropout=0.1)
    train(lm, train_set, _cfg(tmp_path / "b", **cfg), eval_data=eval_set, resume=True)
    straight = records(tmp_path / "a" / "out")
    assert [(e, s) for e, s, _ in straight if e == "train"] == [("train", s) for s in range(1, 7)]
    assert records(tmp_path / "b" / "out") == straight  # losses bit-identical too
    lm, train_set, eval_set = _setup(kind, tmp_path, dropout=0.1)
    train(lm, train_set, _cfg(tmp_path / "a", **cfg), eval_data=eval_set)  # fresh, same --out
    assert records(tmp_path / "a" / "out") == straight


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_resume_refuses_another_base_model(kind: str, tmp_path: Path) -> None:
    # The checkpoint's adapter records its base's fingerprint, but resume copied its tensors
    # without checking it: training went on, silently, on top of another base.
    from lora_kit.errors import AdapterMismatchError

    lm, train_set, _ = _setup(kind, tmp_path)
    train(lm, train_set, _cfg(tmp_path, steps=2))
    other = tiny_gpt2(seed=5) if kind == "gpt2" else tiny_bert(seed=5)  # same shapes
    heads = ("classifier",) if kind == "bert" else ()
    lm = lk.inject(other, lk.LoraConfig(r=4, targets=f"{kind}-all", modules_to_save=heads))
    with pytest.raises(AdapterMismatchError, match="weights") as refused:
        train(lm, train_set, _cfg(tmp_path, steps=2), resume=True)
    # The advice is the trainer's: `lorakit train` has no --no-check-base, which the loading
    # advice named.
    assert "the run started from" in str(refused.value)
    assert "no-check-base" not in str(refused.value)


def test_out_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    lm, train_set, _ = _setup("gpt2", tmp_path)
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        train(lm, train_set, _cfg(tmp_path, steps=1))


def test_training_restores_the_mode_of_the_callers_wrapper(tmp_path: Path) -> None:
    # The modes are captured before the loop; taking them from the unwrapped LoraModel missed
    # the wrapper a caller passed in (DDP here): it came back in train mode.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    lm, train_set, _ = _setup("gpt2", tmp_path)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(lm).eval()
        train(wrapped, train_set, _cfg(tmp_path, steps=1))
        assert not any(m.training for m in wrapped.modules())
    finally:
        dist.destroy_process_group()


def test_out_holding_another_tools_checkpoint_is_refused_before_any_write(tmp_path: Path) -> None:
    """train() replaced ``<out>/checkpoint`` whatever it was (here another tool's)."""
    lm, train_set, _ = _setup("gpt2", tmp_path)
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "weights.bin").write_bytes(b"not lora_kit's")
    with pytest.raises(ConfigError, match="not a lora_kit checkpoint"):
        train(lm, train_set, _cfg(tmp_path, steps=1))
    assert [p.name for p in out.rglob("*")] == ["checkpoint", "weights.bin"]
    assert (out / "checkpoint" / "weights.bin").read_bytes() == b"not lora_kit's"


def test_resuming_with_another_number_of_processes_warns(tmp_path: Path) -> None:
    """Allowed (a job may come back on fewer GPUs) but silent before: the sampler shards each
    epoch by rank, so the resumed run no longer sees the uninterrupted run's examples."""
    lm, train_set, _ = _setup("gpt2", tmp_path)
    with pytest.raises(_StopError):
        train(lm, train_set, _cfg(tmp_path, steps=3, save_every=1), callbacks=[_stop_at(2)])
    state_file = tmp_path / "out" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["world_size"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as written: no warning
        lm, train_set, _ = _setup("gpt2", tmp_path)
        train(lm, train_set, _cfg(tmp_path, steps=3, save_every=1), resume=True)
    state["world_size"] = 4
    torch.save(state, state_file)
    lm, train_set, _ = _setup("gpt2", tmp_path)
    with pytest.warns(UserWarning, match="written by 4 process.*with 1: the data order"):
        train(lm, train_set, _cfg(tmp_path, steps=3, save_every=1), resume=True)
