# The cost model (the package attn2d.costmodel): projection of the paper's cells, validation against the local sweep, the
# grid advisor's example, and (on demand only) calibration of this machine's profile.
#   results/tables/projection_paper.csv                    modelled step times of every A100 / H100 paper cell
#   results/tables/costmodel/sensitivity_paper.csv         modelled speedup at 64 GPUs vs the unknown network/kernel
#   results/tables/costmodel/paper_inverse.csv|md          which settings of the unknowns reproduce the stated maxima
#   results/figures/costmodel/paper_band_speedup.png|pdf   the projection's band over that region (modelled)
#   results/figures/costmodel/breakdown_a100_2p7b.png|pdf  per-term step time, Ring vs Attention2D (modelled)
#   results/tables/costmodel/validation_local.csv|md       predicted vs measured, local CPU sweep (error stated)
#   results/figures/costmodel/validation_local.png|pdf     the same as a figure
#   results/tables/costmodel/validation_timeshare.csv|md   its error explained: per-call cost of time-shared ranks
#   results/tables/costmodel/advise_example.txt            python -m attn2d.costmodel.advise: 64 A100s, GPT-3 13B, 64K
#   results/calibration/local_cpu.yaml                     `snakemake calibrate` only (never part of `all`);
#                                                          copy it over conf/hardware/local_cpu.yaml to adopt it
# model_outputs() lists the outputs that belong in `rule all`.

import glob

LOCAL_VALIDATION = ["local_speedup", "local_time_per_step"]  # the local sweeps whose records validate the model
PAPER_EXPERIMENTS = ["a100_speedup", "a100_time_per_step", "h100_speedup"]

COSTMODEL_SRC = sorted(glob.glob("src/attn2d/costmodel/*.py"))  # a rule reruns when the model's code changes

ruleorder: projection > table  # results/tables/projection_paper.csv is not an experiment's table


def get_validation_records(wildcards) -> list[str]:
    """Records of the local sweeps in the plan (validation needs them; failed ones are listed, not used)."""
    return [c.record for e in LOCAL_VALIDATION if e in PLAN.experiments for c in PLAN.experiments[e]]


def model_outputs() -> list[str]:
    """What the cost model adds to `rule all`: the projection, the advisor's example, and the validation when
    the local sweeps are among the selected experiments."""
    out = [config["projection"], "results/tables/costmodel/sensitivity_paper.csv",
           "results/tables/costmodel/advise_example.txt",
           "results/tables/costmodel/paper_inverse.csv", "results/tables/costmodel/paper_inverse.md"]
    out += [f"results/figures/costmodel/{f}.{x}" for f in ("paper_band_speedup", "breakdown_a100_2p7b")
            for x in ("png", "pdf")]
    if any(e in PLAN.experiments for e in LOCAL_VALIDATION):
        out += [f"results/tables/costmodel/validation_local.{x}" for x in ("csv", "md")]
        out += [f"results/figures/costmodel/validation_local.{x}" for x in ("png", "pdf")]
        out += [f"results/tables/costmodel/validation_timeshare.{x}" for x in ("csv", "md")]
    return out


rule costmodel_inverse:
    input:
        profiles=["conf/hardware/a100_4gpn.yaml", "conf/hardware/h100_1gpn.yaml"],
        experiments=expand("conf/experiment/{e}.yaml", e=["a100_speedup", "h100_speedup"]),
        model=COSTMODEL_SRC,
        script="workflow/scripts/costmodel_inverse.py",
    output:
        csv=report("results/tables/costmodel/paper_inverse.csv", caption="../report/table.rst", category="Tables",
                   subcategory="modelled"),
        md="results/tables/costmodel/paper_inverse.md",
    log:
        "results/logs/costmodel/paper_inverse.log",
    shell:
        "{PYTHON:q} {input.script:q} --out {output.csv:q} > {log:q} 2>&1"


