"""The method's core, model-free and torch only: the objective, sigma schedules, the one sampler, weight shadows."""
