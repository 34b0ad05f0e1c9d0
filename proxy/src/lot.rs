//! The parking lot: plain-HTTP/1 client connections waiting for their next
//! request, held without a task, a tokio registration or any of hyper's
//! state.
//!
//! A connection's task parks it by handing over its socket (taken out of
//! tokio's reactor) and its `Connection`, then ends. The lot keeps them in
//! one map and watches the sockets in an epoll set of its own (`mio`), which
//! tokio watches as a single file descriptor. When a parked socket becomes
//! readable (a request, or the client closing), the lot gives it back to
//! tokio and spawns a task to serve it. The idle timeout is one queue:
//! every connection parks for the same `timeouts.idle`, so they expire in
//! the order they parked. On drain, every parked connection is closed.
//!
//! An idle keep-alive connection so costs one map entry (about 200 bytes)
//! and a kernel epoll item, against a task, a registration and hyper's
//! buffers (loadtests/RESULTS.md, "Idle connection memory").

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// What a parked connection needs to be served again.
pub trait Resume: Send + 'static {
    /// Serves `stream`, whose next request has started to arrive (or which
    /// the client closed), on a task of its own.
    fn resume(self, stream: TcpStream);
}

/// Where connection tasks park their connections.
pub struct Lot<C> {
    park: mpsc::UnboundedSender<(C, std::net::TcpStream)>,
}

impl<C> Clone for Lot<C> {
    fn clone(&self) -> Self {
        Self {
            park: self.park.clone(),
        }
    }
}

impl<C: Resume> Lot<C> {
    /// Starts the lot's task: connections parked longer than `idle` are
    /// closed, and all of them once `stopped` turns true.
    pub fn start(idle: Duration, stopped: watch::Receiver<bool>) -> io::Result<Self> {
        // Registered through the one crate that may hold unsafe code (its
        // SAFETY comment says why it is sound).
        let poll = switchyard_trim::watch_epoll(Poll::new()?)?;
        let (park, parked) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            if let Err(e) = run(poll, parked, idle, stopped).await {
                // Only an epoll failure gets here; the parked connections
                // are closed with the map, and the others wait in their
                // tasks from now on (`Lot::is_open`).
                tracing::error!(
                    error = %e,
                    "parking lot failed; its idle connections closed, the others wait in their tasks"
                );
            }
        });
        Ok(Self { park })
    }

    /// Whether the lot still takes connections: not after a drain, nor if
    /// its epoll set failed (then connections wait in their own tasks).
    pub fn is_open(&self) -> bool {
        !self.park.is_closed()
    }

    /// Parks `conn` until `stream` is readable. A stream tokio cannot let go
    /// of is closed.
    pub fn park(&self, conn: C, stream: TcpStream) {
        if let Ok(stream) = stream.into_std() {
            // After a drain the lot is gone and the connection is closed.
            let _ = self.park.send((conn, stream));
        }
    }
}

/// The lot's task.
async fn run<C: Resume>(
    mut poll: AsyncFd<Poll>,
    mut arrivals: mpsc::UnboundedReceiver<(C, std::net::TcpStream)>,
    idle: Duration,
    mut stopped: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut parked: HashMap<usize, (C, std::net::TcpStream)> = HashMap::new();
    // Parked in this order, with the same timeout: expiring in this order.
    let mut deadlines: VecDeque<(tokio::time::Instant, usize)> = VecDeque::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(256);
    let expiry = tokio::time::sleep(idle);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            arrived = arrivals.recv() => {
                let Some((conn, stream)) = arrived else { return Ok(()) };
                let token = next;
                next = next.wrapping_add(1);
                let fd = stream.as_raw_fd();
                let registered = poll.get_ref().registry().register(
                    &mut SourceFd(&fd),
                    Token(token),
                    Interest::READABLE,
                );
                if registered.is_ok() {
                    parked.insert(token, (conn, stream));
                    deadlines.push_back((tokio::time::Instant::now() + idle, token));
                }
            }
            ready = poll.readable_mut() => {
                let mut ready = ready?;
                ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO))?;
                let full = events.iter().count() == events.capacity();
                for event in events.iter() {
                    if let Some((conn, stream)) = unpark(ready.get_inner(), &mut parked, event.token().0) {
                        if let Ok(stream) = TcpStream::from_std(stream) {
                            conn.resume(stream);
                        }
                    }
                }
                if !full {
                    ready.clear_ready();
                }
                compact(&mut parked, &mut deadlines);
            }
            () = &mut expiry, if !deadlines.is_empty() => {
                let now = tokio::time::Instant::now();
                while let Some(&(deadline, token)) = deadlines.front() {
                    if deadline > now {
                        break;
                    }
                    deadlines.pop_front();
                    // Dropping the socket closes it: idle too long.
                    drop(unpark(poll.get_ref(), &mut parked, token));
                }
                compact(&mut parked, &mut deadlines);
            }
            _ = stopped.wait_for(|stop| *stop) => return Ok(()),
        }
        // Tokens of resumed connections stay queued until their deadline
        // and are skipped then.
        if let Some(&(deadline, _)) = deadlines.front() {
            expiry.as_mut().reset(deadline);
        }
    }
}

/// Takes a connection out of the lot and its socket out of the lot's epoll
/// set.
fn unpark<C>(
    poll: &Poll,
    parked: &mut HashMap<usize, (C, std::net::TcpStream)>,
    token: usize,
) -> Option<(C, std::net::TcpStream)> {
    let (conn, stream) = parked.remove(&token)?;
    let _ = poll
        .registry()
        .deregister(&mut SourceFd(&stream.as_raw_fd()));
    Some((conn, stream))
}

/// Drops the deadlines of connections no longer parked once they outnumber
/// the parked ones (a busy connection parks every few hundred milliseconds),
/// and gives back the map's room after a peak.
fn compact<C>(
    parked: &mut HashMap<usize, (C, std::net::TcpStream)>,
    deadlines: &mut VecDeque<(tokio::time::Instant, usize)>,
) {
    if deadlines.len() > 2 * parked.len() + 64 {
        deadlines.retain(|(_, token)| parked.contains_key(token));
        deadlines.shrink_to(2 * deadlines.len());
    }
    if parked.capacity() > 4 * parked.len() + 64 {
        parked.shrink_to(2 * parked.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Never;

    impl Resume for Never {
        fn resume(self, _stream: TcpStream) {
            unreachable!("nothing is parked in this test");
        }
    }

    #[tokio::test]
    async fn a_lot_that_has_ended_says_it_takes_no_more_connections() {
        let (stop, stopped) = watch::channel(false);
        let lot = Lot::<Never>::start(Duration::from_secs(60), stopped).unwrap();
        assert!(lot.is_open());
        stop.send(true).unwrap();
        // The lot's task ends and drops its receiver.
        tokio::time::timeout(Duration::from_secs(10), lot.park.closed())
            .await
            .expect("the lot's task ended");
        assert!(!lot.is_open());
    }
}
