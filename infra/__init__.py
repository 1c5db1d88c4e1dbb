"""Local stack and cluster manifests."""
