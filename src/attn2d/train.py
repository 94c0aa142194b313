"""Sequence-parallel training of the GPT model, and the entry point `python -m attn2d.train` (Hydra).

Sequence parallelism (every rank of the grid holds the same model and a shard of every sequence):
- tokens: rank p holds the positions its attention's layout gives it (`cyclic` for Attention2D, `zigzag` or
  `contiguous` for Ring, `full` for the single-process oracle) and feeds the model those *global* positions;
- loss: this rank's token cross-entropies summed and divided by the GLOBAL token count B*N, so the sum over ranks
  is the mean loss of the whole batch (the attention's backward carries each rank's gradient to the others' q/k/v);
- parameter gradients: summed over the ranks (one counted all-reduce per 64 MiB bucket, op "grad_all_reduce"), or,
  with `benchmark.fsdp`, reduce-scattered by FSDP2 (`fully_shard` per block and at the root, divide factor 1 so the
  sum stays a sum) which also shards parameters and optimizer state; FSDP2's collectives are counted too
  (attn2d.distributed.fsdp_counter, ops fsdp_param_all_gather and fsdp_grad_reduce_scatter);
- optional activation checkpointing (per block) and bf16 autocast (fp32 parameters and gradients).

The same `train_step` runs under torchrun, under submitit (attn2d.distributed.init_distributed exports the
environment) and as plain python (world size 1); tests call it through attn2d.testing.run_distributed. The
gradient synchronisation is attn2d.distributed.parallelize's, what a record says (provenance included)
attn2d.records'.
"""
from __future__ import annotations

import os
import sys
import traceback

import hydra
import submitit
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from attn2d import bench, records
from attn2d.attention import get_attention, layout
from attn2d.attention.checks import RankMismatchError, check_heads
from attn2d.config import ConfigError, Settings, timeout_s_of, validate
from attn2d.distributed import GridError, ProcessGrid, count_comm, destroy_distributed, health, init_distributed
from attn2d.distributed.health import CollectiveError
from attn2d.distributed.parallelize import fsdp_sharder, synced_gradients, uncounted_fsdp_ops
from attn2d.distributed.wire import check_node, read_wire, wire_delta
from attn2d.model import GPT, shard_loss_sum


# ---------------------------------------------------------------------------------------------- sequence parallelism
class SequenceParallel:
    """This rank's part of sequence parallelism: the process grid, the attention and its token layout.

    grid=None means one process without torch.distributed (the single-device reference)."""

    def __init__(self, attention: str, causal: bool = True, grid: ProcessGrid | None = None, heads: int | None = None):
        self.impl, self.causal, self.grid, self.heads = get_attention(attention), causal, grid, heads
        self._pos: dict = {}

    @property
    def group(self):
        return self.grid.group if self.grid is not None else None

    def positions(self, seq_len: int, device) -> torch.Tensor:
        """Global positions (N/P,) of this rank's tokens, in the attention's layout."""
        key = (seq_len, str(device))
        if key not in self._pos:
            if self.grid is None or self.impl.layout == "full":
                self._pos[key] = torch.arange(seq_len, device=device)
            else:
                self._pos[key] = layout.positions(self.impl.layout, seq_len, self.grid, device)
        return self._pos[key]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> this rank's (B, N/P, ...)."""
        return x.index_select(1, self.positions(x.shape[1], x.device))  # (B, N/P)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The model's attention callable: (B, N/P, H, D) shards in, this rank's output shard out. With `heads`
        (the model's n_head), q's axis order is checked first."""
        check_heads(self.impl.name, q, self.heads)
        return self.impl.fn(q, k, v, grid=self.grid, causal=self.causal)


def synthetic_batch(step: int, batch_size: int, seq_len: int, vocab_size: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded synthetic tokens (B, N) and next-token targets (B, N), identical on every rank.

    Each sequence is an arithmetic progression x0 + stride * t (mod vocab) with 10% of tokens replaced by random ones:
    learnable from the previous tokens, so the loss of a smoke run falls."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    t = torch.arange(seq_len + 1)  # (N+1,)
    x0 = torch.randint(vocab_size, (batch_size, 1), generator=g)  # (B, 1)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)  # (B, 1)
    seq = (x0 + stride * t) % vocab_size  # (B, N+1)
    noise = torch.rand(batch_size, seq_len + 1, generator=g) < 0.1  # (B, N+1)
    seq = torch.where(noise, torch.randint(vocab_size, seq.shape, generator=g), seq)  # (B, N+1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # (B, N) each


# ---------------------------------------------------------------------------------------------- model, optimizer
def build_model(settings: Settings, sp: SequenceParallel, device: torch.device) -> GPT:
    """The GPT on `device`, with the same initial values on every rank and with or without FSDP.

    Built on the meta device, then materialised block by block with per-parameter seeded init (GPT.init_parameters);
    with `benchmark.fsdp` each block is sharded right away, so the full fp32 model never exists on one device
    (GPT-3 13B: 52 GB). float64 runs get float64 parameters."""
    b = settings.benchmark
    with torch.device("meta"):
        model = GPT(settings.gpt(), sp.attention)
    if b.dtype == "float64":
        model = model.double()
    shard = fsdp_sharder(device, b.dtype) if b.fsdp else None
    for i, block in enumerate(model.blocks):
        block.to_empty(device=device)
        model.init_parameters([n for n, _ in model.named_parameters() if n.startswith(f"blocks.{i}.")], seed=b.seed)
        if shard:
            shard(block)
    rest = [n for n, _ in model.named_parameters() if not n.startswith("blocks.")]
    for module in (model.wte, model.wpe, model.ln_f):
        if module is not None:
            module.to_empty(device=device)
    model.lm_head.weight = model.wte.weight  # to_empty made a new table: tie again
    model.init_parameters(rest, seed=b.seed)
    if shard:
        shard(model, root=True)
    return model


def make_optimizer(model: GPT, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------- one training step
def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sp: SequenceParallel, idx: torch.Tensor,
               targets: torch.Tensor, *, autocast_dtype: torch.dtype | None = None, fsdp: bool = False) -> torch.Tensor:
    """One optimizer step on the full batch idx, targets (B, N) (same on every rank; each rank uses its shard).

    Returns this rank's loss contribution (detached); their sum over ranks is the batch's mean token loss."""
    idx_p, tgt_p = sp.shard(idx), sp.shard(targets)  # (B, N/P) each
    pos = sp.positions(idx.shape[1], idx.device)  # (N/P,)
    optimizer.zero_grad(set_to_none=True)
    with synced_gradients(model, sp.group, fsdp):  # afterwards each gradient is the sum over the ranks
        with torch.autocast(idx.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model(idx_p, pos)  # (B, N/P, vocab)
            loss = shard_loss_sum(logits, tgt_p) / idx.numel()  # this rank's share of the global mean
        loss.backward()
    optimizer.step()
    return loss.detach()


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor (FSDP's DTensors are gathered: a collective, call it on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().cpu().clone()
    return out


# ---------------------------------------------------------------------------------------------- ranks
def _gather(obj) -> list:
    """Every rank's `obj`, in rank order (not counted: bookkeeping, outside the timed step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _guess_rank() -> int:
    """This process's rank before torch.distributed is up (torchrun, srun, submitit), else 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    try:
        return submitit.JobEnvironment().global_rank
    except RuntimeError:  # not a submitit job
        return 0


# ---------------------------------------------------------------------------------------------- the run
def _backend_failure(e: BaseException) -> bool:
    """A torch.distributed backend error (gloo's are plain RuntimeErrors) not already a CollectiveError."""
    if isinstance(e, CollectiveError) or not isinstance(e, RuntimeError) or not dist.is_initialized():
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "Connection reset", "Connection closed", "Timed out", "NCCL"))


