"""The controller: config, search space, optimizer, the evaluation loop and the CLI."""
