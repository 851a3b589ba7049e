"""Subcommands of the `lora-vision` CLI, one module each (see lora_vision/cli.py)."""
