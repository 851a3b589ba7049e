"""DreamBooth LoRA training for Stable Diffusion (scripts/train_sd.py): config, caches, losses, the step, samples."""
