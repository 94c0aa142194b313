"""The planned cells of one experiment as a CSV (rule cells_table): snakemake.params.rows -> snakemake.output[0],
one line in snakemake.log[0]."""
from pathlib import Path

import pandas as pd

smk = snakemake  # noqa: F821  (the object Snakemake runs this script with)
pd.DataFrame(smk.params.rows).to_csv(smk.output[0], index=False)
Path(smk.log[0]).write_text(f"{smk.output[0]}: {len(smk.params.rows)} planned cells\n")
