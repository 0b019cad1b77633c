"""lm-eval task configs shipped with autoq (YAML data, package ``autoq.evals``)."""
