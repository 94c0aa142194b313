# Records -> tables: results/tables/<experiment>.csv (every column) and .md (readable), one row per cell, failed
# cells included with their reason; a malformed record stops the rule with an error naming the file.
# results/tables/cells/<experiment>.csv: the planned cells, their run dirs and job shapes (written from the plan).


rule table:
    input:
        get_records,
    output:
        csv=report("results/tables/{experiment}.csv", caption="../report/table.rst", category="Tables"),
        md="results/tables/{experiment}.md",
    log:
        "results/logs/tables/{experiment}.log",
    wildcard_constraints:
        experiment=MEASURED_WC,
    params:
        title=get_title,
    shell:
        "{PYTHON:q} -m attn2d.report.collect --experiment {wildcards.experiment:q} --title {params.title:q}"
        " --csv {output.csv:q} --md {output.md:q} {input:q} > {log:q} 2>&1"


rule cells_table:
    output:
        "results/tables/cells/{experiment}.csv",
    log:
        "results/logs/tables/cells/{experiment}.log",
    wildcard_constraints:
        experiment=EXPERIMENT_WC,
    params:
        rows=get_cells_rows,
    # a script, not `run:`: Snakemake starts a run: job through a shell line holding the --config values
    script:
        "../scripts/cells_table.py"
