"""`lorakit train`: train a LoRA adapter on a text or classification data set."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from lora_kit.errors import ConfigError, LoraKitError
from lora_kit.resolve import adapter_library

from ._tooling import os_error_text

EMBEDDED_JOBS = {
    "bert-sentiment": "lora_kit.demo.default_job",
    "gpt2-shakespeare": "lora_kit.demo.shakespeare_job",
}
"""``--preset`` names: each module's ``run(out=, json_output=, quiet=)`` returns an exit code."""
DEFAULT_PRESET = "bert-sentiment"
PRESET_OPTIONS = frozenset({"preset", "out", "json_output", "quiet"})
"""Options an embedded job accepts; any other option given with it is a usage error."""

_HELP = """Train a LoRA adapter; only the adapter (and a classifier head) is trained.

The task is inferred from the model. A causal LM (e.g. GPT-2) learns from a .txt file, a folder of them, or a .jsonl/.csv --text-field, packed into blocks of --max-length tokens. A sequence classifier (e.g. BERT) learns --label-field from a .jsonl/.csv; its head is trained and saved with the adapter (label names in labels.json). --eval-fraction of the data (10%) is held out for evaluation.

The output directory holds the adapter (PEFT format), metrics.jsonl and a checkpoint/ that --resume continues from. Under torchrun, add --strategy ddp or fsdp.

Examples:

  lorakit train --model gpt2 --data corpus.txt --steps 500 --out adapters/poems

  lorakit train --model ./bert-base --data reviews.csv --text-field review --label-field stars

  torchrun --nproc_per_node=2 --no-python lorakit train --model gpt2 --data corpus/ --strategy ddp

Embedded jobs (offline, real pretrained models and text; see the README):

  lorakit train                              # = --preset bert-sentiment: MiniLM BERT, 3-class
                                             #   sentiment, head-only vs LoRA + head

  lorakit train --preset gpt2-shakespeare    # the shipped Shakespeare GPT-2 adapted to the
                                             #   held-out Roman plays, perplexity before/after
"""  # noqa: E501


def train_command(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None, "--model", help="Base model: a local folder or a Hugging Face Hub id (cache first)."
    ),
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Training data: .txt file or folder, .jsonl or .csv."),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets",
            help="A preset (gpt2-all, bert-qv, ...) or module-name suffixes (repeat the "
            "option). Default: the model type's preset.",
        ),
    ] = None,
    r: int = typer.Option(8, "-r", "--rank", help="LoRA rank."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (update scaled by alpha/r)."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the adapter input."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU; bf16 on a GPU, fp16 if it lacks bf16).",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Passes over the data (default 1)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (instead of epochs)."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per block / example."),
    schedule: str = typer.Option("linear", "--schedule", help="constant | linear | cosine."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Gradient norm clip (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, dropout and data order."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: end)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (0: end)."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Held-out share (0: none)."),
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (default: <data name> in the adapter library, "
            "$LORA_KIT_ADAPTERS, else ./adapters).",
        ),
    ] = None,
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/checkpoint."),
    strategy: str = typer.Option("none", "--strategy", help="none | ddp | fsdp (torchrun)."),
    task: str = typer.Option("auto", "--task", help="auto | causal-lm | seq-cls."),
    text_field: str = typer.Option("text", "--text-field", help="Text column of .jsonl/.csv."),
    label_field: str = typer.Option("label", "--label-field", help="Label column (seq-cls)."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute base activations to save memory."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON result, no bar."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notices."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help=f"Run an embedded job: {' | '.join(EMBEDDED_JOBS)} (the default with no --model "
        "and --data). Takes only --out, --json and --quiet.",
    ),
) -> None:
    if preset is not None or (model is None and data is None):
        name = preset or DEFAULT_PRESET
        extra = sorted(
            max(param.opts, key=len)
            for param in ctx.command.params
            if param.name and param.name not in PRESET_OPTIONS and _given(ctx, param.name)
        )
        if extra:
            _usage(f"--preset {name} runs with its own settings; drop {', '.join(extra)}")
        raise typer.Exit(_run_embedded_job(name, out, json_output, quiet))
    if model is None or data is None:
        _usage("give both --model and --data (or neither, for the embedded default job)")
        return
    if epochs is not None and steps is not None:
        _usage("give --epochs or --steps, not both")
    try:
        from lora_kit.train import TrainConfig
        from lora_kit.train.config import check_out_dir

        config = TrainConfig(
            lr=lr,
            epochs=epochs if epochs is not None else 1,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_length=max_length,
            precision=precision,  # type: ignore[arg-type]  # validated by TrainConfig
            schedule=schedule,  # type: ignore[arg-type]
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            seed=seed,
            save_every=save_every,
            eval_every=eval_every,
            eval_fraction=eval_fraction,
            out=str(out or adapter_library() / (data.stem or "adapter")),
            gradient_checkpointing=gradient_checkpointing,
            strategy=strategy,  # type: ignore[arg-type]
        )
        check_out_dir(config.out)
        if task not in ("auto", "causal-lm", "seq-cls"):
            raise ConfigError(f"--task must be auto, causal-lm or seq-cls, got {task!r}")
    except ConfigError as exc:
        _usage(str(exc))
    try:
        from lora_kit.train.job import TrainJob, run_job

        job = TrainJob(
            model=model,
            data=data,
            config=config,
            targets=tuple(targets) if targets else None,
            r=r,
            alpha=alpha,
            dropout=dropout,
            task=task,
            text_field=text_field,
            label_field=label_field,
            resume=resume,
            quiet=quiet or json_output,
        )
        summary = run_job(job)
    except ConfigError as exc:
        _usage(str(exc))
    except LoraKitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # e.g. an --out in a folder it cannot write, or unreadable data
        typer.echo(f"error: {_os_error(exc, config.out)}", err=True)
        raise typer.Exit(1) from None
    if summary is None:  # not rank 0
        return
    if json_output:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    typer.echo(f"adapter: {summary['adapter']}")
    metrics = summary["metrics"]
    if metrics:
        typer.echo("eval:    " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    typer.echo(f"merge:   {summary['merge_command']}")


train_command.__doc__ = _HELP


def _os_error(exc: OSError, out: str) -> str:
    """``exc`` as one line, said to be about writing the run only when its path is in ``out``
    (an unreadable --data file or base is an OSError too)."""
    name = exc.filename
    inside = isinstance(name, str) and Path(name).absolute().is_relative_to(Path(out).absolute())
    return f"{'cannot write the run: ' if inside else ''}{os_error_text(exc)}"


def _given(ctx: typer.Context, key: str) -> bool:
    """Whether option ``key`` came from the command line (or environment), not its default."""
    source = ctx.get_parameter_source(key)
    return source is not None and source.name != "DEFAULT"


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _run_embedded_job(name: str, out: Path | None, json_output: bool, quiet: bool) -> int:
    """Hand over to an embedded job's ``run(out=, json_output=, quiet=)``."""
    module = EMBEDDED_JOBS.get(name)
    if module is None:
        _usage(f"--preset must be one of {', '.join(EMBEDDED_JOBS)}, got {name!r}")
    if importlib.util.find_spec(module) is None:
        typer.echo(
            f"error: this build has no embedded job {name!r} ({module}); "
            f"pass --model PATH_OR_HUB_ID --data PATH",
            err=True,
        )
        return 2
    job: Any = importlib.import_module(module)
    return int(job.run(out=out, json_output=json_output, quiet=quiet))
