# One job per cell: `python -m attn2d.train -m experiment=<exp> <sweep point> hydra/launcher=<launcher> ...`, a
# one-point Hydra multirun whose submitit launcher submits the cell (a Slurm job, or local processes) and waits for
# it. Snakemake itself always runs locally; where the ranks run is the Hydra launcher's business.
#
# Re-runs: a cell is run when its record runs/<home>/<cell>/metrics.jsonl is missing, when what it runs changed
# (params: the command and the cell), or when it FAILED: run_cell.py copies every failed record to
# <run dir>/failed/attempt-<k>.jsonl, and `failed_attempts` (the number of copies) is a param, so after a failure
# it differs from the value the job ran with and Snakemake's "params changed" trigger runs the cell again. With
# retry_failed=false it is computed as the value the failed run had, so failed cells stay as they are. A failed
# cell thus always has a record (status failed, its reason) and appears in the tables as failed.
# Where the job runs (launcher, partition, account, nodes, time limit) are resources, not params: changing them
# does not re-run cells that have a record; the next snakemake names such cells (common.smk check_records) and
# rerun_changed_launcher=true re-runs them. The dry run (-n) prints them for every cell and counts jobs by shape.
# A corrupt record is moved to <run dir>/corrupt/ before the DAG is built, so its cell runs again.
# Pre-emption: the launchers are checkpointable, so submitit requeues a pre-empted Slurm job and this job keeps
# waiting. Interrupts (Ctrl-C, SIGTERM, SIGHUP) reach run_cell.py, which stops the cell's processes and cancels its
# Slurm job, or with ATTN2D_DETACH=1 leaves the job running; the next run re-attaches to a job still pending or
# running (its id is in <run dir>/job.json) instead of submitting a second one. See README "Interrupts".


rule cell:
    output:
        "runs/{home}/{cell}/metrics.jsonl",
    log:
        "results/logs/cells/{home}/{cell}.log",
    wildcard_constraints:
        home="[A-Za-z0-9_]+",
        cell="[^/]+",
    params:
        command=get_command,
        info=get_job_info,
        run_dir=get_run_dir,
        failed_attempts=get_failed_attempts,
        timeout_min=config["cell_timeout_min"],
    threads: get_threads
    resources:
        launcher=get_resource("launcher"),
        nodes=get_resource("nodes"),
        tasks_per_node=get_resource("tasks_per_node"),
        gpus_per_node=get_resource("gpus_per_node"),
        gpus=get_resource("gpus"),
        partition=get_resource("partition"),
        account=get_resource("account"),
        runtime=get_resource("runtime"),
        launcher_args=get_resource("launcher_args"),
    # every placeholder is shell-quoted (:q); params.command is already a shlex-quoted argument list
    shell:
        "{PYTHON:q} workflow/scripts/run_cell.py --run-dir {params.run_dir:q} --info {params.info:q}"
        " --nodes {resources.nodes:q} --gpus-per-node {resources.gpus_per_node:q}"
        " --launcher {resources.launcher:q} --launcher-args={resources.launcher_args:q}"
        " --timeout-min {params.timeout_min:q} -- {params.command} > {log:q} 2>&1"
