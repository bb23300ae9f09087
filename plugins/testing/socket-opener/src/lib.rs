//! Hostile test plugin `socket-opener`: `handle` tries to open a TCP connection to the
//! address in the command, bind a UDP socket and resolve a name, and reports each
//! outcome in one `Probed` event, so a test can check the sandbox refused all three.
//!
//! Its component imports `wasi:sockets` (Rust's `std::net` on `wasm32-wasip2`), as a
//! componentize-py component does; the host links those interfaces with every
//! operation refused.

use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// Probes the network in `handle`.
pub struct SocketOpener;

/// `{"type":"Go","addr":"127.0.0.1:8080"}`: where to try to connect.
#[derive(Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// Run the probe.
    Go {
        /// A `host:port` to connect to over TCP.
        addr: String,
    },
}

/// What the probe saw.
#[derive(Serialize, Deserialize)]
pub enum Event {
    /// Each field is `connected`/`bound`/`resolved …` on success, else `error: <reason>`.
    Probed {
        /// Connecting to the command's address over TCP.
        tcp: String,
        /// Binding a UDP socket on an ephemeral port.
        udp: String,
        /// Resolving `localhost`.
        dns: String,
    },
}

impl Aggregate for SocketOpener {
    const TYPE: &'static str = "socket-opener";
    type State = ();
    type Command = Command;
    type Event = Event;

    fn handle(_state: &(), command: Command) -> Result<Vec<Event>, Rejection> {
        let Command::Go { addr } = command;
        let tcp = match addr.parse() {
            Ok(addr) => match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(_) => "connected".to_string(),
                Err(error) => format!("error: {error}"),
            },
            Err(error) => return Err(Rejection::new(format!("bad addr {addr}: {error}"))),
        };
        let udp = match UdpSocket::bind("127.0.0.1:0") {
            Ok(_) => "bound".to_string(),
            Err(error) => format!("error: {error}"),
        };
        let dns = match "localhost:80".to_socket_addrs() {
            Ok(found) => format!("resolved {:?}", found.collect::<Vec<_>>()),
            Err(error) => format!("error: {error}"),
        };
        Ok(vec![Event::Probed { tcp, udp, dns }])
    }

    fn apply(_state: (), _event: Event) {}
}

meridian_guest::export_aggregate!(SocketOpener);
