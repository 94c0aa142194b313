"""Run a function on N real gloo processes (spawned, file:// rendezvous) and collect each rank's result; the shared
checks of the distributed-attention tests; counters of backend calls (counting_backend_calls), of aten ops and
torch's functional collectives (OpCounter) and of the bytes on the loopback wire (wire_bytes). Used by the tests
and the CPU benchmarks.

run_distributed: the function must be importable (module level) and picklable; it is called as
fn(rank, world_size, *args) after the default process group is up, and its return value (anything torch.save can
write) comes back in rank order. An exception on any rank is re-raised here with that rank's traceback; a hang ends
after `timeout_s` with every process killed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import tempfile
import traceback
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from attn2d import costmodel as cm
from attn2d.attention import backends, layout
from attn2d.attention.reference import reference_attention


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


# --- shared checks of the distributed-attention tests (test_attention2d, test_ring, test_attention2d_overlap) ---

def loopback_bytes() -> int | None:
    """Bytes sent over the loopback interface so far (Linux /proc/net/dev, machine-wide: gloo's TCP traffic between
    ranks on one machine goes there), None where it cannot be read."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, data = line.partition(":")
                if name.strip() == "lo":
                    return int(data.split()[8])  # transmit bytes
    except (OSError, ValueError, IndexError):
        return None
    return None


def wire_bytes(fn) -> int | None:
    """Loopback bytes sent by all ranks during one call of fn on every rank, between barriers (what the wire
    carried, TCP/IP headers and the barriers' few bytes included): an independent check of comm's count. Each rank
    reads the counter before the barrier that lets fn start anywhere, and after the one that ends it, before a last
    barrier lets anything else start: a rank that leaves a barrier late cannot miss fn's traffic or count the next."""
    b0 = loopback_bytes()
    dist.barrier()
    fn()
    dist.barrier()
    b1 = loopback_bytes()
    dist.barrier()
    return None if b0 is None or b1 is None else b1 - b0


def random_case(seed: int, shape: tuple, kv_heads: int | None = None, **fields) -> dict:
    """A test case: float64 q and dout of `shape` (B, N, H, D), k and v with `kv_heads` heads (None: H; fewer:
    grouped-query attention), from one seeded generator, plus `fields`."""
    g = torch.Generator().manual_seed(seed)
    b, n, h, d = shape
    kv_shape = (b, n, kv_heads or h, d)
    q, k, v, dout = (torch.randn(*s, generator=g, dtype=torch.float64) for s in (shape, kv_shape, kv_shape, shape))
    return dict(fields, q=q, k=k, v=v, dout=dout)


def call_errors(calls: dict) -> dict:
    """Run each bad call; its ValueError/TypeError message, or None where it raised nothing."""
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = str(e)
    return errors


def assert_errors_match(errors: dict, expected: dict) -> None:
    """Every named call raised, with a message matching its regex."""
    for name, pattern in expected.items():
        assert errors[name] is not None, f"{name}: no error raised"
        assert re.search(pattern, errors[name]), f"{name}: {errors[name]!r} !~ {pattern!r}"


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64."""
    return float((got.double() - want).norm() / want.norm())


def assemble(shards: list, lay: str, seq_len: int, rows: int, cols: int) -> torch.Tensor:
    """Put every rank's shard (B, N/P, H, D), in rank order, back at its layout positions: (B, N, H, D) float64."""
    b, _, h, d = shards[0].shape  # h: q's or k's heads, whichever the shards are
    full = torch.zeros(b, seq_len, h, d, dtype=torch.float64)
    for rank, x in enumerate(shards):
        full[:, layout.spans_tensor(layout.layout_spans(lay, seq_len, rank, rows, cols))] = x.double()
    return full


