"""Storage: save and load pruned models without pickle."""
