"""The runtime floor: Ray Train and Tune around the engine, MLflow tracking, the registry and promotion,
serving, the model resolver, and the run specification. Never imported by the model library."""
