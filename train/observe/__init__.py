"""What a run shows while it trains: console, wandb, and the clocks behind the step-time
breakdown."""
