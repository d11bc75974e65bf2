"""One training loop for every Task, its optimizer, checkpoints and plots."""
