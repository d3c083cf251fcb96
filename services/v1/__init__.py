"""Generated protobuf and gRPC code for chatmesh.v1 (`make proto`)."""
