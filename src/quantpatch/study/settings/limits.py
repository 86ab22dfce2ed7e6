"""Bounds a study's settings share with the command line, importable without torch, so the
CLI refuses an impossible count before loading anything heavy."""

MAX_REPLICATES = 100
