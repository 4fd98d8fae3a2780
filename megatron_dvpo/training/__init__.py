"""Training parts every job is built from: the trained-model unit, the step loop, the CLI."""
