"""Views of the router: matplotlib figures and an ipywidgets dashboard (`explore`).

Importing this package imports matplotlib and ipywidgets; `import moba_edu` alone imports neither.
Every figure function draws into a given `ax` (or `fig`) or makes its own, and returns it.

- maps:    token mask and block routing map of a head; `text_block_map` prints it with ██ / ░░
- scores:  the router's scores with the chosen blocks marked and the ineligible region shaded
- heads:   per-head routing maps side by side; how often each block is chosen
- quality: attention mass the router keeps vs an oracle, recall over top_k
- cost:    density and FLOPs of MoBA vs dense attention as S grows (numbers: `moba_edu.cost`)
- presets: random, needle and periodic queries and keys
- text_routing: a trained model's routing on a byte text, its blocks shown as text
- explore: the live dashboard; explore_model: the same for a trained model on real text;
  gallery: writes the committed figures
"""

from ..cost import attended_pairs, density, flops  # the cost model, re-exported for notebooks
from .cost import plot_cost
from .explore import Explorer, explore
from .explore_model import ModelExplorer, explore_model
from .heads import block_frequency, plot_block_frequency, plot_heads
from .maps import block_states, plot_block_map, plot_token_mask, text_block_map, token_states
from .presets import PRESETS, Sample, make_sample
from .quality import (RecallCurve, attention_probs, block_mass, oracle_mass, oracle_order, plot_query_mass,
                      plot_recall, recall_curve, routed_mass)
from .scores import plot_query_scores, plot_scores
from .text_routing import attended_blocks, byte_glyphs, model_routing, text_map_html, text_tokens

__all__ = [
    "attended_pairs", "density", "flops", "plot_cost", "Explorer", "explore", "plot_scores",
    "plot_query_scores", "block_frequency", "plot_block_frequency", "plot_heads", "block_states",
    "plot_block_map", "plot_token_mask", "text_block_map", "token_states", "PRESETS", "Sample", "make_sample",
    "RecallCurve", "attention_probs", "block_mass", "oracle_mass", "oracle_order", "plot_query_mass",
    "plot_recall", "recall_curve", "routed_mass", "ModelExplorer", "explore_model", "attended_blocks",
    "byte_glyphs", "model_routing", "text_map_html", "text_tokens",
]
