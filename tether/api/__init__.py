"""Generated protobuf code for the wire contract and converters to domain types."""
