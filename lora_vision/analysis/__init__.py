"""What did the adapter learn? The LoRA paper's analysis (Hu et al. 2021, section 7) for our adapters.

`analyze` gives per-layer update norms, singular values, effective ranks, the section 7.2 subspace similarity of
two adapters and the section 7.3 amplification numbers; `plots` draws them; `lora-vision analyze` runs both.
"""

from .linalg import (LowRankSVD, amplification, effective_rank, energy_rank, lowrank_svd, projection_norm,
                     random_orthonormal, random_projection_norm, row_space, subspace_similarity)
from .report import AnalysisOptions, analyze, layer_stats, suggested_ranks, top_singular_values
from .sources import BaseWeights, LayerFactors, adapter_layers

__all__ = [
    "AnalysisOptions", "BaseWeights", "LayerFactors", "LowRankSVD", "adapter_layers", "amplification", "analyze",
    "effective_rank", "energy_rank", "layer_stats", "lowrank_svd", "projection_norm",
    "random_orthonormal", "random_projection_norm", "row_space", "subspace_similarity", "suggested_ranks",
    "top_singular_values",
]
