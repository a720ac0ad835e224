"""Loss functions: adversarial, aging and (later) relation distillation."""
