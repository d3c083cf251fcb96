"""What every chatmesh process runs on: settings, the gRPC server and channels, logging, metrics and tracing."""
