"""Rollouts: the canary and blue-green state machine, GPU layout arithmetic, user and alert requests."""
