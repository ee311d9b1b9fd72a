"""Flow matching: targets, schedules, samplers and guidance (pure functions)."""
