"""bdo's orchestrator: the only package that knows Ray and MLflow (trainables, Tune, tracking, caching, CLI)."""
