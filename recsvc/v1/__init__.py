"""Generated gRPC and protobuf code for the recsvc v1 API.

Everything else in this package is produced from ``proto/recsvc/v1/*.proto`` at
build time by ``recsvc._codegen`` and is never edited by hand or committed.
"""
