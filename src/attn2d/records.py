"""Run records: `config.yaml` and `metrics.jsonl` in a run directory, written atomically, read with validation.

metrics.jsonl holds one JSON object per line (schema: schemas/metrics.schema.json):
    {"kind": "header", "cell": {...}, "config": {...}, "versions": {...}, "hosts": [...], "devices": [...],
     "git_rev": ..., "started_at": iso, "job": {launcher, scheduler, job_id, job_name, partition, account,
     nodelist, requeue_count, launcher_params} | null (optional: where it ran, `job_header`)}
    {"kind": "step", "step", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "max_mem_gib",
     "comm_bytes_sent", "comm_bytes_received", "comm_messages", "attn_comm_bytes_sent", "attn_comm_messages",
     "loss", "comm_by_op": {op: {bytes_sent, bytes_received, messages}}, "comm_per_rank": [...]}   (per timed step)
    {"kind": "end", "status": "ok" | "failed", "reason": str | null, "finished_at": iso}

Atomicity: rank 0 appends to `metrics.jsonl.partial` and renames it to `metrics.jsonl` only after the end line, so
a run that died half-way is never read as complete; `read_record` refuses `.partial` files. A failed run still gets
a complete record, with status "failed" and the reason.

Provenance (what a header says of the run) is built here too: `header` (cell, resolved config, versions, hosts,
devices, git revision, launcher, job), `cell` (the one definition of a header's cell, fields from the schema) and
`cell_of` (the cell of a composed config).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import submitit
from omegaconf import DictConfig, OmegaConf

METRICS = "metrics.jsonl"
PARTIAL = METRICS + ".partial"
CONFIG = "config.yaml"
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "metrics.schema.json"
_CELL_SCHEMA = json.loads(SCHEMA_PATH.read_text())["$defs"]["header"]["properties"]["cell"]
CELL_FIELDS = tuple(_CELL_SCHEMA["properties"])  # every field a header's cell may hold, in record order
CELL_REQUIRED = tuple(_CELL_SCHEMA["required"])  # those every cell holds (null where unknown)


class RecordError(ValueError):
    """A record that is malformed, incomplete or missing; the message names the file and the problem."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json_safe(x: Any) -> Any:
    """Non-finite floats become null (strict JSON has no NaN); containers are walked."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- writing
class RecordWriter:
    """Rank 0's writer of one run's record (with enabled=False, e.g. on other ranks, every call does nothing).

    header(...) once, step(...) per timed step, end(status, reason) once: end writes the last line and renames
    the .partial file. If end() comes before header() (a run that failed early), `fallback_header` is written
    first so the record is still complete and valid."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, fallback_header: dict | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.fallback_header = fallback_header
        self._file = None
        self._ended = False
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / METRICS).unlink(missing_ok=True)  # a re-run replaces the old record, never mixes
            self._file = open(self.run_dir / PARTIAL, "w")

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS

    def write_config(self, yaml_text: str) -> None:
        if self.enabled:
            _atomic_write_text(self.run_dir / CONFIG, yaml_text)

    def _line(self, obj: dict) -> None:
        self._file.write(json.dumps(_json_safe(obj), allow_nan=False) + "\n")
        self._file.flush()

    def header(self, header: dict) -> None:
        if self.enabled:
            self._line({"kind": "header", **header})
            self.fallback_header = None

    def step(self, metrics: dict) -> None:
        if self.enabled:
            self._line({"kind": "step", **metrics})

    def end(self, status: str = "ok", reason: str | None = None) -> None:
        if not self.enabled or self._ended:
            return
        self._ended = True
        if self.fallback_header is not None:
            self._line({"kind": "header", **self.fallback_header})
        self._line({"kind": "end", "status": status, "reason": reason, "finished_at": now_iso()})
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.run_dir / PARTIAL, self.run_dir / METRICS)


def write(run_dir: str | os.PathLike, header: dict, steps: Iterable[dict], status: str = "ok",
          reason: str | None = None, config_yaml: str | None = None) -> Path:
    """Write a whole record at once (tests, tools); returns the path of metrics.jsonl."""
    w = RecordWriter(run_dir)
    if config_yaml is not None:
        w.write_config(config_yaml)
    w.header(header)
    for s in steps:
        w.step(s)
    w.end(status, reason)
    return w.path


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Record:
    path: Path
    header: dict
    steps: list[dict] = field(default_factory=list)
    end: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.end["status"]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def cell(self) -> dict:
        return self.header["cell"]


