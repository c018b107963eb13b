//! The listening socket and its connections, on a runtime of the emulator's own: the
//! emulator keeps answering while a test blocks its thread (say on a `kubectl` run
//! with `std::process::Command`), and dropping it ends everything it started.
//!
//! Listening can stop and resume on the same port: while stopped, connections are
//! refused and open ones are closed, which is an unreachable API server.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

pub struct Server {
    runtime: Option<Runtime>,
    router: axum::Router,
    port: u16,
    /// Cancelled to stop listening; `None` while stopped.
    listening: Mutex<Option<CancellationToken>>,
}

impl Server {
    /// Binds a free port of 127.0.0.1 and serves the router `make_router` builds for it.
    pub fn start(make_router: impl FnOnce(u16) -> axum::Router) -> io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kubeapi-emulator")
            .enable_all()
            .build()?;
        let listener = bind(&runtime, 0)?;
        let port = listener.local_addr()?.port();
        let server = Server { runtime: Some(runtime), router: make_router(port), port, listening: Mutex::new(None) };
        server.serve(listener);
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn serve(&self, listener: TcpListener) {
        let token = CancellationToken::new();
        self.runtime().spawn(accept_loop(listener, self.router.clone(), token.clone()));
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
    }

    /// Closes the listening socket and every open connection.
    pub fn stop_listening(&self) {
        if let Some(token) = self.listening.lock().unwrap_or_else(|p| p.into_inner()).take() {
            token.cancel();
        }
    }

    /// Listens again on the same port.
    pub fn resume_listening(&self) -> io::Result<()> {
        if self.listening.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(());
        }
        let listener = bind(self.runtime(), self.port)?;
        self.serve(listener);
        Ok(())
    }
}

fn bind(runtime: &Runtime, port: u16) -> io::Result<TcpListener> {
    let _context = runtime.enter();
    let socket = TcpSocket::new_v4()?;
    // Rebinding the port of a server that just closed its connections (TIME_WAIT).
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(1024)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_listening();
        // Does not wait: the test's own runtime may be the caller, where blocking panics.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, router: axum::Router, token: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: let the test see refusals, not a spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let token = token.clone();
        tokio::spawn(async move {
            let builder = Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes the socket under any request in flight.
                () = token.cancelled() => {}
            }
        });
    }
}
