# The emulated cluster (attn2d.distributed.emulate): a small subset of conf/experiment/emulated_speedup.yaml run on
# network namespaces with tbf-shaped links, measured on an emulated network (tbf, R per node, no latency
# emulation), then its table, the cost model's validation on those cells and the figure. Skipped with one line
# (and outputs that say so) where namespaces cannot be made. In `all` with config emulated=true (the local
# profile sets it), never with the Slurm launcher.
EMULATED_OUTPUTS = [
    *[f"results/tables/emulated_speedup{s}.{e}" for s in ("", "_validation") for e in ("csv", "md")],
    *[f"results/figures/emulated_speedup/speedup.{e}" for e in ("png", "pdf")],
]


rule emulated_speedup:
    output:
        EMULATED_OUTPUTS,
    log:
        "results/logs/emulated_speedup.log",
    threads: workflow.cores  # its ranks share the machine's cores: nothing else beside it
    shell:
        "{PYTHON} workflow/scripts/emulated_local.py --runs runs/emulated_speedup"
        " --out results/tables/emulated_speedup --figure results/figures/emulated_speedup/speedup > {log} 2>&1"


if flag("emulated") and config["launcher"] != plan_mod.SLURM:
    _final_outputs_without_emulated = final_outputs

    def final_outputs() -> list[str]:  # rule all's targets, with the emulated outputs added
        return _final_outputs_without_emulated() + EMULATED_OUTPUTS
