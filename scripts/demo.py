"""The offline demo. Grows with the pipeline and trainer issues."""

print("make demo: the data generation pipeline is not there yet (see the open issues).")
