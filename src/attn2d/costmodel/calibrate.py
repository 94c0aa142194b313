"""Measure a machine's kernel rates and link parameters and write a cost-model hardware profile.

    python -m attn2d.costmodel.calibrate --world 4 9 --out conf/hardware/local_cpu.yaml    # this machine: gloo on CPU
    torchrun --nproc-per-node 4 --nnodes 2 -m attn2d.costmodel.calibrate --out conf/hardware/mine.yaml   # an allocation

What is measured (every number goes into the profile, a HardwareProfile dumped by OmegaConf, with a header comment
naming its source, the machine and the date; timings are minima over repeats, since a shared machine's other
tenants only ever add time):
- compute, one rank alone (`threads` torch threads, the inputs' dtype; attn2d.costmodel.measure): GEMM rate of
  linear layers forward + backward (the rest of the model); the block attention kernel of
  attn2d.attention.kernels (what the distributed algorithms call) forward and backward on unmasked, causal,
  offset-causal and explicit-mask blocks, split into backend pieces as the algorithms' calls are: a
  non-negative fit of t = calls x overhead + (dense - skip x masked) x flops / rate + mask x flops / mask_rate;
  the same for torch SDPA (the single-device algorithm); AdamW's step (memory bound); a small GPT's per-layer
  and per-step time not explained by its FLOPs.
- with all `world` ranks busy at once, for each world size given (attn2d.costmodel.measure_comm): how many ranks
  the cores serve at full speed (shared_cores); the small GPT's overheads again (cores time-shared); a ring of
  point-to-point messages and all-gather, reduce-scatter, all-to-all and all-reduce over the world group and over
  concurrent pairs, each kind fitted as t = call + steps x alpha + bytes_sent / bandwidth (relative error,
  non-negative); the extra wall time a synchronisation costs when ranks arrive from CPU work (sync penalty);
  GEMMs beside an asynchronous ring transfer (overlap efficiency).
- the advisor's algorithms themselves on 4 ranks at a tiny sequence (N = 48, far below the validation sweep's):
  the host time they spend around transfers and per synchronous step, beyond everything above (a
  two-parameter non-negative fit, attn2d.costmodel.fit.fit_glue).

On CPU the ranks are spawned here (attn2d.testing.run_distributed, gloo). Under torchrun/srun (RANK set) it runs
in place on NCCL and measures intra-node pairs (ranks 0, 1) and inter-node pairs (ranks 0, gpus_per_node).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from attn2d.costmodel.fit import GLUE_CASES, GLUE_SEQ_LEN, fit_glue, fit_kind
from attn2d.costmodel.hardware import (
    ComputeConf,
    Hardware,
    HardwareProfile,
    InterConf,
    LinkConf,
    NetworkConf,
    OverheadConf,
    OverlapConf,
)
from attn2d.costmodel.measure import (
    measure_block_attention,
    measure_gemm,
    measure_local_attention,
    measure_model_overhead,
    measure_optimizer,
)
from attn2d.costmodel.measure_comm import KINDS, algorithm_worker, comm_worker
from attn2d.distributed import init_distributed
from attn2d.dtypes import SHORT, as_dtype
from attn2d.records import cpu_model
from attn2d.testing import run_distributed

COMMAND = "python -m attn2d.costmodel.calibrate"


def _g(x: float) -> float:
    """A measured number as the profile prints it: 4 significant digits."""
    return float(f"{x:.4g}")


def calibrate(worlds, threads: int = 1, dtype: str = "fp32", quick: bool = False, device: str = "cpu",
              heads: int = 4, head_dim: int = 16) -> dict:
    """All measurements on this machine -> the raw numbers the profile is built from.

    worlds: world sizes (an int or a list) at which `world` gloo ranks are spawned for the shared measurements;
    on a CPU whose cores the ranks share, latencies grow with the number of processes, so the profile keeps one
    fit per world size and the cost model interpolates between them."""
    worlds = [worlds] if isinstance(worlds, int) else list(worlds)
    torch.set_num_threads(threads)
    dev, dt = torch.device(device), as_dtype(dtype)
    t0 = time.time()
    gemm = measure_gemm(dev, dt, threads, quick)
    block = measure_block_attention(dev, dt, quick, heads, head_dim)
    local = measure_local_attention(dev, dt, quick, heads, head_dim)
    optm = measure_optimizer(dev, quick)
    rates = {"matmul": gemm["matmul_flops_per_s"], "local_fwd": local["fwd"], "local_bwd": local["bwd"],
             "optimizer_s_per_param": optm["seconds_per_param"]}
    overhead = measure_model_overhead(dev, dt, rates, quick)
    dist_res, fits, shared = {}, {}, []
    solo = gemm["matmul_flops_per_s"]
    for w in worlds:
        dist_res[w] = run_distributed(w, comm_worker, quick, device, dtype, threads, 1, rates, timeout_s=600)[0]
        fits[w] = {k: fit_kind(v) for k, v in dist_res[w]["kinds"].items() if k in KINDS}
        shared.append(w * dist_res[w]["concurrent_gemm_flops_per_s"] / solo)
    cores = os.cpu_count() or 1
    shared_cores = int(min(cores, max(1, round(statistics.median(shared))))) if min(worlds) > 1 else None
    algos = run_distributed(4, algorithm_worker, GLUE_CASES, GLUE_SEQ_LEN, heads, head_dim, 4 if quick else 30,
                            threads, timeout_s=600)[0]
    return {
        "gemm": gemm, "block": block, "local": local, "optimizer": optm, "overhead": overhead,
        "dist": dist_res, "fits": fits, "worlds": worlds, "shared_cores": shared_cores,
        "shared_cores_raw": shared, "algorithms": algos, "elapsed_s": time.time() - t0,
        "machine": f"{socket.gethostname()} ({cpu_model()}, {cores} cpus)",
        "date": datetime.date.today().isoformat(), "threads": threads, "dtype": dtype,
    }


def _link(f: dict) -> LinkConf:
    return LinkConf(alpha_s=_g(f["alpha_s"]), bw_bytes_per_s=_g(f["bw_bytes_per_s"]), call_s=_g(f["call_s"]))


def local_profile(m: dict, name: str) -> tuple[HardwareProfile, list[str]]:
    """The measured profile of this machine (gloo over loopback), and the header lines saying where each
    number comes from."""
    host = m["machine"].split(" ")[0]
    worlds = " ".join(str(w) for w in m["worlds"])
    src = f"measured by {COMMAND} --world {worlds} on {host} {m['date']}"
    w0 = m["worlds"][0]
    fit0 = m["fits"][w0]
    ov = m["overhead"]
    o = m["dist"][w0]["overlap"]
    b, loc = m["block"], m["local"]
    glue = m.get("glue", {})
    penalty = {w: d["sync_penalty"] for w, d in m["dist"].items() if d.get("sync_penalty")}
    by_world = {w: d["overhead"] for w, d in m["dist"].items() if d.get("overhead")}
    compute = ComputeConf(
        matmul_flops_per_s=_g(m["gemm"]["matmul_flops_per_s"]),
        attn_fwd_flops_per_s=_g(b["fwd"]["rate"]), attn_bwd_flops_per_s=_g(b["bwd"]["rate"]),
        attn_mask_fwd_flops_per_s=_g(b["fwd"]["mask_rate"]), attn_mask_bwd_flops_per_s=_g(b["bwd"]["mask_rate"]),
        causal_bottom_right=bool(b["bottom_right"]),
        causal_tile=int(b.get("causal_tile", 0)), attn_causal_skip=round(b["fwd"]["causal_skip"], 3),
        attn_call_overhead_s=_g(b["fwd"]["overhead_s"]),
        local_attn_fwd_flops_per_s=_g(loc["fwd"]["rate"]), local_attn_bwd_flops_per_s=_g(loc["bwd"]["rate"]),
        local_attn_causal_skip=round(loc["fwd"]["causal_skip"], 3), attn_ref_head_dim=b["head_dim"],
        layer_overhead_s=_g(max(0.0, ov["layer_overhead_s"])), step_overhead_s=_g(max(0.0, ov["step_overhead_s"])),
        overhead_by_world={w: OverheadConf(_g(max(0.0, x["layer_overhead_s"])), _g(max(0.0, x["step_overhead_s"])))
                           for w, x in sorted(by_world.items())},
        sync_penalty_by_world={w: _g(x["penalty_s"]) for w, x in sorted(penalty.items())},
        sync_penalty_scaling="oversubscription" if penalty else "measured",
        comm_call_overhead_s=_g(glue.get("comm_call_overhead_s", 0.0)),
        attn_step_overhead_s=_g(glue.get("attn_step_overhead_s", 0.0)),
        memory_bw_bytes_per_s=_g(m["optimizer"]["memory_bw_bytes_per_s"]), optimizer_bytes_per_param=28.0,
        shared_cores=m["shared_cores"], threads_per_rank=m["threads"])
    network = NetworkConf(
        collective_base_latency_s=0.0, intra=_link(fit0["p2p"]),
        inter=InterConf(alpha_s=1.0e-3, bw_bytes_per_s_per_node=1.0e9),
        kinds={k: _link(fit0[k]) for k in KINDS if k in fit0},
        kinds_by_world=({w: {k: _link(m["fits"][w][k]) for k in KINDS if k in m["fits"][w]} for w in m["worlds"]}
                        if len(m["worlds"]) > 1 else {}))
    prof = HardwareProfile(name=name, source=src, gpus_per_node=1024, peak_tflops=None, compute=compute,
                           network=network, overlap=OverlapConf(round(o["efficiency"], 3)))
    notes = [
        f"Cost-model profile of this machine: {m['machine']}, gloo over loopback.",
        f"Every number below, unless its line here says otherwise: {src}",
        f"({m['threads']} torch thread(s) per rank, {m['dtype']} tensors; shared measurements with {worlds} ranks at "
        f"once; calibration took {m['elapsed_s']:.0f} s).",
        "Re-measure: snakemake calibrate (writes results/calibration/local_cpu.yaml).",
        "gpus_per_node: one machine, every rank is on this node (no inter-node link); network.inter: unused "
        "placeholders, never priced.",
        "peak_tflops: no vendor peak for a CPU here (the benchmark's MFU stays null).",
        "compute.matmul_flops_per_s: nn.Linear fwd+bwd, one rank alone, fit.",
        f"compute.attn_{{fwd,bwd}}_flops_per_s, attn_causal_skip, attn_call_overhead_s: kernels.attn_forward / "
        f"attn_backward, backend {b['backend']}, fit (overhead: per backend call, the intercept); "
        "attn_mask_*: pieces with an explicit mask.",
        f"compute.causal_bottom_right, causal_tile: properties of backend {b['backend']} (attn2d.attention.backends).",
        "compute.local_attn_*: torch SDPA (the single-device algorithm), backward via autograd, fit.",
        f"compute.attn_ref_head_dim: head_dim of the measured attention calls ({b['heads']} heads; the tiny "
        "model's); attn_head_dim_scale: not measured, the rates are taken as independent of head_dim.",
        "compute.layer_overhead_s, step_overhead_s: GPT step time not explained by FLOPs, 1-rank fit; "
        "overhead_by_world: the same fit with every rank of a world running it at once (the cores time-shared), "
        "used instead of the two above / share, interpolated in P.",
        *(f"compute.sync_penalty_by_world.{w}: (GEMM task + all-reduce) - task - all-reduce, every rank at once: "
          f"task {x['task_s']:.3g} s, sync {x['sync_s']:.3g} s, both {x['mixed_s']:.3g} s" for w, x in
          sorted(penalty.items())),
        "compute.sync_penalty_scaling: the smallest oversubscribed world's penalty x (P/cores - 1) "
        "(attn2d.costmodel.Hardware.sync_penalty; evidence: results/tables/costmodel/validation_timeshare.md).",
        f"compute.comm_call_overhead_s, attn_step_overhead_s: host time per communication call (pack, reorder) "
        f"and per synchronous attention step (merge, slicing): {', '.join(a for a, *_ in GLUE_CASES)} attention "
        f"alone at N={GLUE_SEQ_LEN} on 4 ranks minus the model without these two terms, non-negative fit.",
        "compute.memory_bw_bytes_per_s: AdamW step at 28 B/param (AdamW fp32: read p, g, m, v; write p, m, v).",
        "compute.shared_cores: ranks served at full speed at once = world x concurrent / solo GEMM rate, median "
        f"over worlds ({', '.join(f'{x:.2f}' for x in m['shared_cores_raw'])}); threads_per_rank: torch threads "
        "per rank during the measurements.",
        "network.collective_base_latency_s: folded into the per-kind alphas.",
        f"network.intra: point-to-point ring, {w0} ranks at once (fit median rel. err {_err(fit0['p2p'])}).",
        f"network.kinds: per op kind at {w0} ranks, t = call + steps*alpha + bytes_sent/bw over world and pair "
        "groups, all ranks busy; median rel. err: " + ", ".join(f"{k} {_err(fit0[k])}" for k in KINDS if k in fit0),
        *(f"network.kinds_by_world.{w} (the cost model interpolates in P); median rel. err: "
          + ", ".join(f"{k} {_err(m['fits'][w][k])}" for k in KINDS if k in m["fits"][w])
          for w in (m["worlds"] if len(m["worlds"]) > 1 else [])),
        f"overlap.efficiency: GEMMs beside an async ring transfer at {w0} ranks: compute {o['compute_s']:.4g} s, "
        f"comm {o['comm_s']:.4g} s, both {o['both_s']:.4g} s.",
    ]
    return prof, notes


def _err(fit: dict) -> str:
    return f"{fit['median_rel_err']:.0%}"


def allocation_profile(m: dict, name: str, gpn: int) -> tuple[HardwareProfile, list[str]]:
    """The profile measured on an allocation (NCCL), and its header lines."""
    src = f"measured by {COMMAND} on {m['machine']} {m['date']}"
    pair = m["intra"]["all_gather_pair"]
    inter = (m["inter"] or {}).get("all_gather_pair")
    prof = HardwareProfile(
        name=name, source=src, gpus_per_node=gpn,
        compute=ComputeConf(
            matmul_flops_per_s=_g(m["gemm"]["matmul_flops_per_s"]),
            attn_fwd_flops_per_s=_g(m["block"]["fwd"]["rate"]), attn_bwd_flops_per_s=_g(m["block"]["bwd"]["rate"]),
            attn_causal_skip=round(m["block"]["fwd"]["causal_skip"], 3),
            attn_call_overhead_s=_g(m["block"]["fwd"]["overhead_s"]),
            memory_bw_bytes_per_s=_g(m["optimizer"]["memory_bw_bytes_per_s"])),
        network=NetworkConf(
            collective_base_latency_s=0.0,
            intra=LinkConf(alpha_s=_g(pair["alpha_s"]), bw_bytes_per_s=_g(pair["bw_bytes_per_s"])),
            inter=InterConf(alpha_s=_g(inter["alpha_s"]) if inter else 1e-5,
                            bw_bytes_per_s_per_node=_g(gpn * inter["bw_bytes_per_s"]) if inter else 1e10,
                            bw_bytes_per_s_per_rank=_g(inter["bw_bytes_per_s"]) if inter else 1e10)),
        overlap=OverlapConf(round(m["overlap"]["efficiency"], 3)))
    notes = [f"Cost-model profile measured on an allocation (NCCL). Every number: {src}",
             "compute.memory_bw_bytes_per_s: AdamW step; network.collective_base_latency_s: folded into the alphas.",
             "network.intra: NCCL all-gather over pairs of neighbouring ranks.",
             f"network.inter: NCCL all-gather over pairs (i, i + {gpn}), all at once; node bw = {gpn} x pair bw."]
    return prof, notes


def dump_profile(prof: HardwareProfile, notes: list[str]) -> str:
    """The profile as YAML (OmegaConf.to_yaml of the HardwareProfile) under its commented sources."""
    header = [w for line in notes for w in textwrap.wrap(line, 116, initial_indent="# ", subsequent_indent="#   ")]
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.structured(prof))


def calibrate_allocation(args) -> None:
    """Under torchrun / srun (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set): NCCL on the GPUs of an allocation.

    Rank 0 measures the kernels on its GPU; every rank joins two rounds of shared measurements, pairs inside a node
    (stride 1) and pairs across nodes (stride = GPUs per node); rank 0 writes the profile."""
    info = init_distributed()
    dev, dt = info.device, as_dtype("bf16" if info.device.type == "cuda" else args.dtype)
    gpn = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    m: dict = {"world": info.world_size, "threads": args.threads, "dtype": str(dt).replace("torch.", ""),
               "date": datetime.date.today().isoformat(), "gpus_per_node": gpn,
               "machine": f"{socket.gethostname()} x {info.world_size // gpn} nodes "
                          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_model()})"}
    if info.rank == 0:
        m["gemm"] = measure_gemm(dev, dt, args.threads, args.quick)
        m["block"] = measure_block_attention(dev, dt, args.quick, args.heads, args.head_dim)
        m["local"] = measure_local_attention(dev, dt, args.quick, args.heads, args.head_dim)
        m["optimizer"] = measure_optimizer(dev, args.quick)
    dist.barrier()
    intra = comm_worker(info.rank, info.world_size, args.quick, str(dev), args.dtype, args.threads, pair_stride=1)
    inter = (comm_worker(info.rank, info.world_size, args.quick, str(dev), args.dtype, args.threads, pair_stride=gpn)
             if info.world_size > gpn else None)
    if info.rank != 0:
        return
    m["intra"] = {k: fit_kind(v) for k, v in intra["kinds"].items()}
    m["inter"] = {k: fit_kind(v) for k, v in inter["kinds"].items()} if inter else None
    m["overlap"] = intra["overlap"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".raw.json").write_text(json.dumps(m, indent=1, default=float))
    out.write_text(dump_profile(*allocation_profile(m, args.name or out.stem, gpn)))
    print(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, nargs="+", default=[4],
                    help="ranks to spawn for the shared measurements (gloo); several sizes: one fit each")
    ap.add_argument("--out", default="conf/hardware/local_cpu.yaml")
    ap.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (as the runs use)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(SHORT))
    ap.add_argument("--heads", type=int, default=4, help="heads of the measured attention calls (tiny model: 4)")
    ap.add_argument("--head-dim", type=int, default=16, help="head_dim of the measured attention calls (tiny: 16)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (tests)")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:
        calibrate_allocation(args)
        return
    m = calibrate(args.world, threads=args.threads, dtype=args.dtype, quick=args.quick, heads=args.heads,
                  head_dim=args.head_dim)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = args.name or out.stem
    prof, _ = local_profile(m, name)  # everything but the glue, which is fitted against it
    m["glue"] = fit_glue(m["algorithms"], Hardware.from_profile(prof), args.heads, args.head_dim)
    prof, notes = local_profile(m, name)
    text = dump_profile(prof, notes)
    out.write_text(text)
    raw = out.with_suffix(".raw.json")
    raw.write_text(json.dumps(m, indent=1, default=float))
    print(text)
    print(f"wrote {out} (raw measurements: {raw})")


if __name__ == "__main__":
    main()
