"""Running jobs: the one runner every front end uses (`runner`: decode, encode, segment, one error policy) and the
dataset-scale Ray job (`dataset`)."""