@lru_cache(maxsize=1)
def _validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_line(obj: Any) -> str | None:
    """None if `obj` is a valid record line, else a one-line description of the first problem."""
    errors = sorted(_validator().iter_errors(obj), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    e = errors[0]
    where = "/".join(str(p) for p in e.absolute_path) or "(line)"
    return f"{where}: {e.message}"


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    """json's parse_constant hook: strict JSON has no NaN / Infinity (the writer never writes them)."""
    raise _NonFinite(name)


def read_record(path: str | os.PathLike) -> Record:
    """Read and validate a complete record: a run directory or its metrics.jsonl.

    Raises RecordError naming the file and the problem: missing file, a .partial (unfinished) record, a line that
    is not JSON (NaN and Infinity included) or does not match the schema, or lines out of order (header, steps,
    end)."""
    p = Path(path)
    if p.is_dir():
        if not (p / METRICS).exists() and (p / PARTIAL).exists():
            raise RecordError(f"{p / PARTIAL}: the run has not finished (only a .partial record exists)")
        p = p / METRICS
    if p.name.endswith(".partial"):
        raise RecordError(f"{p}: is a partial record of an unfinished run; only {METRICS} files are complete")
    if not p.exists():
        raise RecordError(f"{p}: no such record")
    header, steps, end = None, [], None
    lines = p.read_text().splitlines()
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            raise RecordError(f"{p}: line {i} is empty")
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise RecordError(f"{p}: line {i} is not JSON ({e.msg} at column {e.colno})") from None
        except _NonFinite as e:
            raise RecordError(f"{p}: line {i} holds the non-finite number {e} (records hold finite numbers or "
                              "null)") from None
        problem = validate_line(obj)
        if problem:
            raise RecordError(f"{p}: line {i} ({obj.get('kind', '?') if isinstance(obj, dict) else '?'}): {problem}")
        kind = obj["kind"]
        if i == 1 and kind != "header":
            raise RecordError(f"{p}: line 1 must be the header, found kind {kind!r}")
        if i > 1 and kind == "header":
            raise RecordError(f"{p}: line {i} is a second header")
        if end is not None:
            raise RecordError(f"{p}: line {i} comes after the end line")
        if kind == "header":
            header = obj
        elif kind == "step":
            if steps and obj["step"] <= steps[-1]["step"]:
                raise RecordError(f"{p}: line {i}: step {obj['step']} does not follow step {steps[-1]['step']}")
            steps.append(obj)
        else:
            end = obj
    if header is None:
        raise RecordError(f"{p}: the record is empty")
    if end is None:
        raise RecordError(f"{p}: the record has no end line (the run did not finish)")
    if end["status"] == "ok" and not steps:
        raise RecordError(f"{p}: status ok but no step lines")
    return Record(p, header, steps, end)


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every complete metrics.jsonl under `root` (sorted); unfinished .partial records are not listed."""
    return sorted(Path(root).rglob(METRICS))


# ---------------------------------------------------------------------------------------------- provenance
def cell(**fields: Any) -> dict:
    """A header's `cell` from its fields (CELL_FIELDS, in that order): every one of CELL_REQUIRED (None where
    unknown), optional ones (`grid`, the conf/grid option) where known. ValueError names an unknown or missing
    field."""
    unknown = sorted(set(fields) - set(CELL_FIELDS))
    missing = [k for k in CELL_REQUIRED if k not in fields]
    if unknown or missing:
        raise ValueError(f"cell: unknown field(s) {unknown}, missing field(s) {missing}; fields: {CELL_FIELDS}")
    return {k: fields[k] for k in CELL_FIELDS if k in fields}


def cell_of(cfg: DictConfig, world_size: int | None, hosts: list[str], device_type: str) -> dict:
    """The cell a run of the composed `cfg` measures, on `world_size` ranks on `hosts` (one per rank); a key the
    config lacks or cannot resolve is None. GPUs per node: ranks per host on CUDA, 0 on CPU."""
    def sel(key):
        try:
            return OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an unresolvable key is unknown, not a reason to fail the record
            return None

    nodes = len(set(hosts)) or None
    return cell(
        experiment=sel("experiment_name"), model=sel("model.name"), attention=sel("attention.name"),
        rows=sel("grid.rows"), cols=sel("grid.cols"), world_size=world_size, nodes=nodes,
        gpus_per_node=world_size // nodes if device_type == "cuda" and nodes and world_size else 0,
        seq_len=sel("benchmark.seq_len"), batch_size=sel("benchmark.batch_size"), dtype=sel("benchmark.dtype"),
        device=device_type,
    )


def resolved_config(cfg: DictConfig) -> dict:
    """The composed config as a dict, resolved (with the interpolation text where a key cannot be resolved)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable key: keep the interpolation text
        return OmegaConf.to_container(cfg, resolve=False)


