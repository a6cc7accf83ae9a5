"""One module per `lmproxy` verb; each parses its options and calls into the core."""
