"""The emulated cluster (attn2d.distributed.netns, .wire, .emulate): shaped links hold their rate, gloo traffic
between nodes crosses them and traffic inside a node does not, and nothing is left behind (success, failure, SIGTERM,
SIGKILL).

Skipped, with the reason, where network namespaces cannot be made (not root, no CAP_NET_ADMIN, no iproute2)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attn2d import records
from attn2d.config import ConfigError, compose, validate
from attn2d.costmodel import Workload, load_model
from attn2d.distributed import emulate, netns, wire
from attn2d.distributed.comm import CommOp
from attn2d.distributed.emulate_model import (
    FSDP_GRAD_SCATTER,
    TCP_PAYLOAD,
    emulated_hardware,
    gloo_ops,
    predicted_node_tx,
    step_ops,
)
from attn2d.distributed.netns import Cluster, list_namespaces, rate_bytes_per_s
from attn2d.report import emulated

REASON = netns.unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulation unavailable: {REASON}")
PY = sys.executable


def _mine() -> list[str]:
    return list_namespaces(f"{netns.PREFIX}{os.getpid()}-")


def _root_veths() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "n0r0" in ln or "eth0@" in ln]


def test_unavailable_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "ip" else "/bin/" + tool)
    assert "`ip` (iproute2) is not installed" in netns.unavailable_reason()
    with pytest.raises(netns.EmulationUnavailable, match="ip"):
        Cluster(2).up()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="rate '100mb'"):
        Cluster(2, rate="100mb")
    with pytest.raises(ValueError, match="nic 'bond'"):
        Cluster(2, nic="bond")
    with pytest.raises(ValueError, match="needs 4 nodes"):
        Cluster(2).placement_nodes(2, 2)


_SINK = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("10.99.0.2", 5001)); s.listen()
a, _ = s.accept()
while a.recv(1 << 20):
    pass
a.close()
"""
_SEND = """
import socket, time
tx = lambda: int(open("/sys/class/net/eth0/statistics/tx_bytes").read())
s = socket.create_connection(("10.99.0.2", 5001), timeout=30)
s.sendall(b"x" * (2 << 20))  # fill the queue first: the bucket's initial burst is not the rate
b, t = tx(), time.monotonic()
s.sendall(b"x" * (12 << 20)); s.shutdown(socket.SHUT_WR); s.recv(1)
dt = time.monotonic() - t
print((tx() - b) / dt)
"""


@needs_netns
@pytest.mark.parametrize("rate", ["200mbit", "50mbit"])
def test_shaper_holds_the_rate(rate):
    """A TCP stream between two nodes: bytes on the node's NIC per second within 10% of the configured rate."""
    with Cluster(2, rate=rate) as c:
        sink = c.spawn(1, [PY, "-c", _SINK])
        time.sleep(0.5)
        send = c.spawn(0, [PY, "-c", _SEND], stdout=subprocess.PIPE, text=True)
        out, _ = send.communicate(timeout=30)
        sink.wait(timeout=10)
    measured = float(out) / rate_bytes_per_s(rate)
    assert 0.9 <= measured <= 1.1, f"{rate}: measured {measured:.3f} x the configured rate"
    assert not _mine()


_GATHER = """
import json, os, sys, datetime
import torch, torch.distributed as dist
from attn2d.distributed.wire import read_wire, wire_delta
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
local = dist.new_group([0, 1]), dist.new_group([2, 3])
mine = local[rank // 2]
x = torch.ones(1 << 20)  # 4 MiB per rank
out = [torch.empty_like(x) for _ in range(2)]
# every rank reads its counters between barriers, so no other rank's next phase is on the wire meanwhile
dist.barrier(); w0 = read_wire(); dist.barrier()
dist.all_gather(out, x, group=mine)
dist.barrier(); w1 = read_wire(); dist.barrier()
out = [torch.empty_like(x) for _ in range(4)]
dist.all_gather(out, x)
dist.barrier(); w2 = read_wire()
json.dump({"same_node": wire_delta(w0, w1), "world": wire_delta(w1, w2)}, open(sys.argv[1] + f"/{rank}.json", "w"))
dist.barrier(); dist.destroy_process_group()
"""


