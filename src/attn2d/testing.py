"""Run a function on N real gloo processes (spawned, file:// rendezvous) and collect each rank's result.

Used by the tests and the CPU benchmarks. The function must be importable (module level) and picklable; it is
called as fn(rank, world_size, *args) after the default process group is up, and its return value (anything
torch.save can write) comes back in rank order. An exception on any rank is re-raised here with that rank's
traceback; a hang ends after `timeout_s` with every process killed.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args, timeout_s: float) -> None:
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedError(RuntimeError):
    pass


def run_distributed(world_size: int, fn, *args, timeout_s: float = 120.0) -> list:
    """Spawn `world_size` gloo processes running fn(rank, world_size, *args); return their results in rank order."""
    with tempfile.TemporaryDirectory(prefix="attn2d-mp-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args, timeout_s), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s + 30)
        while not ctx.join(timeout=1):
            if datetime.datetime.now() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise DistributedError(f"{world_size} ranks did not finish in {timeout_s + 30:.0f} s (killed)")
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited without a result")
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {rank}:\n{rec['error']}")
        if errors:
            raise DistributedError("\n".join(errors))
        return results
