"""DreamBooth LoRA training for the DiT families (Flux.1, Flux.2-klein, SD 3.x, Qwen-Image, Z-Image) with flow
matching; scripts/train_sd.py dispatches here when its model is one. flow (noise levels, their densities and
weights, the image-size shift), encode (text embeddings cached once per caption, latent normalisation per family),
step (the family's transformer call and the loss), train (the run: build, loop, save; the SD recipe's loop pieces)."""
