"""`lorakit demo`: the inject -> save -> reload -> PEFT comparison on tiny models."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from lora_kit.roundtrip import run_roundtrip

# Reloading must be exact; PEFT computes the same fp32 update with other kernels.
PEFT_TOLERANCE = 1e-5


def demo(
    out: Path = typer.Option(Path("adapters"), help="Where the demo adapters are written."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
) -> None:
    """Check lora_kit end to end on tiny GPT-2 and BERT models built from config.

    Injects an adapter, saves it in PEFT's format, reloads it into a fresh base with lora_kit
    and with PEFT (if installed), and prints the largest logit differences. Exit code 1 if the
    reload is not bit-identical or PEFT differs by more than 1e-5.
    """
    results = run_roundtrip(out)
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
        typer.echo("OK: saved adapters reload exactly and match PEFT" if ok else "MISMATCH")
    raise typer.Exit(0 if ok else 1)
