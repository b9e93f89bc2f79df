"""Session stores: one `SessionStore` protocol, SQLite and etcd implementations."""
