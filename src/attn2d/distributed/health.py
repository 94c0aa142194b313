"""Which rank stalled or died: group names, per-rank heartbeats, and collective errors that name both.

- Every process group the algorithms use gets a readable name (`name_group`): "row group 1 of grid 2x2 (ranks
  2,3)"; `describe(group)` gives it (the world group: "world group (ranks 0-3)").
- `start_heartbeat()` (called by ProcessGrid on every rank) starts a daemon thread that bumps this rank's counter in
  the rendezvous store every `period` seconds. A rank that is stopped (SIGSTOP), hung outside Python or dead stops
  bumping it.
- `collective_error(op, group, exc)`: when a collective fails (gloo's timeout, "Connection reset by peer"), watch
  the group's counters for a few periods and raise a CollectiveError naming the op, the group, its ranks, the ranks
  whose heartbeat stood still, and the backend's message.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_NAMES: dict[int, str] = {}  # id(group) -> name
_HEARTBEAT: dict = {}  # "thread", "period", "store"
_PREFIX = "attn2d/heartbeat/"
_FAILED = "attn2d/failed/"


class CollectiveError(RuntimeError):
    """A collective that failed or timed out; the message names the group, its ranks and, where known, the rank
    that stopped answering (`silent`: those ranks; None when they could not be known)."""

    silent: list[int] | None = None


# ---------------------------------------------------------------------------------------------- timeouts
def group_timeout(group: dist.ProcessGroup | None = None) -> datetime.timedelta:
    """The timeout of `group` (default: the world group, i.e. init_process_group's `timeout`)."""
    pg = group if group is not None else c10d._get_default_group()
    for dev in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(dev)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return c10d._get_default_store().timeout


# ---------------------------------------------------------------------------------------------- names
def fmt_ranks(ranks) -> str:
    """[0, 1, 2, 3] -> '0-3'; [0, 2] -> '0,2'."""
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """World ranks of `group` (None: the world)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def name_group(group: dist.ProcessGroup, name: str) -> None:
    _NAMES[id(group)] = name


def describe(group: dist.ProcessGroup | None) -> str:
    """'row group 1 of grid 2x2 (ranks 2,3)', 'world group (ranks 0-3)'."""
    try:
        ranks = f" (ranks {fmt_ranks(group_ranks(group))})"
    except (RuntimeError, ValueError):
        ranks = ""
    if group is None or group is dist.group.WORLD:
        return f"world group{ranks}"
    return f"{_NAMES.get(id(group), 'process group')}{ranks}"


# ---------------------------------------------------------------------------------------------- heartbeats
def heartbeat_period(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, within [0.2, 2] s."""
    return min(2.0, max(0.2, timeout_s / 10))


def start_heartbeat(period: float | None = None) -> None:
    """Start (once per default process group) this rank's heartbeat thread; nothing for a world of one."""
    if dist.get_world_size() == 1:
        return
    store = c10d._get_default_store()
    old = _HEARTBEAT.get("thread")
    if old is not None and old.is_alive() and _HEARTBEAT.get("store_id") == id(store):
        return
    stop_heartbeat()  # a previous process group's thread
    period = period or heartbeat_period(group_timeout().total_seconds())
    key = f"{_PREFIX}{dist.get_rank()}"
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone (shutdown, or its host died): stop beating
                return
            stop.wait(period)

    store.add(key, 1)  # the first beat before returning: a peer can tell "never started" from "stopped"
    thread = threading.Thread(target=beat, name="attn2d-heartbeat", daemon=True)
    thread.start()
    _HEARTBEAT.update(thread=thread, stop=stop, period=period, store=store, store_id=id(store))


def stop_heartbeat() -> None:
    stop = _HEARTBEAT.pop("stop", None)
    if stop is not None:
        stop.set()
    _HEARTBEAT.clear()


def silent_ranks(ranks: list[int], watch_s: float | None = None) -> tuple[list[int], list[int]] | None:
    """(silent, failed) among `ranks`: those whose heartbeat did not advance over `watch_s` seconds (default: 3
    periods) and had not reported a failed collective, and those that had (they are alive but failing too). None
    when no heartbeat runs or the store cannot be read (its host is gone)."""
    store, period = _HEARTBEAT.get("store"), _HEARTBEAT.get("period")
    if store is None:
        return None
    watch_s = watch_s if watch_s is not None else 3 * period
    old = store.timeout
    try:
        store.set_timeout(datetime.timedelta(seconds=max(2.0, 2 * period)))
        store.add(f"{_FAILED}{dist.get_rank()}", 1)
        before = {r: store.add(f"{_PREFIX}{r}", 0) for r in ranks}
        time.sleep(watch_s)
        after = {r: store.add(f"{_PREFIX}{r}", 0) for r in ranks}
        failed = [r for r in ranks if store.add(f"{_FAILED}{r}", 0)]
    except Exception:  # noqa: BLE001 - the store cannot be read (its host is gone): None, as documented
        return None
    finally:
        with contextlib.suppress(Exception):
            store.set_timeout(old)
    return [r for r in ranks if after[r] == before[r] and r not in failed], failed


def collective_error(op: str, group: dist.ProcessGroup | None, exc: BaseException) -> CollectiveError:
    """A CollectiveError for `exc` raised by collective `op` on `group` (see the module docstring). Watches every
    rank's heartbeat, not only the group's: the rank that stalled may sit in another group this one waits on."""
    try:
        timeout = f"{group_timeout(group).total_seconds():g} s"
    except (RuntimeError, ValueError, AttributeError):
        timeout = "?"
    me = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    watched = silent_ranks([r for r in range(world) if r != me])
    silent = None if watched is None else watched[0]
    if watched is None:
        who = ("the rendezvous store cannot be reached, so the rank that failed is not known (the store's host, "
               "rank 0 or the launcher, may be the one that died)")
    else:
        silent, failed = watched
        if silent:
            who = (f"rank{'s' if len(silent) > 1 else ''} {fmt_ranks(silent)} stopped answering (no heartbeat for "
                   f"{3 * _HEARTBEAT['period']:.1f} s: stopped, hung or dead)")
        elif failed:
            who = f"rank{'s' if len(failed) > 1 else ''} {fmt_ranks(failed)} failed in a collective too"
        else:
            who = "every other rank is still alive (one may have called another collective, or raised an error)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err = CollectiveError(f"rank {me}: {op} on the {describe(group)} failed (timeout {timeout}): {who}; "
                          f"{type(exc).__name__}: {first[:300]}")
    err.silent = silent
    return err


__all__ = ["CollectiveError", "group_timeout", "fmt_ranks", "group_ranks", "name_group", "describe",
           "heartbeat_period", "start_heartbeat", "stop_heartbeat", "silent_ranks", "collective_error"]
