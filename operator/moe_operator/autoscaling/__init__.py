"""The built-in autoscaler: the pure decision and the signals it samples."""
