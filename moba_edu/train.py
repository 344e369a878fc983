"""Train the small decoder of `moba_edu.model` on the standard-library corpus with retrieval pairs
mixed in (`moba_edu.data`), with full, MoBA or hybrid attention. Contract: docs/design.md §2b.

    python -m moba_edu.train --config tiny --attn hybrid --out /tmp/runs        # one process
    torchrun --nproc-per-node 2 -m moba_edu.train --config tiny --out /tmp/runs  # data-parallel, FSDP2

Under torchrun every rank builds the same model from the same seed, shards it with FSDP2
(`torch.distributed.fsdp.fully_shard`, NCCL on GPUs, gloo on CPUs) and draws the same global batch, of
which rank r trains rows r, r + W, ...; gradients are averaged over ranks, so W processes follow the
1-process run with the same global batch up to float rounding. Evaluation runs the same batches on
every rank; rank 0 writes the log `OUT/NAME.json` (after every evaluation) and the checkpoint.
`--throughput` times steps instead (tokens/s, peak memory) and writes `OUT/throughput-NAME-W.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data, metrics
from .model import Model, ModelConfig, hybrid_pattern


@dataclass
class TrainConfig:
    name: str
    model: ModelConfig
    seq_len: int
    batch: int                    # global: rows per step over all ranks
    steps: int
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    retrieval_frac: float = 0.5   # share of training rows with key-value pairs written in
    n_pairs: int = 4
    hybrid_last: int = 1          # full-attention layers at the end of a hybrid
    switch_at: float | None = None          # fraction of steps after which the layers become switch_layers
    switch_layers: tuple[str, ...] | None = None
    eval_every: int = 50
    eval_batch: int = 8
    distances: tuple[int, ...] = (16, 64, 128, 224)
    trail: int = 32               # trailing positions scored by the trailing-token loss
    recall_len: int = 256         # router recall on the first recall_len tokens of one sequence
    seed: int = 0


def _tiny():
    model = ModelConfig(layers=("moba",) * 2, d_model=64, n_head=4, n_kv_head=2, block_size=32, top_k=3)
    return TrainConfig("tiny", model, seq_len=256, batch=8, steps=120)


def _h200():
    """~11M parameters, 4K context: 16 blocks of 256, top_k 3 (each query reads <= 768 keys)."""
    model = ModelConfig(layers=("moba",) * 6, d_model=384, n_head=6, n_kv_head=2, block_size=256, top_k=3)
    return TrainConfig("h200", model, seq_len=4096, batch=16, steps=400, lr=2e-3, warmup=40, n_pairs=16,
                       retrieval_frac=1.0, hybrid_last=2, eval_every=100, eval_batch=16,
                       distances=(128, 512, 1024, 2048, 4000), trail=512, recall_len=2048)


def _h200_32k():
    """The h200 model at a 32K context, one sequence per GPU: for --throughput."""
    cfg = _h200()
    cfg.model.block_size, cfg.model.top_k = 512, 3
    return dataclasses.replace(cfg, name="h200-32k", seq_len=32768, batch=1, steps=20, eval_every=0)


CONFIGS = {"tiny": _tiny, "h200": _h200, "h200-32k": _h200_32k}
ATTNS = ("full", "moba", "hybrid", "moba-then-full", "full-then-moba", "dsa", "full-then-dsa")


def make_config(name: str, attn: str = "moba", **overrides) -> TrainConfig:
    """A named config with its layers set by `attn`: all full, all MoBA, a hybrid (MoBA but the last
    `hybrid_last` layers), all "dsa" (a learned token indexer at MoBA's attended keys), or a switch
    after 90% of the steps (MoBA then full, as the MoBA paper trains, or the reverse; full then dsa
    is DSA's dense warm-up of the indexer, best with an early --switch-at). `overrides` replace
    TrainConfig fields."""
    if name not in CONFIGS:
        raise ValueError(f"config: expected one of {sorted(CONFIGS)}, got {name!r}")
    if attn not in ATTNS:
        raise ValueError(f"attn: expected one of {ATTNS}, got {attn!r}")
    cfg = dataclasses.replace(CONFIGS[name](), **overrides)
    n = len(cfg.model.layers)
    first, then = attn.split("-then-") if "-then-" in attn else (attn, None)
    layers = {"full": ("full",) * n, "moba": ("moba",) * n, "hybrid": hybrid_pattern(n, cfg.hybrid_last),
              "dsa": ("dsa",) * n}
    cfg.model.layers = layers[first]
    if then is not None:
        cfg.switch_at, cfg.switch_layers = cfg.switch_at or 0.9, layers[then]
    if "dsa" in attn:
        cfg.model.index_heads = cfg.model.index_heads or 4
    cfg.name = f"{cfg.name}-{attn}"
    return cfg


EVAL_SEED = 1   # the seed of the evaluation batches: one for every run


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_batch(cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The global batch int64 [batch, seq_len + 1]: text windows, the first rows with pairs written in."""
    tokens = data.text_batch(data.corpus("train"), cfg.batch, cfg.seq_len, gen)
    rows = round(cfg.retrieval_frac * cfg.batch)
    if rows:
        tokens[:rows] = data.insert_pairs(tokens[:rows], cfg.n_pairs, gen)[0]
    return tokens


def _world():
    """(rank, world size, device) from torchrun's environment; joins the process group if W > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build(cfg: TrainConfig, device, world: int):
    """The model (seeded, sharded with FSDP2 when world > 1) and its AdamW optimizer."""
    torch.manual_seed(cfg.seed)
    model = Model(cfg.model).to(device)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    return model, opt


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, device) -> dict:
    """Validation loss, trailing-token loss, loss by position, retrieval by distance, router recall.
    The same batches at every evaluation of every run, whatever cfg.seed (EVAL_SEED), so that two seeds
    of one configuration are scored on the same text."""
    model.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED)
    val = data.corpus("val")
    with _autocast(device):
        losses = metrics.token_losses(model, data.text_batch(val, cfg.eval_batch, cfg.seq_len, gen).to(device))
        retrieval = {}
        for d in cfg.distances:
            tokens, answer = data.insert_pairs(data.text_batch(val, cfg.eval_batch, cfg.seq_len, gen), 1, gen, d)
            retrieval[str(d)] = metrics.retrieval_accuracy(model, tokens.to(device), answer.to(device))
        mqar = data.insert_pairs(data.text_batch(val, cfg.eval_batch, cfg.seq_len, gen), cfg.n_pairs, gen)
        recall_tokens = data.text_batch(val, 1, cfg.recall_len, gen)[:, :-1].to(device)
        result = {
            "val_loss": losses.mean().item(), "trail_loss": metrics.trailing_loss(losses, cfg.trail),
            "loss_by_pos": metrics.loss_by_position(losses, 16), "retrieval": retrieval,
            "mqar": metrics.retrieval_accuracy(model, mqar[0].to(device), mqar[1].to(device)),
            "recall": metrics.router_recall(model, recall_tokens, cfg.model.block_size, cfg.model.top_k),
        }
    model.train()
    return result


def _progress(steps: int, show: bool):
    """tqdm when installed and shown, else plain lines every tenth of the run (or nothing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if show and tqdm is not None:
        bar = tqdm(total=steps, desc="train")
        return lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))
    every = max(1, steps // 10)
    return lambda step, loss: show and (step + 1) % every == 0 and print(f"step {step + 1}/{steps} loss {loss:.4f}")


def _env(device, world: int, command: str | None) -> dict:
    """What a log needs to be reproduced: versions, device, ranks, corpus, and the command (CLI runs)."""
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu", "world": world, "corpus": data.corpus_info(), "command": command}


def train_step(model, opt, cfg: TrainConfig, tokens: torch.Tensor, step: int, world: int) -> float:
    """One optimizer step on this rank's rows tokens [b, seq_len + 1]; returns the language-model loss
    averaged over ranks. Indexers ("dsa" models) add their loss, whose gradient reaches them only."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    with _autocast(tokens.device):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    index_loss = model.index_loss()
    (loss if index_loss is None else loss + index_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def train(cfg: TrainConfig, out: str | Path | None = None, *, ckpt_dir: str | Path | None = None,
          progress: bool = True, command: str | None = None) -> dict:
    """Train for cfg.steps steps; returns the log {config, env, history, evals, seconds_per_step}. Rank 0
    writes it to out/NAME.json (with `out`) and the checkpoint to ckpt_dir/NAME.pt (with `ckpt_dir`).
    `command`: the command line that reproduces the run, logged in env (the CLI passes its own)."""
    rank, world, device = _world()
    if cfg.batch % world:
        raise ValueError(f"batch: the global batch {cfg.batch} must divide by the {world} processes")
    model, opt = build(cfg, device, world)
    gen = torch.Generator().manual_seed(cfg.seed)
    log = {"config": dataclasses.asdict(cfg), "env": _env(device, world, command), "history": [], "evals": []}
    tick = _progress(cfg.steps, progress and rank == 0)
    path = Path(out) / f"{cfg.name}.json" if out is not None and rank == 0 else None
    train_seconds = 0.0
    for step in range(cfg.steps):
        if cfg.switch_layers is not None and step == round(cfg.switch_at * cfg.steps):
            model.set_layers(cfg.switch_layers)
        if cfg.eval_every and step % cfg.eval_every == 0:
            log["evals"].append({"step": step, "layers": model.layers, **evaluate(model, cfg, device)})
            _write(path, log)
        start = time.perf_counter()
        loss = train_step(model, opt, cfg, train_batch(cfg, gen)[rank::world].to(device), step, world)
        log["history"].append({"step": step, "loss": loss, "lr": lr_at(cfg, step)})
        if (index_loss := model.index_loss()) is not None:   # the indexers' KL to full attention (rank 0's rows)
            log["history"][-1]["index_loss"] = index_loss.item()
        train_seconds += time.perf_counter() - start
        tick(step, log["history"][-1]["loss"])
    if cfg.eval_every:
        log["evals"].append({"step": cfg.steps, "layers": model.layers, **evaluate(model, cfg, device)})
    log["seconds_per_step"] = train_seconds / max(1, cfg.steps)
    _write(path, log)
    if ckpt_dir is not None:
        save_checkpoint(model, opt, cfg, Path(ckpt_dir) / f"{cfg.name}.pt", rank)
    return log


def _write(path: Path | None, log: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(log, indent=1))


def save_checkpoint(model, opt, cfg: TrainConfig, path: Path, rank: int) -> None:
    """Full (unsharded) model and optimizer state, gathered to rank 0, with the config."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, opt_state = get_state_dict(model, opt, options=options)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model_state, "optimizer": opt_state, "config": dataclasses.asdict(cfg)}, path)


# The tiny MoBA run committed with the repository, which the trained-model routing explorer reads (in a
# checkout; a wheel does not ship it), made by
#     python -m moba_edu.train --config tiny --attn moba --out figures/train --ckpt-dir figures/train
RUNS = Path(__file__).resolve().parent.parent / "figures" / "train"   # the committed runs, in a checkout
TINY_CHECKPOINT = RUNS / "tiny-moba.pt"


def load_model(path: str | Path, device="cpu") -> Model:
    """The model of a checkpoint written by `train`, on `device`."""
    state = torch.load(path, map_location=device, weights_only=False)
    model = Model(ModelConfig(**state["config"]["model"])).to(device)
    model.load_state_dict(state["model"])
    return model


def throughput(cfg: TrainConfig, out: str | Path | None = None, warmup: int = 3, command: str | None = None) -> dict:
    """Time cfg.steps training steps (no evaluation); the first `warmup` are left out (compilation).
    Returns {tokens_per_s, tokens_per_s_per_gpu, peak_memory_gib (max over ranks), step_seconds, ...};
    rank 0 writes it to out/throughput-NAME-W.json."""
    rank, world, device = _world()
    if cfg.steps <= warmup:
        raise ValueError(f"steps: expected more than the {warmup} warm-up steps, got {cfg.steps}")
    model, opt = build(cfg, device, world)
    gen = torch.Generator().manual_seed(cfg.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for step in range(cfg.steps):
        tokens = train_batch(cfg, gen)[rank::world].to(device)
        sync()
        start = time.perf_counter()
        train_step(model, opt, cfg, tokens, step, world)
        sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0,
                        device=device)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    median = sorted(seconds[warmup:])[len(seconds[warmup:]) // 2]
    result = {"config": dataclasses.asdict(cfg), "env": _env(device, world, command), "tokens_per_step": cfg.batch * cfg.seq_len,
              "median_step_s": median, "tokens_per_s": cfg.batch * cfg.seq_len / median,
              "tokens_per_s_per_gpu": cfg.batch * cfg.seq_len / median / world,
              "peak_memory_gib": peak.item() / 2**30 if device.type == "cuda" else None, "step_seconds": seconds}
    if rank == 0 and out is not None:
        _write(Path(out) / f"throughput-{cfg.name}-{world}.json", result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moba_edu.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--attn", default="moba", choices=ATTNS, help="layer pattern (default: moba)")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--batch", type=int, help="override the global batch (rows per step over all ranks)")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--block-size", type=int, help="override MoBA's block size")
    parser.add_argument("--top-k", type=int, help="override MoBA's top_k (own block included)")
    parser.add_argument("--key-conv", type=int, help="kernel size of a causal key convolution (FlashMoBA; 0: none)")
    parser.add_argument("--switch-at", type=float, help="fraction of steps before a *-then-* switch (default 0.9)")
    parser.add_argument("--out", default="figures/train", help="log folder (default figures/train: committed runs only)")
    parser.add_argument("--ckpt-dir", default="checkpoints", help="checkpoint folder (default checkpoints/)")
    parser.add_argument("--no-ckpt", action="store_true", help="write no checkpoint")
    parser.add_argument("--throughput", action="store_true", help="time steps: tokens/s and peak memory")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    launcher = f"torchrun --nproc-per-node {world} -m" if world > 1 else "python -m"
    command = " ".join([launcher, "moba_edu.train", *(sys.argv[1:] if argv is None else argv)])
    overrides = {key: value for key, value in [("steps", args.steps), ("batch", args.batch), ("seed", args.seed),
                                                ("switch_at", args.switch_at)] if value is not None}
    cfg = make_config(args.config, args.attn, **overrides)
    for field, value in [("block_size", args.block_size), ("top_k", args.top_k), ("key_conv", args.key_conv)]:
        if value is not None:
            setattr(cfg.model, field, value)
    if (args.block_size, args.top_k, args.key_conv) != (None, None, None):
        conv = f"-conv{cfg.model.key_conv}" if cfg.model.key_conv else ""
        cfg.name += f"-b{cfg.model.block_size}-k{cfg.model.top_k}{conv}"
    try:
        if args.throughput:
            result = throughput(cfg, args.out, command=command)
            if int(os.environ.get("RANK", 0)) == 0:
                print(json.dumps({k: result[k] for k in ("tokens_per_s", "peak_memory_gib", "median_step_s")}))
        else:
            train(cfg, args.out, ckpt_dir=None if args.no_ckpt else args.ckpt_dir, progress=not args.no_progress,
                  command=command)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
