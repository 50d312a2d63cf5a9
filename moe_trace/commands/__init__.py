"""One module per ``moe-trace`` subcommand; each defines ``register(subparsers)``."""
