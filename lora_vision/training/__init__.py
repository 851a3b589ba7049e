"""Training recipes: shared pieces at the top, one sub-package per recipe.

- `config.py` (flags + YAML -> frozen config dataclass), `optim.py` (AdamW, LR schedules), `checkpoint.py` (resumable
  checkpoints and the run lifecycle: atomic folders, optimizer and RNG states, resume checks, Ctrl-C),
  `first_step.py` (the time-to-first-step line): both recipes.
- `sd/`: DreamBooth LoRA for Stable Diffusion (scripts/train_sd.py).
- `dit/`: the same DreamBooth recipe for the flow-matching DiT families (Flux.1/2, SD 3.x, Qwen-Image, Z-Image).
- `vit/`: ViT classification with LoRA, full fine-tuning or a linear probe (scripts/train_vit.py, eval_vit.py).

Dependency rule: training imports the lora_vision core, formats, models and data; never scripts or the CLI.
"""
