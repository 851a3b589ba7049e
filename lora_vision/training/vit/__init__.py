"""ViT classification training (scripts/train_vit.py, scripts/eval_vit.py): config, data order, evaluation,
comparison, pure-bf16 master weights."""
