"""What the launcher, the workers and the tools all need: errors, the config schema, host facts,
file writes, process spawning. Nothing here imports from `launch`, `train`, `models` or `tools`."""
