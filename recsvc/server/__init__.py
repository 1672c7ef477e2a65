"""gRPC serving: the servicer, the error interceptor and the app (health,
reflection, graceful shutdown).

Mount recsvc beside your own services on your own server::

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         interceptors=[recsvc.server.ErrorMappingInterceptor()])
    recsvc.server.add_to_server(server, engine)
"""

from recsvc.server.admission import AdmissionInterceptor
from recsvc.server.app import PortInUse, add_to_server, build_server, serve
from recsvc.server.interceptors import ErrorMappingInterceptor

__all__ = ["add_to_server", "build_server", "serve", "AdmissionInterceptor", "ErrorMappingInterceptor", "PortInUse"]
