"""The API the operator serves and reads: the contract's names, the typed spec, condition reasons."""
