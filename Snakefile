# attn2d: reproduce the figures of ATTENTION2D (arXiv 2503.15758) from the experiments in conf/experiment/.
#
#   snakemake --profile cluster_profiles/local          CPU-scale reproduction here (local_* experiments)
#   snakemake --profile slurm -n                        the paper's cells on Slurm, dry run: one job per cell
#   snakemake --profile slurm --config 'experiments=[a100_speedup]' 'sweep=model=gpt3_2p7b'
#   snakemake --profile cluster_profiles/local --report results/report.html
#
# Table of contents (workflow/rules/):
#   common.smk   the plan: experiments -> cells (attn2d.plan reads conf/experiment/*.yaml), get_* helpers
#   run.smk      one job per cell: python -m attn2d.train -m ... hydra/launcher=<launcher>; failed cells re-run
#   collect.smk  records -> results/tables/<experiment>.csv|md (failed cells listed with their reason)
#   figures.smk  tables -> results/figures/<experiment>/<kind>.png|pdf, labelled measured / modelled
#   model.smk    the cost model's rules -> results/tables/projection_paper.csv (in `all` with modelled=true)
# Config keys: workflow/config/config.yaml (checked against workflow/schemas/config.schema.yaml).
# Before anything runs the plan is checked (attn2d.report.checks: one error listing every problem); at the end the
# failed cells are listed and the exit status is 1 if any planned cell failed (allow_failed_cells=true: 0).
import atexit

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "workflow/config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/run.smk"
include: "workflow/rules/collect.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/emulated.smk"
include: "workflow/rules/model.smk"


localrules:
    all,
    table,
    cells_table,
    figure,
    figure_modelled,


rule all:
    input:
        final_outputs(),


# The end: every table and figure that could be drawn is drawn (failed cells exit 0 with a failed record, and
# keep-going runs the rest); then the failed cells are listed and the exit status is 1 unless
# allow_failed_cells=true. A dry run ends with the cell jobs counted by job shape.
_REPORTED = []


def report_failed_cells(ended_with_error: bool) -> None:
    _REPORTED.append(True)
    failed = status_mod.failed_cells(JOBS)
    if failed:
        say(f"\nattn2d: {len(failed)} of {len(JOBS)} planned cells FAILED (their records keep the whole reason):\n"
            + status_mod.failed_table(failed))
        if flag("allow_failed_cells"):
            say("attn2d: allow_failed_cells=true: the tables and figures show them as failed; exit status 0")
        else:
            say("attn2d: exit status 1 (accept failed cells with --config allow_failed_cells=true; the next "
                "snakemake re-runs them unless retry_failed=false)")
    if (failed and not flag("allow_failed_cells")) or ended_with_error:
        sys.exit(1)


onsuccess:
    report_failed_cells(False)


onerror:
    report_failed_cells(True)


def _at_exit() -> None:
    """Snakemake has no hook after a dry run, nor after "Nothing to be done": a dry run ends with the cell jobs by
    shape; a run that had nothing to do still lists the failed cells (their records are kept as failed, e.g. with
    retry_failed=false; the exit status stays 0 there)."""
    if workflow.dag is None or _REPORTED:
        return
    if not getattr(workflow, "dryrun", False):
        failed = status_mod.failed_cells(JOBS, ask_scheduler=False) if workflow.executor_plugin is not None else []
        if failed:
            say(f"\nattn2d: nothing was run, but {len(failed)} of {len(JOBS)} planned cells are FAILED:\n"
                + status_mod.failed_table(failed))
        return
    jobs = [j for j in workflow.dag.needrun_jobs(exclude_finished=False) if j.rule.name == "cell"]
    if jobs:
        say(status_mod.shape_summary({k: j.resources.get(k) for k in status_mod.SHAPE_KEYS} for j in jobs))


atexit.register(_at_exit)
