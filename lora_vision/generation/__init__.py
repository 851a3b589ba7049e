"""Text-to-image generation with adapters, in one place.

- `prompts`: A1111 conventions (`<lora:name:...>` prompt tags, LoRA folders, the "parameters" infotext).
- `images`: the one PNG writer (optional infotext and JSON sidecar) and the one grid maker (optional labels), used
  here and by training (class images, validation grids, strength sweeps).
- `run`: `GenerateConfig` and `generate`, what `lora-vision generate` and scripts/generate.py run.
"""

from .images import make_grid, save_png
from .run import GenerateConfig, generate, load_pipeline

__all__ = ["GenerateConfig", "generate", "load_pipeline", "make_grid", "save_png"]
