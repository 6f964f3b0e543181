"""The run: its setup (built once), the train step, the training loop, the eval job, checkpoints, the workdir
lock and fencing, signals, goodput and the compilation cache."""
