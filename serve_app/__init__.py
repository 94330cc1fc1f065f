"""hpcserve data plane: everything that runs inside Ray Serve."""