@needs_netns
def test_gloo_all_gather_crosses_the_link_and_same_node_traffic_does_not(tmp_path):
    """2 nodes x 2 ranks, one shared NIC per node: an all-gather inside each node puts ~nothing on the NICs; the
    world all-gather is a ring over ranks 0..3: each rank sends its successor 3 chunks of 4 MiB and one ring edge
    leaves each node (1 -> 2, 3 -> 0), so each NIC sends 12 MiB plus headers (as attn2d.costmodel.op_edges says)."""
    script = tmp_path / "gather.py"
    script.write_text(_GATHER)
    with Cluster(2, ranks_per_node=2, rate="1gbit") as c:
        codes = c.run_ranks([PY, str(script), str(tmp_path)], rows=2, cols=2, timeout_s=90,
                            log_dir=tmp_path / "logs")
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert codes == [0, 0, 0, 0], logs
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 2)]  # local rank 0 reads the node's NIC
    mib = 1 << 20
    for r in res:
        (nic, same), = r["same_node"].items()
        assert same["tx"] < 0.05 * mib, f"{nic}: same-node all-gather put {same['tx']} B on the shaped link"
        world = r["world"][nic]
        assert 12 * mib <= world["tx"] <= 12 * mib * 1.1, world
    assert not _mine()


@needs_netns
def test_teardown_after_a_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(2, ranks_per_node=2, nic="rails") as c:
            assert len(c.created) == 3 and set(c.created) <= set(list_namespaces())
            c.spawn(0, ["sleep", "300"])  # a process still inside must not survive the namespace
            raise RuntimeError("boom")
    assert not _mine()
    assert not _root_veths()
    assert subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True).returncode == 1


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_teardown_after_a_signal(sig):
    """SIGTERM: the CLI tears down itself. SIGKILL: the namespaces stay, and the next run removes them."""
    p = subprocess.Popen([PY, "-m", "attn2d.distributed.emulate", "up", "--nodes", "2", "--rate", "100mbit"],
                         stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        assert set(info["namespaces"]) <= set(list_namespaces())
        p.send_signal(sig)
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    left = [ns for ns in info["namespaces"] if ns in list_namespaces()]
    if sig == signal.SIGTERM:
        assert left == []
    else:
        assert left == info["namespaces"]
        assert set(left) <= set(netns.clean_stale())  # the owner is gone: removed
        assert not [ns for ns in info["namespaces"] if ns in list_namespaces()]
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "n0r0" not in out and "br0" not in out


@needs_netns
def test_training_cell_records_the_emulation(tmp_path):
    """attn2d.train (tiny model, 2x2 attn2d, one timed step) on 4 one-rank nodes: the record is valid and its
    header says nodes, NIC mode, rate, placement and the bytes each NIC carried per step."""
    res = emulate.run_cell(["model=tiny", "attention=attn2d", "benchmark.seq_len=96", "benchmark.warmup_steps=0",
                            "benchmark.steps=1", "benchmark.progress=false", "experiment_name=emulate_test"],
                           tmp_path / "run", rows=2, cols=2, ranks_per_node=1, rate="1gbit", timeout_s=120)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "run" / "ranks").glob("*.log"))
    assert res["status"] == "ok", logs
    rec = records.read_record(tmp_path / "run")
    em = rec.header["emulation"]
    assert (em["nodes"], em["ranks_per_node"], em["nic"], em["rate"], em["placement"]) == (4, 1, "shared", "1gbit",
                                                                                          "row")
    assert set(em["wire_bytes_per_step"]) == {f"n{k}:eth0" for k in range(4)}
    sent = rec.steps[0]["comm_bytes_sent"]  # the busiest rank's counted bytes: every byte leaves its node
    busiest_tx = max(d["tx"] for d in em["wire_bytes_per_step"].values())
    assert sent <= busiest_tx <= 1.3 * sent + 20_000, (sent, em["wire_bytes_per_step"])
    assert not _mine()


def test_placement_setting_is_validated():
    with pytest.raises(ConfigError, match="grid.placement"):
        validate(compose(["grid=2x2", "attention=attn2d", "grid.placement=diagonal"]), world_size=4)
    with pytest.raises(ConfigError, match="3 entries"):
        validate(compose(["grid=2x2", "attention=attn2d", "grid.placement=[0,0,1]"]), world_size=4)
    cfg = validate(compose(["grid=2x2", "attention=attn2d", "grid.placement=col"]), world_size=4)
    assert cfg.grid.placement == "col"


