"""Evaluation: world-truth probes, metrics on generated clips, real-face metrics, the speed harness."""
