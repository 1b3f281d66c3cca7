"""Ray Train: settings, checks before a run, the worker loop, the driver; the users' data shards."""
