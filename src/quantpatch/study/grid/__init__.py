"""The grid of a study: its cells, the threat model's rules, and scoring a cell."""
