"""The training engine: what one model's training is (model, optimizers and stepping, the loop,
dynamics, stacked seeds)."""
