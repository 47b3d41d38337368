"""The training core: state, step, loss, optimizer, checkpoints and the run's runtime."""
