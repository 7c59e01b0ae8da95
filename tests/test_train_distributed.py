"""Two CPU processes with gloo: DDP, FSDP2 and user-wrapped FSDP1/FSDP2 models vs one process.

One ``torch.multiprocessing`` spawn runs all three strategies in turn (imports are the slow
part). Each 2-process run uses micro-batches of 2 per rank, the single-process reference one
batch of 4: the DistributedSampler gives rank r the permutation's ``r::2`` slice, so every step
sees the same 4 examples. Gradients differ only by fp32 reduction order (all-reduce average vs
one batch mean, ~1e-7 relative); after 3 Adam steps (lr 1e-2) the adapters agree within
rtol 1e-4 / atol 1e-5. A DDP and an FSDP2 run interrupted and resumed must equal their
uninterrupted twins bit for bit (DDP also with dropout and per-rank RNG streams);
DDP beside an inactive adapter trains as without it, and its flags are put back (FSDP2 too).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from train_helpers import encode, tiny_gpt2, write_text

import lora_kit as lk
from lora_kit.train import StepInfo, TrainConfig, load_causal_lm, train

MODES = ("ddp", "fsdp", "fsdp1", "fsdp2-user")
STEPS = 3


def _model(dropout: float = 0.0) -> lk.LoraModel:
    torch.manual_seed(1)
    config = lk.LoraConfig(r=4, targets="gpt2-all", dropout=dropout)
    return lk.inject(tiny_gpt2(dropout), config)


def _config(out: Path, batch_size: int, strategy: str = "none") -> TrainConfig:
    return TrainConfig(
        out=str(out), steps=STEPS, batch_size=batch_size, lr=1e-2, eval_fraction=0.0,
        strategy=strategy, save_every=2,  # type: ignore[arg-type]
    )  # fmt: skip


def _worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    data = load_causal_lm(Path(tmp) / "a.txt", encode, max_length=16, eos_id=0)
    for mode in MODES:
        lm = _model()
        model: torch.nn.Module = lm
        strategy = mode if mode in ("ddp", "fsdp") else "none"
        if mode == "fsdp1":  # the user wraps the LoraModel in FSDP1 themselves
            model = FullyShardedDataParallel(
                lm, use_orig_params=True, device_id=torch.device("cpu")
            )
        elif mode == "fsdp2-user":  # the user shards the whole model in one FSDP2 group
            fully_shard(lm)
        train(model, data, _config(Path(tmp) / mode, batch_size=2, strategy=strategy))
    for strategy in ("ddp", "fsdp"):  # interrupted after step 3, resumed from step 2
        out = Path(tmp) / f"{strategy}-resumed"
        with contextlib.suppress(_StopError):
            train(_model(), data, _config(out, 2, strategy), callbacks=[_stop_at_last])
        train(_model(), data, _config(out, 2, strategy), resume=True)
    # Beside an inactive adapter, which the forward pass does not use (DDP failed in step 2
    # waiting for its gradients): the same training as "ddp" (same init, seeded before it).
    lm = _model()
    lm.add_adapter("other", lk.LoraConfig(r=4, targets="gpt2-all"))
    train(lm, data, _config(Path(tmp) / "ddp-two-adapters", 2, "ddp"))
    assert all(p.requires_grad for p in lm.adapter_parameters("other"))  # flags put back
    # FSDP2 replaces the parameters with sharded ones: the flags are put back on those.
    lm = _model()
    lm.add_adapter("other", lk.LoraConfig(r=4, targets="gpt2-all"))
    train(lm, data, _config(Path(tmp) / "fsdp-two-adapters", 2, "fsdp"))
    assert all(p.requires_grad for p in lm.adapter_parameters("other")), "fsdp: flags not back"
    # Each rank's RNG its own (as each GPU's generator is: rank 1 here draws once more before
    # step 2), dropout on: a resume restores every rank's, not rank 0's on all.
    out = Path(tmp) / "ddp-dropout"
    for run in ("straight", "resumed"):
        stop = [_stop_at_last] if run == "resumed" else []
        with contextlib.suppress(_StopError):
            train(_model(0.1), data, _config(out / run, 2, "ddp"), callbacks=[_rank_rng, *stop])
    train(_model(0.1), data, _config(out / "resumed", 2, "ddp"), resume=True)
    dist.destroy_process_group()


def _rank_rng(info: StepInfo) -> None:
    import torch.distributed as dist

    if info.step == 1 and dist.get_rank() == 1:
        torch.rand(3)


class _StopError(Exception):
    pass


def _stop_at_last(info: StepInfo) -> None:
    if info.step == STEPS:
        raise _StopError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_runs_match_one_process(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    # join(timeout) returns False while running; a hung collective fails the test, not CI.
    for _ in range(180):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        raise AssertionError("2-process training did not finish within 180 s")

    data = load_causal_lm(tmp_path / "a.txt", encode, max_length=16, eos_id=0)
    reference = load_file(
        str(train(_model(), data, _config(tmp_path / "single", 4)).adapter_path
            / "adapter_model.safetensors")
    )  # fmt: skip
    for mode in MODES:
        got = load_file(str(tmp_path / mode / "adapter_model.safetensors"))
        assert got.keys() == reference.keys(), mode
        for key, value in reference.items():
            assert got[key].shape == value.shape, (mode, key)  # gathered, not a shard
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{mode} {key}")
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == STEPS + 1, mode  # rank 0 alone logged
    for strategy in ("ddp", "fsdp"):
        # Resume under DDP/FSDP2 (optimizer state gathered to full and re-sharded on load)
        # reproduces the uninterrupted run exactly.
        straight = load_file(str(tmp_path / strategy / "adapter_model.safetensors"))
        resumed = load_file(str(tmp_path / f"{strategy}-resumed" / "adapter_model.safetensors"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), strategy
    beside = load_file(str(tmp_path / "ddp-two-adapters" / "adapter_model.safetensors"))
    straight = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], beside[k]) for k in straight)
    straight, resumed = (
        load_file(str(tmp_path / "ddp-dropout" / run / "adapter_model.safetensors"))
        for run in ("straight", "resumed")
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_collectives_run_on_the_compute_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's counts and losses live on the CPU; NCCL (the group on CUDA) reduces only
    CUDA tensors, so reducing them where they were failed in the first step of a multi-GPU
    run. The 2-process test above runs gloo on CPU, where both places are one."""
    import torch.distributed as dist

    from lora_kit.train.distributed import DistContext, all_reduce_sum

    seen: list[torch.device] = []

    def fake_all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        seen.append(tensor.device)
        raise _ReducedError

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    ctx = DistContext(rank=0, world_size=2, device=torch.device("meta"))  # stands in for cuda
    with pytest.raises(_ReducedError):
        all_reduce_sum(torch.tensor([1.0, 2.0]), ctx)
    assert seen == [torch.device("meta")]
    monkeypatch.undo()
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: tensor.mul_(2))
    values = torch.tensor([1.0, 2.0])
    cpu = DistContext(rank=0, world_size=2, device=torch.device("cpu"))
    assert torch.equal(all_reduce_sum(values, cpu), torch.tensor([2.0, 4.0]))
    assert torch.equal(values, torch.tensor([1.0, 2.0]))  # the input is left as it was


class _ReducedError(Exception):
    """Stops the fake collective once it has seen its tensor."""
