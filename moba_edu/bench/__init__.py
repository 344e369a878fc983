"""Benchmarks (docs/design.md §6): `python -m moba_edu.bench --cpu|--gpu [--only NAME ...] [--out DIR]`.

Layout (after flash-linear-attention's benchmarks/ops registry + runner, and one bench per kernel):

- harness.py       suite registry, point names, JSON files, timers (wall clock, do_bench, CUDA events),
                   peak memory, the GPU input maker
- floors.py        the GPU's ceilings (copy bandwidth, bf16 and float32 matrix rates), measured once;
                   a kernel's floor from its bytes and FLOPs (counted by `moba_edu.cost`)
- cpu.py           suite torch_vs_naive: the two PyTorch rungs on one CPU core
- explorer.py      suite explorer: one slider update of the routing dashboard
- gpu_forward.py   suites dense_sdpa, moba_fwd, moba_fwd_tiles: the Triton forward against SDPA
- gpu_backward.py  suites moba_fwd_bwd, bwd_tiles: forward + backward against SDPA
- decode.py        suite decode: one decoded token, Triton MoBA decode against SDPA decode, and its bytes
- plots.py         drawing helpers of the suites' figures
- suites.py        imports every suite module (registering it) and re-plots them all (`plot_all`)
- __main__.py      the runner

Suite modules import the harness (and floors); suites.py imports the suite modules; the runner and
`moba_edu.figures` import suites.py.
Importing this package alone imports nothing else.
"""
