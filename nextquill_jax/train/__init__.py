"""Training: the run's set-up (`setup`, `model_setup`), the pure step, the optax chain, Orbax checkpoints,
workdirs, metrics logs, the loop, export, and the `train` / `export` subcommands."""
