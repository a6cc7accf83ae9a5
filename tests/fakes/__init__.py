"""Fakes of what cannot exist on a test machine, each at the narrowest boundary."""
