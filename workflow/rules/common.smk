# Helpers of the workflow: the plan of cells (attn2d.plan expands conf/experiment/*.yaml, the single source of
# truth) and the get_* functions the rules call. Nothing here runs anything.
import json
import re
import shlex
import sys
from pathlib import Path

from attn2d import plan as plan_mod
from attn2d import records as records_mod
from attn2d.report import status as status_mod


def flag(key: str) -> bool:
    """A boolean config key (`--config key=false` gives the string "false")."""
    return str(config[key]).lower() == "true"


PYTHON = sys.executable  # the interpreter running Snakemake runs the cells, tables and figures too
CONF_DIR = config["conf_dir"]


def selected_experiments() -> list[str]:
    """config["experiments"] (list or comma-separated), or the default set for the launcher (see config.yaml)."""
    chosen = config.get("experiments")
    if isinstance(chosen, str):
        chosen = [e.strip() for e in chosen.split(",") if e.strip()]
    if chosen:
        return list(chosen)
    return plan_mod.default_experiments(CONF_DIR, paper=config["launcher"] == plan_mod.SLURM)


# experiment wildcards match experiment names only (results/tables/<other>.csv belong to other rules)
EXPERIMENT_WC = "|".join(re.escape(e) for e in plan_mod.experiment_names(CONF_DIR))

def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dry_run() -> bool:
    """Whether this is a dry run (-n). The Snakefile is read before Snakemake sets its executor, so the command
    line is read too."""
    if getattr(workflow, "dryrun", False):
        return True
    return any(a in ("-n", "--dry-run", "--dryrun", "--just-print")
               or (a.startswith("-") and not a.startswith("--") and a[1:].isalpha() and "n" in a) for a in sys.argv[1:])


# The plan, checked before anything runs: one error listing every problem (attn2d.report.checks).
try:
    PLAN = plan_mod.plan(
        selected_experiments(),
        conf_dir=CONF_DIR,
        launcher=config["launcher"],
        sweep=config.get("sweep") or None,
        overrides=" ".join(filter(None, [config.get("overrides", ""), config.get("launcher_overrides", "")])),
        check_cluster=flag("cluster_checks"),
    )
except plan_mod.PlanError as e:
    say(f"attn2d: {e}")
    sys.exit(1)
for note in PLAN.notes:
    say(f"attn2d: {note}")
JOBS = PLAN.jobs  # run dir -> Cell: one Snakemake job each
# the experiments whose cells run here: only they have records, tables and measured figures (the emulated one has
# its own rule, the paper's others are modelled); "(?!)" matches nothing
MEASURED_WC = "|".join(re.escape(e) for e in PLAN.experiments) or "(?!)"


def check_records() -> None:
    """Before the DAG: a corrupt record (unreadable, non-finite numbers, ...) is moved aside to <run dir>/corrupt/
    and its cell re-run; a record made with other launcher settings than the plan's is reported (and, with
    rerun_changed_launcher=true, moved aside to <run dir>/superseded/ and its cell re-run). A dry run only says."""
    changed = []
    for cell in JOBS.values():
        path = Path(cell.record)
        if not path.exists():
            continue
        try:
            rec = records_mod.read_record(path)
        except records_mod.RecordError as e:
            if dry_run():
                say(f"attn2d: corrupt record ({e}); a real run moves it to {cell.run_dir}/corrupt/ and re-runs the cell")
            else:
                kept = status_mod.set_aside(path, "corrupt")
                say(f"attn2d: corrupt record ({e}); moved to {kept} (kept) and the cell is run again")
            continue
        diff = status_mod.launcher_changes(rec.header, cell.resources.params)
        if diff:
            changed.append((cell, diff))
    if not changed:
        return
    rerun = flag("rerun_changed_launcher")
    for cell, diff in changed:
        if rerun and not dry_run():
            kept = status_mod.set_aside(Path(cell.record), "superseded")
            say(f"attn2d: {cell.run_dir}: launcher settings changed ({'; '.join(diff)}); record moved to {kept}, "
                "the cell is run again")
        else:
            say(f"attn2d: {cell.run_dir}: launcher settings changed since its record ({'; '.join(diff)})")
    if not rerun:
        say(f"attn2d: {len(changed)} cell(s) were run with other launcher settings than the plan's; their records are "
            "kept. Re-run them with --config rerun_changed_launcher=true")


check_records()

# Paper experiments not run here are still drawn from the cost model's projection ("modelled" figures).
MODELLED = flag("modelled")
MODEL_ONLY = (
    plan_mod.plan(
        [e for e in plan_mod.default_experiments(CONF_DIR, paper=True) if e not in PLAN.experiments],
        conf_dir=CONF_DIR,
        launcher=plan_mod.SLURM,
    )
    if MODELLED
    else None
)