def device_name(device) -> str:
    """The name of a torch.device: the GPU's, or "cpu: <CPU model>"."""
    import torch  # only a run's own header needs torch: the workflow reads and writes records without it

    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cuda (not available)"
    return "cpu: " + cpu_model()


def rank_info(device) -> dict[str, str]:
    """This rank's host and device name (a header lists every rank's, in rank order)."""
    return {"host": socket.gethostname(), "device": device_name(device)}


def versions() -> dict[str, str | None]:
    """Python, torch (and its CUDA and NCCL) and the installed versions of the packages a run depends on."""
    import torch  # only a run's own header needs torch: the workflow reads and writes records without it

    out = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for pkg in ("torch", "attn2d", "hydra-core", "omegaconf", "submitit", "hydra-submitit-launcher", "flash-attn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def git_rev() -> str | None:
    """HEAD of the repository holding this package, '+dirty' when the tree has changes; None outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_header() -> dict[str, Any] | None:
    """The `job` key of a record header, for the process it runs in: {launcher, scheduler, job_id, job_name,
    partition, account, nodelist, requeue_count, launcher_params}, null where a field does not apply (a local job
    has no partition); None for a run no launcher started (plain python, torchrun)."""
    launcher, params = None, None
    try:
        from hydra.core.hydra_config import HydraConfig  # a run's header only: the workflow's readers skip Hydra

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            launcher = hc.runtime.choices.get("hydra/launcher")
            params = OmegaConf.to_container(hc.launcher, resolve=True)
            params.pop("_target_", None)
    except Exception:  # noqa: BLE001 - provenance must never stop a run
        pass
    try:
        env = submitit.JobEnvironment()
        scheduler, job_id = env.cluster, str(env.job_id)
    except RuntimeError:  # not a submitit job
        return None
    slurm = scheduler == "slurm"

    def var(name):
        return os.environ.get(name) if slurm else None

    return {
        "launcher": launcher, "scheduler": scheduler, "job_id": job_id,
        "job_name": var("SLURM_JOB_NAME") if slurm else (params or {}).get("name"),
        "partition": var("SLURM_JOB_PARTITION"), "account": var("SLURM_JOB_ACCOUNT"),
        "nodelist": var("SLURM_JOB_NODELIST"),
        "requeue_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)) if slurm else None,
        "launcher_params": params,
    }


def header(cfg: DictConfig, world_size: int | None, device, launcher: str | None, started: str,
           ranks: list[dict[str, str]] | None = None, with_git: bool = True) -> dict:
    """A run's header (without kind): its cell, resolved config, versions, hosts, devices, git revision, start,
    launcher and job. `ranks`: every rank's `rank_info`, in rank order; None: this rank's alone (the header of a
    run that fails before it knows every rank)."""
    ranks = ranks or [rank_info(device)]
    hosts = [r["host"] for r in ranks]
    return {"cell": cell_of(cfg, world_size, hosts, device.type), "config": resolved_config(cfg),
            "versions": versions(), "hosts": hosts, "devices": [r["device"] for r in ranks],
            "git_rev": git_rev() if with_git else None, "started_at": started, "launcher": launcher,
            "job": job_header()}


def cpu_model() -> str:
    """The host's CPU model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

