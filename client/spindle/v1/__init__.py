"""Generated protobuf and gRPC code for spindle.v1 (see `make proto`)."""
