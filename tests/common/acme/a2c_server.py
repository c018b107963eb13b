"""Serves acme2certifier's WSGI application on 127.0.0.1:PORT for certwire's tests.

acme2certifier's own dev server binds 0.0.0.0:80, which the tests need for http-01
responders; this one binds loopback on the port given. The configuration comes
from ACME_SRV_CONFIGFILE, which acme2certifier reads at import time, so the caller
sets it in the environment. Threaded, because ACME clients poll while a request
that validates a challenge is still running.

Usage: python a2c_server.py PORT
"""

import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    port = int(sys.argv[1])
    # Imported here: the import reads the configuration and opens the database.
    from acme2certifier.share import acme2certifier_wsgi as a2c

    server = make_server(
        "127.0.0.1",
        port,
        a2c.application,
        server_class=ThreadingWSGIServer,
        handler_class=a2c.get_handler_cls(),
    )
    print(f"acme2certifier listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
