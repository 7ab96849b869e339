//! A real DNS server on 127.0.0.1 for the SPF, DKIM and DMARC tests: UDP
//! and TCP on one port, answering from a table the test fills in.
//!
//! Names it does not know get NXDOMAIN; a known name asked for another
//! type gets an empty answer. [`Dns::stop`] closes both sockets, so a
//! resolver asking it gets no answer at all (the "DNS is down" case), and
//! [`Dns::set_servfail`] answers SERVFAIL to everything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crmgate::auth::Verifier;
use mail_auth::hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use mail_auth::hickory_resolver::proto::rr::rdata::TXT;
use mail_auth::hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Zone {
    /// Lower-cased names without the final dot.
    txt: HashMap<String, Vec<String>>,
    servfail: bool,
    /// Every name asked, in order.
    asked: Vec<String>,
}

pub struct Dns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Dns {
    pub async fn start() -> Dns {
        let zone = Arc::new(Mutex::new(Zone::default()));
        // The TCP port must be free as well: try a few UDP ports.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            let Ok(tcp) = TcpListener::bind(addr).await else {
                continue;
            };
            let tasks = vec![
                tokio::spawn(serve_udp(udp, zone.clone())),
                tokio::spawn(serve_tcp(tcp, zone.clone())),
            ];
            return Dns { addr, zone, tasks };
        }
        panic!("no free port for both UDP and TCP");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a TXT record (long texts are split in 255-byte strings).
    pub fn txt(&self, name: &str, text: &str) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.zone
            .lock()
            .unwrap()
            .txt
            .entry(name)
            .or_default()
            .push(text.to_string());
    }

    /// The names asked so far (lower-cased, without the final dot).
    pub fn asked(&self) -> Vec<String> {
        self.zone.lock().unwrap().asked.clone()
    }

    pub fn set_servfail(&self, on: bool) {
        self.zone.lock().unwrap().servfail = on;
    }

    /// Closes the sockets: queries go unanswered.
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    /// A verifier that asks this server only, with a short timeout.
    pub fn verifier(&self, hostname: &str) -> Verifier {
        Verifier::new(&[self.addr], std::time::Duration::from_secs(1), hostname).unwrap()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(query: &[u8], zone: &Mutex<Zone>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.message_type = MessageType::Response;
    let mut zone = zone.lock().unwrap();
    for q in &request.queries {
        response.add_query(q.clone());
        if zone.servfail {
            response.metadata.response_code = ResponseCode::ServFail;
            continue;
        }
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        zone.asked.push(name.clone());
        match zone.txt.get(&name) {
            None => response.metadata.response_code = ResponseCode::NXDomain,
            Some(texts) if q.query_type() == RecordType::TXT => {
                for text in texts {
                    let parts: Vec<String> = text
                        .as_bytes()
                        .chunks(255)
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                        .collect();
                    let owner = Name::from_ascii(format!("{name}.")).ok()?;
                    response.add_answer(Record::from_rdata(owner, 60, RData::TXT(TXT::new(parts))));
                }
            }
            Some(_) => {}
        }
    }
    response.to_vec().ok()
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((count, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = answer(&buf[..count], &zone) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let zone = zone.clone();
        tokio::spawn(async move {
            loop {
                let mut length = [0u8; 2];
                if stream.read_exact(&mut length).await.is_err() {
                    return;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
                if stream.read_exact(&mut query).await.is_err() {
                    return;
                }
                let Some(reply) = answer(&query, &zone) else {
                    return;
                };
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).await.is_err() {
                    return;
                }
            }
        });
    }
}