def run(cfg: DictConfig) -> dict:
    """Validate, build, warm up, time `benchmark.steps` steps and write the record (rank 0). Re-raises failures
    after writing a record with status "failed"."""
    started = records.now_iso()
    try:
        info = init_distributed(timeout_s=timeout_s_of(cfg),
                                device=str(OmegaConf.select(cfg, "benchmark.device", default="auto")))
    except BaseException as e:  # no process group: the rank that is probably 0 records the failure
        if _guess_rank() == 0:
            asked = str(OmegaConf.select(cfg, "benchmark.device", default="cpu"))
            header = records.header(cfg, None, torch.device("cuda" if asked == "cuda" else "cpu"), None, started)
            records.RecordWriter(cfg.run_dir, fallback_header=header).end("failed", f"{type(e).__name__}: {e}"[:4000])
        raise
    rank0 = info.rank == 0
    dev = info.device
    fallback = records.header(cfg, info.world_size, dev, info.launcher, started, with_git=rank0)
    writer = records.RecordWriter(cfg.run_dir, enabled=rank0, fallback_header=fallback)
    bar = None
    try:
        s = validate(cfg, world_size=info.world_size)
        b = s.benchmark
        grid = ProcessGrid(s.grid.rows, s.grid.cols)
        check_node(info.rank, s.grid.rows, s.grid.cols, s.grid.placement)  # emulated cluster: rank on its node
        sp = SequenceParallel(s.attention.name, s.attention.causal, grid, heads=s.model.n_head)
        model = build_model(s, sp, dev)
        if not b.fsdp:  # seeded per-parameter init; check it anyway where it is cheap
            checksums = _gather(float(sum(p.detach().sum(dtype=torch.float64) for p in model.parameters())))
            if len(set(checksums)) != 1:
                raise RuntimeError(f"ranks initialised different parameters (checksums {checksums})")
        n_dense, n_total = model.num_params(non_embedding=True), model.num_params(non_embedding=False)
        optimizer = make_optimizer(model, b.optimizer, b.lr, b.weight_decay)
        autocast = torch.bfloat16 if b.dtype == "bfloat16" else None
        fsdp_ops = uncounted_fsdp_ops(model.cfg, info.world_size, b.dtype) if b.fsdp else []
        flops = bench.flops_per_step(model.cfg, n_dense, b.batch_size, b.seq_len, s.attention.causal)

        everyone = _gather(records.rank_info(dev))
        if dev.type == "cpu":  # ranks sharing a host share its cores; 0: divide them evenly
            sharing = [r["host"] for r in everyone].count(everyone[info.rank]["host"])
            torch.set_num_threads(b.cpu_threads or max(1, len(os.sched_getaffinity(0)) // sharing))
        writer.write_config(OmegaConf.to_yaml(records.resolved_config(cfg)))
        writer.header({**records.header(cfg, info.world_size, dev, info.launcher, started, ranks=everyone,
                                        with_git=rank0),
                       "params_non_embedding": n_dense, "params_total": n_total, "flops_per_step": flops["total"]})

        cell = f"{s.model.name} {s.attention.name} {s.grid.rows}x{s.grid.cols} N={b.seq_len}"
        bar = tqdm(total=b.warmup_steps + b.steps, desc=cell, disable=not (rank0 and b.progress), file=sys.stderr,
                   dynamic_ncols=True)
        times = []
        for step in range(b.warmup_steps + b.steps):
            idx, tgt = (t.to(dev) for t in synthetic_batch(step, b.batch_size, b.seq_len, s.model.vocab_size, b.seed))
            wire0 = read_wire()  # NIC counters of an emulated cluster ({} elsewhere), outside the timer
            with count_comm() as stats, bench.StepTimer(dev) as timer:
                loss = train_step(model, optimizer, sp, idx, tgt, autocast_dtype=autocast, fsdp=b.fsdp)
            wire = wire_delta(wire0, read_wire())
            bar.update(1)
            if step < b.warmup_steps:
                continue
            for op in fsdp_ops:
                stats.add(op.name, op.bytes_sent, op.bytes_received, op.messages)
            per_rank = _gather({"time": timer.elapsed_s, "loss": float(loss), "mem": bench.max_mem_gib(dev),
                                "comm": stats.as_dict(), "wire": wire})
            step_time = max(r["time"] for r in per_rank)
            times.append(step_time)
            tflops = bench.tflops_per_gpu(flops["total"], info.world_size, step_time)
            global_loss = sum(r["loss"] for r in per_rank)
            writer.step({"step": step, "step_time_s": step_time, "tokens_per_s": b.batch_size * b.seq_len / step_time,
                         "tflops_per_gpu": tflops, "mfu": bench.mfu(tflops, b.peak_tflops),
                         "max_mem_gib": max(r["mem"] for r in per_rank), "loss": global_loss,
                         **bench.max_over_ranks([r["comm"] for r in per_rank]),
                         **({"wire_bytes": {k: v for r in per_rank for k, v in r["wire"].items()}}
                            if any(r["wire"] for r in per_rank) else {})})
            bar.set_postfix(loss=f"{global_loss:.4f}", step_s=f"{step_time:.3g}")
        writer.end("ok")
        return {"run_dir": str(cfg.run_dir), "status": "ok", "mean_step_time_s": sum(times) / len(times)}
    except BaseException as e:
        if _backend_failure(e):  # a collective outside comm (FSDP's, the bookkeeping gathers): name group and rank
            err = health.collective_error("a collective of the training run (FSDP or bookkeeping)", None, e)
            writer.end("failed", f"{type(err).__name__}: {err}"[:4000])
            raise err from e
        writer.end("failed", f"{type(e).__name__}: {e}"[:4000])
        raise
    finally:
        if bar is not None:
            bar.close()
        destroy_distributed()


# errors whose message says all there is to say: reported as one line, without a traceback
EXPECTED_ERRORS = (ConfigError, GridError, CollectiveError, RankMismatchError)
# errors every rank raises alike (from the same config, or after comparing notes): rank 0 reports them alone
SAME_ON_EVERY_RANK = (ConfigError, GridError, RankMismatchError)


def _under_submitit() -> bool:
    try:
        submitit.JobEnvironment()
        return True
    except RuntimeError:  # not a submitit job
        return False


def report_failure(e: BaseException, rank: int) -> bool:
    """Print a failed run's error once per run: rank 0 reports (one line for EXPECTED_ERRORS, else the
    traceback). The other ranks stay quiet for SAME_ON_EVERY_RANK and for a CollectiveError (rank 0 has its own),
    unless it says rank 0 may be the one that died; an error of their own (a bug, out of memory) they report,
    since the others only see them stop answering. Returns whether this rank printed."""
    if rank != 0:
        if isinstance(e, SAME_ON_EVERY_RANK):
            return False
        if isinstance(e, CollectiveError) and e.silent is not None and 0 not in e.silent:
            return False
    if isinstance(e, EXPECTED_ERRORS):
        print(f"{type(e).__name__}: {e}", file=sys.stderr)  # the form workflow/scripts/run_cell.py reads
    else:
        print(f"rank {rank}:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
    return True


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Under torchrun and plain python, a failure is reported once (report_failure) and every rank exits with
    status 1; under submitit it is re-raised (submitit returns it to the launcher)."""
    try:
        return run(cfg)
    except Exception as e:  # noqa: BLE001 - reported, then the exit status says it failed
        if _under_submitit():
            raise
        report_failure(e, _guess_rank())
        sys.exit(1)


if __name__ == "__main__":
    main()
