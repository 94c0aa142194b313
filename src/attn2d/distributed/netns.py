"""The emulated network: K nodes (network namespaces) of M ranks each, joined by a switch (a bridge in its own
namespace) over links shaped to a given rate.

    with Cluster(nodes=4, ranks_per_node=1, nic="shared", rate="100mbit") as c:
        c.run_ranks(["python", "-m", "attn2d.train", "grid=2x2", ...], rows=2, cols=2)

- nic="shared": one NIC (veth) per node at `rate`; every rank of the node sends through it.
  nic="rails": one NIC per rank (as on DGX-class nodes), each at `rate`, rail j on its own subnet and bridge
  (gloo does not bind its outgoing sockets to its address, so rails on one subnet would mix). A connection
  therefore leaves through the rail of its PEER's address (the peer's local rank), not always the sender's NIC.
- Shaping: `tc qdisc ... tbf rate R burst max(128KiB, 2 ms x R) latency 50ms` on BOTH ends of every link (node
  egress and switch port), so each direction is capped (full duplex). Bandwidth only: latency, jitter and loss
  are NOT emulated (tbf shapes the rate alone). Above about 1 GB/s in total the host CPU is the limit.
- Ranks of one node talk over that namespace's loopback (free); only traffic between nodes crosses a shaped link.
- Every name starts with `a2d-<pid>-` (the creating process): a later run removes namespaces left by a process that
  no longer exists (a killed run). Processes still inside a namespace are killed before it is deleted (`ip netns
  del` alone does not end them). SIGTERM/SIGINT/SIGHUP inside the context tear everything down too.

Running attn2d.train on such a cluster, and the CLI: attn2d.distributed.emulate. What a rank reads inside it:
attn2d.distributed.wire.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn2d.distributed.placement import Placement, rank_nodes
from attn2d.distributed.wire import NODE_ENV, PER_NODE_ENV, WIRE_ENV

PREFIX = "a2d-"
NIC_MODES = ("shared", "rails")
MASTER_PORT = 29500  # every cluster has its own namespaces, so a fixed port cannot clash with another run
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit)\s*$", re.I)
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class EmulationUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message names what is missing."""


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8 bit/s (tc's units: bit, kbit, mbit, gbit; decimal)."""
    m = _RATE.match(str(rate))
    if not m:
        raise ValueError(f"rate {rate!r} not understood; give a number with bit|kbit|mbit|gbit, e.g. '100mbit'")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def rate_bytes_per_s(rate: str) -> float:
    return rate_bits(rate) / 8.0


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (None: they can). Checks `ip`, `tc`, root/CAP_NET_ADMIN and
    that a namespace really can be created (containers may forbid it)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        caps = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("CapEff:")).split()[1], 16)
    except (OSError, StopIteration, ValueError):
        caps = 0
    if not caps & (1 << 12):  # CAP_NET_ADMIN
        return (f"this process lacks CAP_NET_ADMIN (uid {os.getuid()}; run as root or with CAP_NET_ADMIN and "
                f"CAP_SYS_ADMIN)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"`ip netns add` failed: {r.stderr.strip() or r.stdout.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0].startswith(prefix)]


def _kill_inside(ns: str, sig: int = signal.SIGKILL) -> None:
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), sig)
        except (ProcessLookupError, ValueError):
            pass


def delete_namespace(ns: str) -> None:
    """Kill what runs inside `ns`, then delete it (its veth ends, bridges and qdiscs go with it)."""
    _kill_inside(ns)
    _ip("netns", "del", ns, check=False)


def _owner_alive(ns: str) -> bool:
    m = re.match(rf"^{re.escape(PREFIX)}(\d+)-", ns)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def clean_stale(all_: bool = False) -> list[str]:
    """Remove the a2d- namespaces whose creating process is gone (all_: every a2d- namespace). Returns them."""
    gone = [ns for ns in list_namespaces() if all_ or not _owner_alive(ns)]
    for ns in gone:
        delete_namespace(ns)
    return gone


