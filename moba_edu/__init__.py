"""moba-edu: Mixture of Block Attention (Lu et al., 2025), rung by rung.

Public API (DESIGN.md §2): `moba_attention`, `moba_attention_varlen`, the official-signature alias
`moba_attn_varlen`, and the inspection API `route` with its `Routing`. Views live in `moba_edu.viz`,
exercise checks in `moba_edu.checks`, benchmarks in `moba_edu.bench`.
"""

from .api import moba_attention, moba_attention_varlen, moba_attn_varlen
from .decode import MobaKVCache, moba_decode
from .routing import Routing, route

__all__ = ["moba_attention", "moba_attention_varlen", "moba_attn_varlen", "route", "Routing",
           "MobaKVCache", "moba_decode"]
__version__ = "0.1.0"
