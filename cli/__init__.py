"""The `lorakit` command line (installed as the `lora_kit_cli` package)."""
