"""The gRPC edge: `v1/` is generated from proto/tether/v1 by scripts/gen_proto.py (do not
edit), `convert` maps it to `tether.model`, `client` is the typed client built on both."""
