"""The control plane: persists session records reported by sidecars and serves them back."""
