"""`lorakit generate`: continue prompts with a causal LM, one adapter per prompt, in one batch."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import typer

from lora_kit import LoraModel
from lora_kit.base_model import load_base, load_tokenizer
from lora_kit.errors import LoraKitError

from ._tooling import errors_to_exit
from .serving import (
    BASE,
    AdapterOption,
    assign_rows,
    check_not_empty,
    emit,
    load_adapters,
    parse_adapter,
    position_limit,
)


def generate(
    base: Annotated[str, typer.Argument(help="Base model: a transformers folder or a Hub id.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeatable.")],
    adapter: AdapterOption = None,
    prompt_adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt-adapter",
            help=f"Adapter name (or '{BASE}') for each --prompt, in order. Without it every prompt "
            f"is run with the base model and with each adapter, side by side.",
        ),
    ] = None,
    max_new_tokens: int = typer.Option(20, min=1, help="Tokens to generate per prompt."),
    check_base: bool = typer.Option(True, help="Verify each adapter's base fingerprint."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Generate text with several adapters on one base model, all rows in one batch.

    All adapters stay loaded; each row of the batch uses its own (hot-swapping per row, no
    reloading). Greedy decoding, so results are reproducible.

    Example: lorakit generate gpt2 -a shakespeare -a sst -p "To be" -p "The film"
    --prompt-adapter shakespeare --prompt-adapter base
    """
    with errors_to_exit():
        names = [parse_adapter(spec)[0] for spec in adapter or []]
        texts, rows = assign_rows(prompt, names, prompt_adapter or None, "--prompt-adapter")
        records = _generate(base, adapter or [], texts, rows, max_new_tokens, check_base)
    emit(records, as_json, lambda r: f"[{r['adapter'] or BASE}] {r['prompt']!r} -> {r['text']!r}")


def _generate(
    base: str,
    adapters: list[str],
    texts: list[str],
    rows: list[str | None],
    max_new_tokens: int,
    check_base: bool,
) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise LoraKitError(f"base {base!r} has no tokenizer files; save one next to the model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues at the right edge
    check_not_empty(tokenizer, texts, "--prompt")
    lm = LoraModel(load_base(base))
    load_adapters(lm, adapters, check_base=check_base)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    limit = position_limit(lm.model, tokenizer)
    if limit is not None and batch["input_ids"].shape[1] + max_new_tokens > limit:
        raise typer.BadParameter(
            f"the longest prompt has {batch['input_ids'].shape[1]} tokens; with "
            f"--max-new-tokens {max_new_tokens} that exceeds the model's {limit} positions: "
            f"shorten the prompt or lower --max-new-tokens",
            param_hint="--max-new-tokens",
        )
    with torch.no_grad():
        out = lm.generate(
            **batch,
            adapter_names=rows,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [
        {"prompt": text, "adapter": row, "text": gen}
        for text, row, gen in zip(texts, rows, decoded, strict=True)
    ]
