"""hpcserve control plane: head lifecycle, allocation providers, pools, CLI."""
