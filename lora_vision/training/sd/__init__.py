"""DreamBooth LoRA training for Stable Diffusion (scripts/train_sd.py): config, caching (data and its caches),
losses, step (one training step, eager or static), loop (the loop's state: steps, loss log, checkpoints, resume),
lora (injection, optimizer groups, the adapter file), samples (class images, validation grids, strength sweep)."""
