"""gRPC servicers: protobuf <-> domain translation, nothing else."""
