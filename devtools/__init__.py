"""Tools for developing and demonstrating the project: the demo, a bounded load generator, and the
harness that runs the operator in tests. Not shipped in the operator image."""
