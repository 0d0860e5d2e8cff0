"""Benchmarks of the plugin against LMDeploy's own paths; run as ``python -m benchmarks.<name>`` from the repo root."""