def assert_matches_reference(case: dict, results: list, lay: str, rows: int, cols: int, tol: float,
                             label: str) -> None:
    """Each rank's out, dq, dk, dv (in `results`, rank order) equal the float64 single-device reference computed on
    the case's inputs rounded to the run's dtype, to relative error < tol; and come back in that dtype."""
    dt = getattr(torch, case["dtype"]) if isinstance(case["dtype"], str) else case["dtype"]
    q, k, v = (case[x].to(dt).double().requires_grad_() for x in "qkv")
    ref, _ = reference_attention(q, k, v, causal=case["causal"])
    ref.backward(case["dout"].to(dt).double())
    seq_len = case["q"].shape[1]
    for key, want in (("out", ref.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert results[0][key].dtype == dt, f"{label}: {key} has dtype {results[0][key].dtype}"
        err = rel_error(assemble([r[key] for r in results], lay, seq_len, rows, cols), want)
        assert err < tol, f"{label}: {key} relative error {err:.2e} >= {tol}"


@contextlib.contextmanager
def counting_backend_calls(name: str):
    """Wrap attention backend `name`'s entry points while inside; yields the list of calls made through them, each
    ("fwd" | "bwd", rows, keys). The kernel layer looks the backend up at every call, so this sees them all."""
    impl, calls = backends.BACKENDS[name], []

    def fwd(q, k, v, **kw):
        calls.append(("fwd", q.shape[1], k.shape[1]))
        return impl.forward(q, k, v, **kw)

    def bwd(dout, q, k, v, *args, **kw):
        calls.append(("bwd", q.shape[1], k.shape[1]))
        return impl.backward(dout, q, k, v, *args, **kw)

    backends.BACKENDS[name] = dataclasses.replace(impl, forward=fwd, backward=bwd)
    try:
        yield calls
    finally:
        backends.BACKENDS[name] = impl


KERNEL_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")


class OpCounter(TorchDispatchMode):
    """Counts, per pass, attention kernel calls (KERNEL_OPS), other aten ops, and the bytes and messages of
    torch's functional collectives (what torch's ring uses; our algorithms' p2p and collectives are counted by
    attn2d.distributed.comm, with the same convention: all-gather of b bytes over g ranks sends (g-1) b in g-1
    messages; an all-to-all sends what goes to other ranks). Communication ops are not counted as aten ops."""

    def __init__(self):
        super().__init__()
        self.kernels, self.ops, self.sent, self.msgs = 0, 0, 0, 0
        self.by_name = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if name in KERNEL_OPS:
            self.kernels += 1
        elif ns in ("c10d", "_c10d_functional", "c10d_functional"):
            self._comm(name, args)
        else:
            self.ops += 1
            self.by_name[name] += 1
        return func(*args, **kwargs)

    def _comm(self, name, args):
        if name == "all_gather_into_tensor":
            x, g = args[0], args[1]
            self.sent += (g - 1) * x.numel() * x.element_size()
            self.msgs += g - 1
        elif name == "all_to_all_single":
            x, in_splits = args[0], args[2]
            me, row = dist.get_rank(), x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
            to_others = [sp for j, sp in enumerate(in_splits) if j != me]  # the world group: group rank = rank
            self.sent += sum(to_others) * row
            self.msgs += sum(1 for sp in to_others if sp)

    def as_dict(self) -> dict:
        return {"kernel_calls": self.kernels, "aten_ops": self.ops, "bytes_sent": self.sent, "messages": self.msgs}


def synthetic_hardware(**kw):
    """A hand-made two-level cost-model network with round numbers (expected times can be written down by hand)."""
    base = dict(name="synthetic", gpus_per_node=4, matmul_flops_per_s=1e14, attn_fwd_flops_per_s=1e14,
                attn_bwd_flops_per_s=1e14, collective_base_latency_s=1e-5, intra=cm.Link(1e-6, 1e11),
                inter=cm.Link(1e-5, 1e10), inter_rank_bw_bytes_per_s=5e9, overlap_efficiency=1.0)
    base.update(kw)
    return cm.Hardware(**base)