@dataclass
class Cluster:
    """K nodes x M ranks on shaped links (see the module docstring). A context manager: enter builds, exit (or a
    signal) tears down."""

    nodes: int
    ranks_per_node: int = 1
    nic: str = "shared"
    rate: str = "100mbit"
    tag: str = ""  # distinguishes clusters of one process
    created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        if int(self.nodes) < 1 or int(self.ranks_per_node) < 1:
            raise ValueError(f"nodes ({self.nodes}) and ranks_per_node ({self.ranks_per_node}) must be >= 1")
        if self.nic not in NIC_MODES:
            raise ValueError(f"nic {self.nic!r} unknown; known: {', '.join(NIC_MODES)}")
        self.rate_bits = rate_bits(self.rate)
        self.base = f"{PREFIX}{os.getpid()}-{self.tag}" if self.tag else f"{PREFIX}{os.getpid()}"

    # ------------------------------------------------------------------ names
    @property
    def rails(self) -> int:
        return self.ranks_per_node if self.nic == "rails" else 1

    @property
    def switch(self) -> str:
        return f"{self.base}-sw"

    def node_ns(self, k: int) -> str:
        return f"{self.base}-n{k}"

    def iface(self, local_rank: int) -> str:
        """The node-side NIC a rank with this local rank uses."""
        return f"eth{local_rank if self.nic == 'rails' else 0}"

    def addr(self, k: int, rail: int = 0) -> str:
        return f"10.99.{rail}.{k + 1}"

    # ------------------------------------------------------------------ build / tear down
    def _tbf(self, ns: str, dev: str) -> None:
        rate_b = self.rate_bits / 8
        burst = int(max(128 * 1024, 0.002 * rate_b))
        _ip("-n", ns, "link", "set", dev, "up")
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(self.rate_bits)}bit",
              "burst", str(burst), "latency", "50ms"])

    def up(self) -> Cluster:
        reason = unavailable_reason()
        if reason:
            raise EmulationUnavailable(f"cannot emulate a cluster here: {reason}")
        clean_stale()
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            for j in range(self.rails):
                _ip("-n", self.switch, "link", "add", f"br{j}", "type", "bridge")
                _ip("-n", self.switch, "link", "set", f"br{j}", "up")
            for k in range(self.nodes):
                ns = self.node_ns(k)
                self._add_ns(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                for j in range(self.rails):
                    port = f"n{k}r{j}"
                    _ip("-n", ns, "link", "add", f"eth{j}", "type", "veth", "peer", "name", port, "netns", self.switch)
                    _ip("-n", ns, "addr", "add", f"{self.addr(k, j)}/24", "dev", f"eth{j}")
                    _ip("-n", self.switch, "link", "set", port, "master", f"br{j}")
                    self._tbf(ns, f"eth{j}")
                    self._tbf(self.switch, port)
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)

    def down(self) -> None:
        for ns in reversed(self.created):
            delete_namespace(ns)
        self.created.clear()

    def __enter__(self) -> Cluster:
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._old[s] = signal.signal(s, _raise_exit)
            except ValueError:  # not the main thread: the caller must tear down
                break
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
        for s, h in getattr(self, "_old", {}).items():
            signal.signal(s, h)

    # ------------------------------------------------------------------ ranks
    def placement_nodes(self, rows: int, cols: int, placement: Placement = "row") -> list[int]:
        nodes = rank_nodes(rows, cols, self.ranks_per_node, placement)
        if max(nodes) >= self.nodes:
            raise ValueError(f"the {rows}x{cols} grid needs {max(nodes) + 1} nodes of {self.ranks_per_node} rank(s) "
                             f"under placement {placement!r}; this cluster has {self.nodes}")
        return nodes

    def rank_env(self, rows: int, cols: int, placement: Placement = "row") -> list[dict[str, str]]:
        """The environment of every grid rank: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR on the shaped network,
        GLOO_SOCKET_IFNAME (without it gloo binds to the hostname's 127.0.0.1 and cannot connect)."""
        nodes = self.placement_nodes(rows, cols, placement)
        seen: dict[int, int] = {}
        envs = []
        for rank, k in enumerate(nodes):
            local = seen.get(k, 0)
            seen[k] = local + 1
            dev = self.iface(local)
            # the NICs this rank reports: its own rail, or (shared) the node's NIC from its first rank only
            wire = f"n{k}:{dev}" if (self.nic == "rails" or local == 0) else ""
            envs.append({"RANK": str(rank), "WORLD_SIZE": str(len(nodes)), "LOCAL_RANK": str(local),
                         "LOCAL_WORLD_SIZE": str(nodes.count(k)), "MASTER_ADDR": self.addr(nodes[0], 0),
                         "MASTER_PORT": str(MASTER_PORT), "GLOO_SOCKET_IFNAME": dev, WIRE_ENV: wire,
                         NODE_ENV: str(k), PER_NODE_ENV: str(self.ranks_per_node)})
        return envs

    def spawn(self, node: int, argv: Sequence[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start argv inside node `node`'s namespace, in its own session (killable by process group)."""
        return subprocess.Popen(["ip", "netns", "exec", self.node_ns(node), *argv], env={**os.environ, **(env or {})},
                                start_new_session=True, **kw)

    def run_ranks(self, argv: Sequence[str], rows: int, cols: int, placement: Placement = "row",
                  timeout_s: float = 600, log_dir: str | os.PathLike | None = None) -> list[int]:
        """Run argv once per grid rank, each in its node's namespace; wait for all. On the first failure or at
        the timeout every rank's process group is killed. Returns the exit codes (negative: killed)."""
        envs = self.rank_env(rows, cols, placement)
        procs = []
        logs = []
        try:
            for env in envs:
                out = None
                if log_dir is not None:
                    Path(log_dir).mkdir(parents=True, exist_ok=True)
                    out = open(Path(log_dir) / f"rank{env['RANK']}.log", "w")
                    logs.append(out)
                procs.append(self.spawn(int(env[NODE_ENV]), argv, env, stdout=out,
                                        stderr=subprocess.STDOUT if out else None))
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for p in procs:
                p.wait()
            for f in logs:
                f.close()
        return [p.returncode for p in procs]

    def describe(self) -> dict:
        return {"nodes": self.nodes, "ranks_per_node": self.ranks_per_node, "nic": self.nic, "rate": self.rate,
                "rate_bytes_per_s": self.rate_bits / 8, "shaper": "tbf both ends, no latency emulation"}


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
