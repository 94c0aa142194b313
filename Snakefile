# attn2d: reproduce the figures of ATTENTION2D (arXiv 2503.15758) from the experiments in conf/experiment/.
#
#   snakemake --profile cluster_profiles/local          CPU-scale reproduction here (local_* experiments)
#   snakemake --profile slurm -n                        the paper's cells on Slurm, dry run: one job per cell
#   snakemake --profile slurm --config 'experiments=[a100_speedup]' 'sweep=model=gpt3_2p7b'
#   snakemake --profile cluster_profiles/local --report results/report.html
#
# Table of contents (workflow/rules/):
#   common.smk   the plan: experiments -> cells (attn2d.report.cells reads conf/experiment/*.yaml), get_* helpers
#   run.smk      one job per cell: python -m attn2d.train -m ... hydra/launcher=<launcher>; failed cells re-run
#   collect.smk  records -> results/tables/<experiment>.csv|md (failed cells listed with their reason)
#   figures.smk  tables -> results/figures/<experiment>/<kind>.png|pdf, labelled measured / modelled
#   model.smk    (the cost model's rules, when present) -> results/tables/projection_paper.csv
# Config keys: workflow/config/config.yaml (checked against workflow/schemas/config.schema.yaml).
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


if HAVE_MODEL:

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
