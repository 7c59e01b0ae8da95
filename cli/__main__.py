"""``python -m lora_kit_cli``: the same as the ``lorakit`` console script."""

from lora_kit_cli.app import main

main()
