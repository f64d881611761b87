"""Running jobs: the one runner every front end uses (`runner`: `JobConfig`, decode → group by shape → encode → segment
→ sinks, one error policy, resume as `done(name, source)`) and the dataset-scale Ray job (`dataset`)."""
