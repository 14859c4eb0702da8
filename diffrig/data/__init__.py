"""Photos to training data: alignment, DECA-style crops, LMDB records and datasets, synthetic world."""
