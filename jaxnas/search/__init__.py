"""The search run: strategies driven over a space, evaluated, checkpointed and reported."""
