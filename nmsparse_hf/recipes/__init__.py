"""Training recipes: thin front ends over `NMSparseTrainer` (the scripts under ``recipes/`` call
them), their model and seed-YAML helpers, and the configs they ship (``configs/``)."""
