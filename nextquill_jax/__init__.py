"""NextQuill causal preference fine-tuning in JAX / Flax NNX.

Layers, each importing only those below it (README, "Architecture"; checked by tests/test_layers.py):
cli -> demo -> {eval, bench} -> train -> config -> loss -> data -> models -> parallel. `config_schema` and
`subcommand` import nothing of the package.
"""

__version__ = "0.1.0"
