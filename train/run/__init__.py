"""What a run is and leaves on disk: its identity, folder, checkpoints, resume and hang records.
The launcher, the doctor and the workers all import this package; it imports no training loop."""