def get_cell(wildcards) -> "plan_mod.Cell":
    key = f"runs/{wildcards.home}/{wildcards.cell}"
    if key not in JOBS:
        raise ValueError(f"{key} is not a cell of the selected experiments ({', '.join(PLAN.experiments)})")
    return JOBS[key]


def get_command(wildcards) -> str:
    """What the cell runs (a param: changing it re-runs the cell)."""
    return PLAN.command(get_cell(wildcards), PYTHON)


def get_job_info(wildcards) -> str:
    """The header fields of the cell's record, as JSON for run_cell.py (a param)."""
    return json.dumps(PLAN.job_info(get_cell(wildcards)))


def get_run_dir(wildcards) -> str:
    return get_cell(wildcards).run_dir


def get_threads(wildcards) -> int:
    """Cores a cell takes here: one per rank for a local launcher; a Slurm cell only waits for its job."""
    res = get_cell(wildcards).resources
    return res.ranks if res.local else 1


def job_resources(cell: "plan_mod.Cell") -> dict:
    """The cell rule's resources: where the cell's job runs (not params: changing them re-runs no cell)."""
    r = cell.resources
    return {"launcher": r.launcher, "nodes": r.nodes, "tasks_per_node": r.tasks_per_node,
            "gpus_per_node": r.gpus_per_node, "gpus": r.gpus, "partition": r.partition or "none",
            "account": r.account or "none (cluster default)", "runtime": r.timeout_min,
            "launcher_args": shlex.join(PLAN.launcher_overrides)}


def get_resource(key: str):
    """The input function of the cell rule's resource `key` (job_resources)."""

    def resource(wildcards):
        return job_resources(get_cell(wildcards))[key]

    return resource


def get_failed_attempts(wildcards) -> int:
    """The cell rule's rerun trigger for failed cells (see run.smk): copies of failed records in <run dir>/failed/,
    less one when retry_failed is false and the current record failed (that is the count it ran with)."""
    run_dir = Path(get_cell(wildcards).run_dir)
    n = len(list((run_dir / "failed").glob("attempt-*.jsonl")))
    if not flag("retry_failed") and record_status(run_dir / "metrics.jsonl") == "failed":
        n -= 1
    return n


def record_status(path: Path) -> str | None:
    """The status of a record ("ok" / "failed"), None when there is no valid record (check_records has moved a
    corrupt one aside)."""
    try:
        return records_mod.read_record(path).status
    except records_mod.RecordError:
        return None


def get_records(wildcards) -> list[str]:
    return [c.record for c in PLAN.experiments[wildcards.experiment]]


def get_cells_rows(wildcards) -> list[dict]:
    """The planned cells of an experiment (run here, or only modelled) as rows of results/tables/cells/."""
    cells = PLAN.experiments.get(wildcards.experiment) or MODEL_ONLY.experiments[wildcards.experiment]
    return plan_mod.cells_rows(cells)


def get_title(wildcards) -> str:
    return f"{wildcards.experiment}: {get_meta(wildcards.experiment).reproduces}"


def get_hardware(wildcards) -> str:
    """The cost-model profile an experiment's modelled figures are drawn with."""
    return get_meta(wildcards.experiment).hardware


def get_meta(name: str) -> "plan_mod.Experiment":
    if name in PLAN.meta:
        return PLAN.meta[name]
    return MODEL_ONLY.meta[name]


def measured_figures() -> list[str]:
    return [f"results/figures/{e}/{kind}.{ext}" for e, m in PLAN.meta.items() for kind in m.figures
            for ext in ("png", "pdf")]


def modelled_figures() -> list[str]:
    if MODEL_ONLY is None:
        return []
    return [f"results/figures/{e}/{kind}_modelled.{ext}" for e, m in MODEL_ONLY.meta.items() for kind in m.figures
            if kind in MODELLED_KINDS for ext in ("png", "pdf")]


MODELLED_KINDS = ("speedup", "time_per_step", "comm_bytes")  # what the projection table can draw


def final_outputs() -> list[str]:
    tables = [f"results/tables/{e}.{ext}" for e in PLAN.experiments for ext in ("csv", "md")]
    plans = [f"results/tables/cells/{e}.csv" for e in PLAN.experiments]
    model = model_outputs() if MODELLED else []  # defined by workflow/rules/model.smk
    return tables + plans + measured_figures() + modelled_figures() + model
