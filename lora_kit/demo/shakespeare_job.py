"""``lorakit train --preset gpt2-shakespeare``: adapt the shipped Shakespeare GPT-2 with LoRA.

The base (1.35M parameters, BPE-4096) was pretrained on every modern-spelling Shakespeare text
except the four Roman plays. This job trains a LoRA adapter on the head of those plays and
reports held-out perplexity on their tail before and after, with seeded samples (same seed
before and after) for fixed prompts. The same :func:`adapt` trains a second adapter on modern
short posts (:func:`train_posts_adapter`) for the hot-swap demo (``lora_kit.demo.hotswap_demo``).

Everything is seeded and offline; adapters are written by :func:`lora_kit.train.train` in
PEFT's format.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..config import LoraConfig
from ..errors import ConfigError, LoraKitError
from ..model import LoraModel, inject
from ..resolve import adapter_library
from ..train import RunLogger, TrainConfig, train
from ..train.config import Schedule
from .corpora import shakespeare_gpt2_dir
from .evaluation import perplexity
from .generation import SampleSettings, one_line, sample_text
from .lm_domains import TextDomain, load_domain, pack_blocks
from .runtime import quiet_transformers, torch_threads

__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_POSTS_OUT",
    "AdaptResult",
    "AdaptSettings",
    "Sample",
    "adapt",
    "format_result",
    "load_base",
    "run",
    "train_posts_adapter",
    "train_roman_adapter",
]

DEFAULT_OUT = Path("adapters") / "gpt2-shakespeare-roman"
DEFAULT_POSTS_OUT = Path("adapters") / "gpt2-shakespeare-posts"


@dataclass(frozen=True)
class AdaptSettings:
    """Settings of one adaptation run; the defaults are what the preset runs.

    Attributes:
        steps: Optimizer steps.
        rank: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / rank``).
        targets: LoRA target preset or module suffixes.
        lr: Peak AdamW learning rate.
        batch_size: Blocks per step.
        block_size: Tokens per training block.
        warmup_steps: Linear warm-up steps.
        schedule: Learning-rate schedule after warm-up.
        seed: Seeds the adapter initialisation and the data order.
        eval_tokens: Held-out tokens scored (from the start of the held-out text; None: all).
        eval_block: Tokens per scored block (at most the base's 256 positions).
        sample: Seed and sampling parameters of the sample generations.
        threads: torch intra-op threads during the run, restored after (None: leave as is);
            1 by default, see `lora_kit.demo.runtime.torch_threads`.
    """

    steps: int = 100
    rank: int = 16
    alpha: float = 32.0
    targets: str = "gpt2-all"
    lr: float = 1e-2
    batch_size: int = 8
    block_size: int = 128
    warmup_steps: int = 10
    schedule: Schedule = "linear"
    seed: int = 0
    eval_tokens: int | None = 16384
    eval_block: int = 256
    sample: SampleSettings = field(default_factory=SampleSettings)
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise ConfigError(f"AdaptSettings.eval_tokens must be >= 2, got {self.eval_tokens}")
        if self.eval_block < 2:
            raise ConfigError(f"AdaptSettings.eval_block must be >= 2, got {self.eval_block}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"AdaptSettings.threads must be >= 1 or None, got {self.threads}")

    def train_config(self, out: Path) -> TrainConfig:
        """The trainer's config for this run, writing to ``out`` (validated)."""
        return TrainConfig(
            out=str(out),
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            max_length=self.block_size,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            seed=self.seed,
            precision="fp32",
            eval_fraction=0.0,
        )


@dataclass(frozen=True)
class Sample:
    """One prompt and its seeded continuations before and after adaptation."""

    prompt: str
    before: str
    after: str


@dataclass(frozen=True)
class AdaptResult:
    """What one adaptation run measured and wrote.

    Attributes:
        domain: The text domain adapted to.
        adapter: The adapter directory (PEFT format).
        perplexity_before: Held-out perplexity of the base.
        perplexity_after: Held-out perplexity with the adapter.
        steps: Optimizer steps taken.
        train_tokens: Tokens the adapter was trained on (steps x batch x block).
        eval_tokens: Held-out tokens scored.
        trainable_parameters: Adapter parameters.
        train_seconds: Wall time of training alone.
        seconds: Wall time of the whole run (loading, scoring, sampling, training, saving).
        samples: Seeded sample generations.
        settings: The settings used.
    """

    domain: str
    adapter: str
    perplexity_before: float
    perplexity_after: float
    steps: int
    train_tokens: int
    eval_tokens: int
    trainable_parameters: int
    train_seconds: float
    seconds: float
    samples: tuple[Sample, ...]
    settings: dict[str, Any]

    @property
    def improved(self) -> bool:
        """Whether held-out perplexity went down."""
        return self.perplexity_after < self.perplexity_before

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        return asdict(self)


def run(out: Path | None = None, json_output: bool = False, quiet: bool = False) -> int:
    """``lorakit train --preset gpt2-shakespeare``: adapt to the Roman plays, print, exit code.

    Args:
        out: Adapter directory (default ``gpt2-shakespeare-roman`` in the adapter library:
            ``$LORA_KIT_ADAPTERS``, else ``./adapters``).
        json_output: Print one JSON object (no progress bar) instead of the human summary.
        quiet: No progress bar or progress lines.

    Returns:
        0 when held-out perplexity went down; 1 when it did not, or on a lora_kit error
        (``error: ...`` on stderr).
    """
    try:
        out = out or adapter_library() / DEFAULT_OUT.name
        result = train_roman_adapter(out, quiet=quiet or json_output)
    except LoraKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if json_output:
        print(json.dumps(result.to_json(), sort_keys=True))
    else:
        print(format_result(result))
    return 0 if result.improved else 1


def train_roman_adapter(
    out: Path = DEFAULT_OUT, settings: AdaptSettings | None = None, *, quiet: bool = True
) -> AdaptResult:
    """Adapt the base to the held-out Roman plays (what the preset runs); see :func:`adapt`."""
    return adapt("roman", out, settings or AdaptSettings(), quiet=quiet)


def train_posts_adapter(
    out: Path = DEFAULT_POSTS_OUT, settings: AdaptSettings | None = None, *, quiet: bool = True
) -> AdaptResult:
    """Adapt the base to modern short posts (the hot-swap demo's second adapter)."""
    return adapt("posts", out, settings or AdaptSettings(), quiet=quiet)


def load_base() -> tuple[PreTrainedModel, Any]:
    """The shipped Shakespeare GPT-2 (fp32, eval mode) and its tokenizer.

    Raises:
        DemoDataError: The asset is missing.
    """
    folder = shakespeare_gpt2_dir()
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def adapt(domain: str, out: Path, settings: AdaptSettings, *, quiet: bool = True) -> AdaptResult:
    """Train a LoRA adapter on ``domain`` and score it against the base.

    Loads the base and injects a fresh adapter (seeded); scores held-out perplexity and draws
    seeded samples with the adapter disabled (the base alone), trains the adapter on the
    domain's training text, then scores and samples again with the same seed and tokens. The
    trainer writes the adapter, ``metrics.jsonl`` and ``checkpoint/`` to ``out``.

    Args:
        domain: ``roman`` or ``posts`` (see `lora_kit.demo.lm_domains`).
        out: Adapter directory.
        settings: What to run.
        quiet: No progress bar or progress lines.

    Returns:
        Perplexities, samples, timings and the adapter path.

    Raises:
        DemoDataError: A demo package or the base asset is missing.
        ConfigError: Settings that do not fit the base (e.g. blocks longer than its positions).
        LoraKitError: Any training or saving error.
    """
    with torch_threads(settings.threads):
        return _adapt(domain, out, settings, quiet)


def _adapt(domain: str, out: Path, settings: AdaptSettings, quiet: bool) -> AdaptResult:
    started = time.perf_counter()
    config = settings.train_config(out)  # validated before anything is loaded
    base, tokenizer = load_base()
    _check_fits(settings, int(base.config.n_positions))
    texts = load_domain(domain, tokenizer)
    train_set = pack_blocks(texts.train_ids, settings.block_size, int(tokenizer.eos_token_id))
    say = _say(quiet)

    lora = LoraConfig(r=settings.rank, alpha=settings.alpha, targets=settings.targets)
    torch.manual_seed(settings.seed)  # reproducible adapter initialisation
    lm = inject(base, lora, config.adapter_name).eval()
    with quiet_transformers():
        with lm.disabled():  # the base alone
            before = _score(lm, texts, settings)
            samples_before = _samples(lm, tokenizer, texts, settings)
        params = sum(p.numel() for p in lm.adapter_parameters(config.adapter_name))
        say(
            f"{domain}: {texts.description}; base held-out perplexity {before:.1f}; "
            f"LoRA {settings.targets} r={settings.rank} ({params:,} parameters), "
            f"{settings.steps} steps of {settings.batch_size}x{settings.block_size} tokens"
        )
        train_started = time.perf_counter()
        result = train(lm, train_set, config, logger=RunLogger(out, quiet=quiet))
        train_seconds = time.perf_counter() - train_started
        lm.eval()
        after = _score(lm, texts, settings)
        samples_after = _samples(lm, tokenizer, texts, settings)

    return AdaptResult(
        domain=domain,
        adapter=str(result.adapter_path),
        perplexity_before=before,
        perplexity_after=after,
        steps=result.steps,
        train_tokens=result.steps * settings.batch_size * settings.block_size,
        eval_tokens=texts.scored_tokens(settings.eval_tokens),
        trainable_parameters=params,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
        samples=tuple(
            Sample(p, b, a)
            for p, b, a in zip(texts.prompts, samples_before, samples_after, strict=True)
        ),
        settings=asdict(settings),
    )


def format_result(result: AdaptResult) -> str:
    """The human summary printed by the preset."""
    change = 100.0 * (result.perplexity_after / result.perplexity_before - 1.0)
    rows = [
        f"Shakespeare GPT-2 + LoRA on {result.domain!r}: {result.steps} steps, "
        f"{result.train_tokens:,} training tokens, {result.trainable_parameters:,} adapter "
        f"parameters, trained in {result.train_seconds:.0f} s",
        f"held-out perplexity ({result.eval_tokens:,} tokens): "
        f"{result.perplexity_before:.1f} -> {result.perplexity_after:.1f} ({change:+.1f}%)",
    ]
    seed = result.settings["sample"]["seed"]
    for sample in result.samples:
        rows.append(f"sample, seed {seed}, prompt {sample.prompt!r}:")
        rows.append(f"  before: {one_line(sample.before)}")
        rows.append(f"  after:  {one_line(sample.after)}")
    rows.append(f"adapter: {result.adapter}  (total {result.seconds:.0f} s)")
    if not result.improved:
        rows.append("perplexity did not go down: the adapter did not help")
    return "\n".join(rows)


# ---- helpers -------------------------------------------------------------------------------


def _check_fits(settings: AdaptSettings, positions: int) -> None:
    for name in ("block_size", "eval_block"):
        value = getattr(settings, name)
        if value > positions:
            raise ConfigError(
                f"AdaptSettings.{name}={value} exceeds the base's {positions} positions"
            )


def _score(model: torch.nn.Module, texts: TextDomain, settings: AdaptSettings) -> float:
    return perplexity(model, texts.eval_ids, settings.eval_block, settings.eval_tokens)


def _samples(
    model: LoraModel, tokenizer: Any, texts: TextDomain, settings: AdaptSettings
) -> list[str]:
    return [sample_text(model, tokenizer, p, settings.sample) for p in texts.prompts]


def _say(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    return say