rule projection:
    input:
        profiles=["conf/hardware/a100_4gpn.yaml", "conf/hardware/h100_1gpn.yaml"],
        experiments=expand("conf/experiment/{e}.yaml", e=PAPER_EXPERIMENTS),
        model=COSTMODEL_SRC,
        inverse="results/tables/costmodel/paper_inverse.csv",
        script="workflow/scripts/costmodel_projection.py",
    output:
        projection=report(config["projection"], caption="../report/table.rst", category="Tables",
                          subcategory="modelled"),
        sensitivity="results/tables/costmodel/sensitivity_paper.csv",
        figures=[f"results/figures/costmodel/{f}.{x}" for f in ("paper_band_speedup", "breakdown_a100_2p7b")
                 for x in ("png", "pdf")],
    log:
        "results/logs/costmodel/projection.log",
    params:
        experiments=" ".join(PAPER_EXPERIMENTS),
    shell:
        "{PYTHON:q} {input.script:q} --out {output.projection:q} --sensitivity {output.sensitivity:q} --figures ''"
        " --inverse {input.inverse:q} --band-figures results/figures/costmodel"
        " --experiments {params.experiments} > {log:q} 2>&1"


rule costmodel_validation:
    input:
        records=get_validation_records,
        profile="conf/hardware/local_cpu.yaml",
        model=COSTMODEL_SRC,
        script="workflow/scripts/costmodel_validation.py",
    output:
        csv=report("results/tables/costmodel/validation_local.csv", caption="../report/table.rst",
                   category="Tables", subcategory="modelled"),
        md="results/tables/costmodel/validation_local.md",
        png=report("results/figures/costmodel/validation_local.png", caption="../report/figure.rst",
                   category="Figures", subcategory="cost model"),
        pdf="results/figures/costmodel/validation_local.pdf",
    log:
        "results/logs/costmodel/validation_local.log",
    params:
        experiments=" ".join(LOCAL_VALIDATION),
    shell:
        "{PYTHON:q} {input.script:q} --runs runs --experiments {params.experiments} --hardware local_cpu"
        " --table {output.csv:q} --figure results/figures/costmodel/validation_local > {log:q} 2>&1"


rule costmodel_timeshare:
    input:
        validation="results/tables/costmodel/validation_local.csv",
        holdout=expand("results/benchmarks/timeshare_p6/{a}/metrics.jsonl", a=["attn2d", "ring", "attn2d_overlap"]),
        profile="conf/hardware/local_cpu.yaml",
        model=COSTMODEL_SRC,
        script="workflow/scripts/costmodel_timeshare.py",
    output:
        csv="results/tables/costmodel/validation_timeshare.csv",
        md="results/tables/costmodel/validation_timeshare.md",
    log:
        "results/logs/costmodel/validation_timeshare.log",
    shell:
        "{PYTHON:q} {input.script:q} --validation {input.validation:q} --holdout {input.holdout:q}"
        " --hardware local_cpu --out {output.csv:q} > {log:q} 2>&1"


rule advise_example:
    input:
        "conf/hardware/a100_4gpn.yaml",
        "conf/model/gpt3_13b.yaml",
    output:
        "results/tables/costmodel/advise_example.txt",
    log:
        "results/logs/costmodel/advise_example.log",
    shell:
        "{PYTHON:q} -m attn2d.costmodel.advise gpus=64 gpus_per_node=4 model=gpt3_13b seq_len=65536 hardware=a100_4gpn"
        " fsdp=true activation_checkpointing=true > {output:q} 2> {log:q}"


rule calibrate:
    # On demand only (`snakemake calibrate`): measures this machine (gloo, 4 and 9 ranks: the local sweep's P)
    output:
        "results/calibration/local_cpu.yaml",
    log:
        "results/logs/costmodel/calibrate.log",
    shell:
        "{PYTHON:q} -m attn2d.costmodel.calibrate --world 4 9 --out {output:q} > {log:q} 2>&1"


localrules:
    costmodel_inverse,
    costmodel_timeshare,
    projection,
    costmodel_validation,
    advise_example,
    calibrate,
