"""bdo's benchmark suite: every figure is a ratio against a baseline measured in the same run.

Run it with `python -m benchmarks [--quick] [--device cpu|cuda] [--only NAME,...] [--json out.json]`; the latest
figures live in benchmarks/RESULTS.md. Modules: throughput (method training vs a per-image DataLoader, the GPU
fast path, processes sharing a device), adversarial (PGD and FCT scoring), orchestrator (Tune/MLflow overhead,
sweep reuse, trivial trials); common, suite, worker and report hold the machinery.
"""
