"""The training loop and its parts: the Trainer, its guards, the learning-rate schedule, the
regularizers, the in-loop evaluation, the metrics. Only the worker imports it."""
