"""moba-edu: Mixture of Block Attention (Lu et al., 2025), rung by rung.

Public API (docs/design.md §2): `moba_attention`, `moba_attention_varlen`, the official-signature alias
`moba_attn_varlen`, the inspection API `route` with its `Routing`, and `route_indices` (the chosen
blocks alone, in bounded memory). Views live in `moba_edu.viz`, exercise checks in `moba_edu.checks`,
benchmarks in `moba_edu.bench`.
"""

from .api import moba_attention, moba_attention_varlen, moba_attn_varlen
from .decode import MobaKVCache, moba_decode
from .routing import Routing, route, route_indices

__all__ = ["moba_attention", "moba_attention_varlen", "moba_attn_varlen", "route", "route_indices", "Routing",
           "MobaKVCache", "moba_decode"]
__version__ = "0.1.0"
