"""Running a study: checks, stages, the runner, executors, analyses and output files."""
