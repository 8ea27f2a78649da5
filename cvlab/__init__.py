"""Ground-level modules that every layer (networks, datamodules, training systems, callbacks, the CLI) may import."""
