"""Training: config -> model and train state (`state`), the jitted steps (`steps`), the loop
that trains, evaluates, checkpoints and resumes (`loop`), its records (`metrics`), the
checkpoints (`checkpointing`) and the one-run-per-workdir lock (`workdir_lock`)."""
