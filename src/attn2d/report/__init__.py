"""The reproduction's bookkeeping: experiments -> cells (`cells`, the Snakemake workflow's plan), run records ->
tables (`collect`), tables -> the paper's figures (`figures`)."""