def test_emulated_profile_and_wire_prediction_follow_the_placement():
    """The profile is the configured rate (x TCP payload share), not a fit; wire bytes per node come from the op
    edges that leave a node: Ring on 2 nodes x 2 ranks sends only ranks 1 -> 2 and 3 -> 0 off-node; FSDP's
    reduce_scatter, which calls gloo's own (an all-reduce), is priced at twice its logical bytes."""
    hw = emulated_hardware("80mbit", "rails", 4)
    assert hw.inter_rank_bw_bytes_per_s == pytest.approx(1e7 * TCP_PAYLOAD)
    assert hw.inter.bw_bytes_per_s == pytest.approx(4e7 * TCP_PAYLOAD) and hw.gpus_per_node == 4
    assert emulated_hardware("80mbit", "shared", 4).inter_rank_bw_bytes_per_s is None
    shape, wl = load_model("tiny"), Workload(seq_len=96, dtype="float32")
    one = predicted_node_tx("ring", shape, wl, 2, 2, 1)  # 4 one-rank nodes: every ring edge leaves its node
    two = predicted_node_tx("ring", shape, wl, 2, 2, 2)
    per_rank = sum(op.bytes_sent * t for op, t, *_ in step_ops("ring", shape, wl, 2, 2))
    assert one == pytest.approx({k: per_rank for k in range(4)})
    assert two == pytest.approx({0: per_rank, 1: per_rank})  # one ring edge out of each node
    rs = CommOp("bwd", "x", "reduce_scatter", "row", 2, 100, 100, 1, 1)  # ours: an all_to_all on gloo
    fsdp = CommOp("grad", FSDP_GRAD_SCATTER, "reduce_scatter", "world", 2, 100, 100, 1, 1)  # torch's, through gloo
    assert [op.bytes_sent for op in gloo_ops([rs, fsdp])] == [100, 200]


def test_report_says_why_it_was_skipped(tmp_path):
    emulated.write(tmp_path / "none", tmp_path / "t" / "emulated_speedup", tmp_path / "f" / "speedup",
                   note="no CAP_NET_ADMIN")
    assert "Skipped: no CAP_NET_ADMIN" in (tmp_path / "t" / "emulated_speedup.md").read_text()
    assert "no latency emulation" in (tmp_path / "t" / "emulated_speedup_validation.md").read_text()
    assert (tmp_path / "f" / "speedup.png").exists()


@needs_netns
def test_hydra_launcher_emulated(tmp_path):
    """`python -m attn2d.train -m hydra/launcher=emulated`: the sweep point's ranks run in their node's namespace
    (a 1x2 grid at 2 ranks per node: one node, so the traffic stays on its loopback, off the shaped NIC)."""
    cmd = [PY, "-m", "attn2d.train", "-m", "hydra/launcher=emulated", "model=tiny", "attention=attn2d",
           "benchmark.seq_len=48", "benchmark.warmup_steps=0", "benchmark.steps=1", "benchmark.progress=false",
           "+emulation.rate=1gbit", "+emulation.ranks_per_node=2", "grid=1x2", "grid.placement=row",
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=cell"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    em = records.read_record(tmp_path / "cell").header["emulation"]
    assert (em["nodes"], em["ranks_per_node"], em["nic"]) == (1, 2, "shared")
    assert em["busiest_nic_bytes_per_step"] < 20_000  # both ranks on one node: loopback, not the shaped link
    assert not _mine()


def test_a_rank_on_the_wrong_node_is_refused(monkeypatch):
    """attn2d.train checks that the launcher put each rank where grid.placement says (row: rank // ranks_per_node;
    col: a grid column per node)."""
    monkeypatch.setenv("ATTN2D_NODE", "0")
    monkeypatch.setenv("ATTN2D_RANKS_PER_NODE", "2")
    wire.check_node(1, 2, 2, "row")  # ranks 0, 1 on node 0
    with pytest.raises(RuntimeError,
                       match="rank 1 runs on emulated node 0, but grid.placement 'col' puts it on node 1"):
        wire.check_node(1, 2, 2, "col")
    monkeypatch.delenv("ATTN2D_NODE")
    wire.check_node(1, 2, 2, "col")  # outside an emulated cluster: nothing to check
