# Tables -> figures in the paper's shapes (attn2d.report.figures; PNG for the report, PDF for papers):
#   results/figures/<experiment>/<kind>.png|pdf           measured (+ the cost model's projection beside it)
#   results/figures/<experiment>/<kind>_modelled.png|pdf  the projection alone, for paper experiments not run here
# Every figure names its source (measured on which devices and nodes / modelled with which cost-model profile).

KINDS = "speedup|time_per_step|comm_bytes"


def get_projection(wildcards):
    return [config["projection"]] if MODELLED else []


def get_reported_args(wildcards) -> str:
    """--reported JSON for a speedup figure of an experiment whose file states what the paper reports."""
    reported = list(get_meta(wildcards.experiment).reported)
    if wildcards.kind != "speedup" or not reported:
        return ""
    return f"--reported {shlex.quote(json.dumps(reported))}"


def get_model_args(wildcards, input):
    """--modelled/--hardware for a measured figure when the cost model's projection is an input."""
    if not input.projection:
        return ""
    projection = input.projection[0] if isinstance(input.projection, list) else input.projection
    return f"--modelled {shlex.quote(projection)} --hardware {shlex.quote(get_meta(wildcards.experiment).hardware)}"


rule figure:
    input:
        table="results/tables/{experiment}.csv",
        projection=get_projection,
    output:
        png=report("results/figures/{experiment}/{kind}.png", caption="../report/figure.rst", category="Figures",
                   subcategory="{experiment}", labels={"experiment": "{experiment}", "figure": "{kind}"}),
        pdf="results/figures/{experiment}/{kind}.pdf",
    log:
        "results/logs/figures/{experiment}/{kind}.log",
    wildcard_constraints:
        experiment=MEASURED_WC,
        kind=KINDS,
    params:
        model_args=get_model_args,
        reported=get_reported_args,
    shell:
        "{PYTHON:q} -m attn2d.report.figures {wildcards.kind:q}"
        " --out results/figures/{wildcards.experiment:q}/{wildcards.kind:q}"
        " --measured {input.table:q} {params.model_args} {params.reported} > {log:q} 2>&1"


rule figure_modelled:
    input:
        cells="results/tables/cells/{experiment}.csv",
        projection=config["projection"],
    output:
        png=report("results/figures/{experiment}/{kind}_modelled.png", caption="../report/figure.rst",
                   category="Figures", subcategory="{experiment}",
                   labels={"experiment": "{experiment}", "figure": "{kind} (modelled)"}),
        pdf="results/figures/{experiment}/{kind}_modelled.pdf",
    log:
        "results/logs/figures/{experiment}/{kind}_modelled.log",
    wildcard_constraints:
        experiment=EXPERIMENT_WC,
        kind=KINDS,
    params:
        hardware=get_hardware,
        reported=get_reported_args,
    shell:
        "{PYTHON:q} -m attn2d.report.figures {wildcards.kind:q}"
        " --out results/figures/{wildcards.experiment:q}/{wildcards.kind:q}_modelled"
        " --cells {input.cells:q} --modelled {input.projection:q} --hardware {params.hardware:q} {params.reported}"
        " > {log:q} 2>&1"
