"""The planned cells of one experiment as a CSV (rule cells_table): snakemake.params.rows -> snakemake.output[0]."""
import pandas as pd

pd.DataFrame(snakemake.params.rows).to_csv(snakemake.output[0], index=False)  # noqa: F821 (set by Snakemake)
