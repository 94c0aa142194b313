"""The reproduction's bookkeeping after the plan (attn2d.plan): run records -> tables (`collect`), tables -> the
paper's figures (`figures`, `figures_modelled`), the workflow's plan-time checks (`checks`) and end-of-run status
(`status`)."""
