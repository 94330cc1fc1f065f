"""hpcserve data plane: everything that runs inside Ray Serve."""

import sys as _sys

if "ray.serve._private.replica" in _sys.modules:  # inside a Serve replica process
    from serve_app.serve_binds import bind_replica_grpc_to_node_ip

    bind_replica_grpc_to_node_ip()
