"""Training: the run's set-up (`setup`, `model_setup`, `adapters` for LoRA runs), the pure step, the optax
chain, Orbax checkpoints, workdirs, metrics logs and counterfactual health, the loop, export, and the
`train` / `export` subcommands."""
