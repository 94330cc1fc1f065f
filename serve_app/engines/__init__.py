"""Engine replicas: Serve deployments that turn GenerateRequests into deltas."""
