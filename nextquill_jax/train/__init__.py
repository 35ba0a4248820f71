"""Training: the typed config's runtime side (mesh, model set-up), the pure train step, the optax chain, Orbax
checkpoints, metrics logs, the loop, and the `train` / `export` subcommands."""
