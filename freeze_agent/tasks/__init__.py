"""Tasks: datasets, model families, the YAML task spec and the Trainer that runs one."""
