"""Deployment tests: the image, the stack, certificates and Kubernetes manifests (slow)."""
